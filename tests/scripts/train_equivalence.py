"""Train a few sharded DLRM steps on synthetic global batches; save losses and full params.

Run with torchrun (any world size, global batch fixed): the losses and parameters must not
depend on the world size.  Used by tests/test_train_distributed.py.
"""

import argparse

import torch
import torch.distributed as dist

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig, make_dataloader
from shark_torchrec.training import DLRMConfig, DLRMTrainer, OptimConfig, init_distributed
from shark_torchrec.training.gather import full_state_dict
from shark_torchrec.training.distributed import destroy_distributed, exit_worker

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--global_batch", type=int, default=64)
p.add_argument("--interaction", default="dot")
p.add_argument("--sharding_type", help="force this sharding type on every table (planner constraint)")
args = p.parse_args()

env = init_distributed("cpu")
torch.set_num_threads(1)
cfg = SyntheticConfig.default(num_fields=6, num_informative=2, cardinality=300,
                              multi_hot_fields=2, max_hot=4, seed=3)
model_config = DLRMConfig(
    feature_names=cfg.feature_names, num_embeddings_per_feature=cfg.num_embeddings_per_feature,
    embedding_dim=8, dense_in_features=cfg.num_dense, dense_arch_layer_sizes=(16, 8),
    over_arch_layer_sizes=(16, 1), interaction=args.interaction, dcn_num_layers=2,
    dcn_low_rank_dim=4,
)
local_batch = args.global_batch // env.world_size
constraints, sharders = None, None
if args.sharding_type:
    from torchrec.distributed.planner import ParameterConstraints

    from shark_torchrec.planning import AllShardingTypesEBCSharder

    constraints = {t.name: ParameterConstraints(sharding_types=[args.sharding_type])
                   for t in model_config.tables()}
    sharders = [AllShardingTypesEBCSharder()]
trainer = DLRMTrainer(model_config, OptimConfig(learning_rate=0.1), env, local_batch, seed=11,
                      constraints=constraints, sharders=sharders)
ds = SyntheticClickDataset(cfg, local_batch, args.steps, rank=env.rank, world_size=env.world_size)
losses = []
for batch in make_dataloader(ds):
    loss = trainer.train_step(batch).clone()
    dist.all_reduce(loss)  # mean of equal-size local means = the global mean loss
    losses.append(loss.item() / env.world_size)
state = full_state_dict(trainer.model)
if env.rank == 0:
    torch.save({"losses": losses, "state": state, "plan": str(trainer.plan)}, args.out)
# Wait for every rank, tear down, and skip interpreter finalization (see exit_worker).
destroy_distributed(synchronize=True)
exit_worker(0)
