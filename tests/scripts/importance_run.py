"""Train a sharded DLRM on synthetic data with SHARK trackers (every baseline) attached;
save the scores.  Used by tests/test_importance_distributed.py (world-size equality, train
pipelines, planted fields)."""

import argparse

import torch
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig, make_dataloader
from shark_torchrec.importance import BASELINES, RowPriority, TaylorFieldImportance
from shark_torchrec.training import DLRMConfig, DLRMTrainer, OptimConfig, init_distributed
from shark_torchrec.training.distributed import destroy_distributed, exit_worker

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--global_batch", type=int, default=64)
p.add_argument("--pipeline", choices=["none", "base", "sparse_dist"], default="none")
p.add_argument("--fields", type=int, default=6)
p.add_argument("--informative", type=int, default=2)
p.add_argument("--cardinality", type=int, default=300)
p.add_argument("--lr", type=float, default=0.1)
args = p.parse_args()

env = init_distributed("cpu")
torch.set_num_threads(1)
cfg = SyntheticConfig.default(num_fields=args.fields, num_informative=args.informative,
                              cardinality=args.cardinality, multi_hot_fields=2, max_hot=4, seed=3)
model_config = DLRMConfig(
    feature_names=cfg.feature_names, num_embeddings_per_feature=cfg.num_embeddings_per_feature,
    embedding_dim=8, dense_in_features=cfg.num_dense, dense_arch_layer_sizes=(16, 8),
    over_arch_layer_sizes=(16, 1))
local = args.global_batch // env.world_size
trainer = DLRMTrainer(model_config, OptimConfig(learning_rate=args.lr), env, local, seed=11)
trackers = [TaylorFieldImportance(trainer.model, baseline=b, seed=7) for b in BASELINES]
ds = SyntheticClickDataset(cfg, local, args.steps, rank=env.rank, world_size=env.world_size)
losses = []
for t in trackers:
    t.attach()
# Row priorities from the same steps (a pre-hook on the DMP model sees each Batch).
rows = RowPriority(model_config.tables(), gamma=0.9).attach(trainer.model)
if args.pipeline == "none":
    for batch in make_dataloader(ds):
        losses.append(trainer.train_step(batch).item())
else:
    cls = TrainPipelineSparseDist if args.pipeline == "sparse_dist" else TrainPipelineBase
    pipe = cls(model=trainer.model, optimizer=trainer.optimizer, device=env.device)
    it = iter(make_dataloader(ds))
    trainer.model.train()
    while True:
        try:
            loss = pipe.progress(it)[0]  # DLRMTrain: (loss, logits, labels)
        except StopIteration:
            break
        losses.append(float(loss))
for t in trackers:
    t.detach()
rows.detach()
priorities = rows.priorities()
scores = {t.baseline: t.scores() for t in trackers}
seen = {t.baseline: t.samples_seen() for t in trackers}
if env.rank == 0:
    torch.save({"scores": scores, "seen": seen, "losses": losses, "informative": list(cfg.informative),
                "noise": cfg.noise_fields, "priorities": priorities}, args.out)
# Wait for every rank, tear down, and skip interpreter finalization (see exit_worker).
destroy_distributed(synchronize=True)
exit_worker(0)
