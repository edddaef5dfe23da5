"""Prune a sharded DLRM under torchrun and compare with pruning the gathered unsharded model;
then run two rounds of iterative pruning.  Used by tests/test_pruning_distributed.py."""

import argparse
import json
import os

import torch
import torch.distributed as dist

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig, make_dataloader
from shark_torchrec.pruning import choose_plan, prune_dlrm
from shark_torchrec.pruning.mean_fill import field_means
from shark_torchrec.pruning.sharded import iterative_prune, prune_trainer
from shark_torchrec.training import (CheckpointManager, DLRMConfig, DLRMTrainer, OptimConfig,
                                     build_dlrm_train, init_distributed)
from shark_torchrec.training.gather import full_state_dict
from shark_torchrec.training.distributed import destroy_distributed, exit_worker

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--interaction", default="dot")
args = p.parse_args()

env = init_distributed("cpu")
torch.set_num_threads(1)
cfg = SyntheticConfig.default(num_fields=6, num_informative=2, cardinality=300, seed=3)
config = DLRMConfig(feature_names=cfg.feature_names, num_embeddings_per_feature=cfg.num_embeddings_per_feature,
                    embedding_dim=8, dense_in_features=13, dense_arch_layer_sizes=(16, 8),
                    over_arch_layer_sizes=(16, 1), interaction=args.interaction, dcn_num_layers=2,
                    dcn_low_rank_dim=4)
B = 64 // env.world_size
trainer = DLRMTrainer(config, OptimConfig(learning_rate=0.1), env, B, seed=1)
data = iter(make_dataloader(SyntheticClickDataset(cfg, B, 40, rank=env.rank, world_size=env.world_size)))
trainer.train(data, max_steps=5)
scores = {f: float(i) for i, f in enumerate(cfg.feature_names[::-1])}  # drop the last fields
plan = choose_plan(scores, config.tables(), keep=3)
ckpt = CheckpointManager(os.path.join(args.out, "ck"), {"t": 1})
path = ckpt.save(trainer.state_dict(), {"global_step": 5})
full_old = full_state_dict(trainer.model)
pruned = prune_trainer(trainer, plan, path, B)
full_new = full_state_dict(pruned.model)

# The same evaluation batch on every rank's slice; gather the logits.
test = SyntheticClickDataset(cfg, B, 1, rank=env.rank, world_size=env.world_size, batch_offset=999)
logits = pruned.predict(next(iter(test)))
parts = [torch.empty_like(logits) for _ in range(env.world_size)]
dist.all_gather(parts, logits)
result = {}
if env.rank == 0:
    # Reference: the gathered unsharded model, pruned with prune_dlrm, on the global batch.
    ref_model = build_dlrm_train(config, torch.device("cpu"), 0, embedding_device=torch.device("cpu"))
    ref_model.load_state_dict(full_old)
    ref_pruned = prune_dlrm(ref_model, plan)
    ref_pruned.eval()
    glob = SyntheticClickDataset(cfg, 64, 1, batch_offset=999).global_batch(0)
    with torch.no_grad():
        _, (_, ref_logits, _) = ref_pruned(glob)
    result["max_logit_err"] = float((torch.cat(parts) - ref_logits).abs().max())
    result["max_weight_err"] = max(
        float((full_new[k] - v).abs().max()) for k, v in ref_pruned.state_dict().items())
    result["new_features"] = pruned.features

# One fine-tuning step of the pruned model must equal the same step of the original model with
# the dropped tables zeroed (their pooled embeddings and every interaction with them are then
# 0, so every surviving weight sees the same gradient) — which holds only if the optimizer
# state (row-wise Adagrad of the tables, Adagrad sums of the dense layers) was carried over.
zeroed = DLRMTrainer(config, OptimConfig(learning_rate=0.1), env, B, seed=1)
state = zeroed.state_dict()
ckpt.load(state, path)
zeroed.load_state_dict(state)
model_state = zeroed.model.state_dict()
for t in plan.dropped_tables:
    for key, value in model_state.items():
        if f".embedding_bags.{t}.weight" in key:
            for shard in value.local_shards():
                shard.tensor.zero_()
zeroed.model.load_state_dict(model_state)
step_batches = list(make_dataloader(SyntheticClickDataset(cfg, B, 1, rank=env.rank,
                                                          world_size=env.world_size, batch_offset=77)))
zeroed.train(iter(step_batches), max_steps=1)
pruned.train(iter(step_batches), max_steps=1)
full_zeroed = full_state_dict(zeroed.model)
full_stepped = full_state_dict(pruned.model)
if env.rank == 0:
    ref_model = build_dlrm_train(config, torch.device("cpu"), 0, embedding_device=torch.device("cpu"))
    ref_model.load_state_dict(full_zeroed)
    ref_stepped = prune_dlrm(ref_model, plan).state_dict()
    result["max_finetune_step_err"] = max(
        float((full_stepped[k] - v).abs().max()) for k, v in ref_stepped.items())
    result["max_finetune_step_change"] = max(
        float((full_stepped[k] - full_new[k]).abs().max()) for k in ref_stepped)

final = iterative_prune(pruned, data, rounds=2, score_batches=4, finetune_steps=3, keep_fields=1,
                        work_dir=os.path.join(args.out, "iter"), batch_size=B)

# Pruning by mean replacement: the means over the ranks' batches equal the unsharded model's
# over the global batches, and the sharded pruned model predicts what prune_dlrm(means) gives.
mean_data = [SyntheticClickDataset(cfg, B, 1, rank=env.rank, world_size=env.world_size, batch_offset=500 + i)
             for i in range(3)]
means = trainer.field_means((next(iter(make_dataloader(d))) for d in mean_data), plan.dropped_features)
by_mean = prune_trainer(trainer, plan, path, B, means=means)
mean_logits = by_mean.predict(next(iter(test)))
parts = [torch.empty_like(mean_logits) for _ in range(env.world_size)]
dist.all_gather(parts, mean_logits)
if env.rank == 0:
    ref_model = build_dlrm_train(config, torch.device("cpu"), 0, embedding_device=torch.device("cpu"))
    ref_model.load_state_dict(full_old)
    ref_ebc = ref_model.model.sparse_arch.embedding_bag_collection
    ref_means = field_means(ref_ebc, (SyntheticClickDataset(cfg, 64, 1, batch_offset=500 + i).global_batch(0)
                                      .sparse_features for i in range(3)), plan.dropped_features,
                            reduce=False)
    result["max_mean_err"] = max(float((means[f] - ref_means[f]).abs().max()) for f in plan.dropped_features)
    ref_pruned = prune_dlrm(ref_model, plan, ref_means)
    ref_pruned.eval()
    with torch.no_grad():
        _, (_, ref_logits, _) = ref_pruned(glob)
    result["max_mean_logit_err"] = float((torch.cat(parts) - ref_logits).abs().max())
    result["mean_filled"] = by_mean.model_config.mean_filled
final_mean = iterative_prune(by_mean, data, rounds=2, score_batches=3, finetune_steps=2, keep_fields=1,
                             work_dir=os.path.join(args.out, "iter_mean"), batch_size=B, mean_batches=2)
final_mean.evaluate(iter([next(iter(test))]))
if env.rank == 0:
    result["iterative_features"] = final.features
    result["iterative_mean_filled"] = final_mean.model_config.mean_filled
    result["iterative_mean_features"] = final_mean.features
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f)
# Wait for every rank, tear down, and skip interpreter finalization (see exit_worker).
destroy_distributed(synchronize=True)
exit_worker(0)
