"""Serve a weighted ``EmbeddingBagCollection`` (per-id weights, as for id-score-list features)
sharded by DMP and converted where its shards lie; save, per rank, its pooled output for
weighted bags and the rows each of those ids reads.  Used by tests/test_sharded_compress.py.

Tables: table-wise (on each rank), row-wise and column-wise; one pools in MEAN.  The rows are
read through the same sharded collection, one id per bag with unit weight (its unweighted
path, which tests/scripts/sharded_compress_run.py checks against the dequantized tables), so
the test checks the weights' route: sent with their ids, applied per id, MEAN divided by the
bag's length.
"""

import argparse

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.planning import AllShardingTypesEBCSharder
from shark_torchrec.quant import RowwiseQuantConfig
from shark_torchrec.sharded import Comm, quantize_sharded
from shark_torchrec.training import init_distributed
from shark_torchrec.training.distributed import destroy_distributed, exit_worker

DIM = 16
MEAN_TABLE = 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    env = init_distributed("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=100 + 30 * i,
                                 feature_names=[f"f{i}"],
                                 pooling=PoolingType.MEAN if i == MEAN_TABLE else PoolingType.SUM)
              for i in range(4)]
    keys = [t.feature_names[0] for t in tables]
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=True, device=torch.device("meta"))
    kinds = [table_wise(rank=0), row_wise(), column_wise(ranks=[0, 1]), table_wise(rank=1)]
    plan = construct_module_sharding_plan(ebc, {t.name: k for t, k in zip(tables, kinds)},
                                          world_size=env.world_size, device_type="cpu")
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}),
                                   sharders=[AllShardingTypesEBCSharder()], env=ShardingEnv.from_process_group(dist.GroupMember.WORLD))
    comm = Comm()
    mixed, _ = quantize_sharded(dmp._dmp_wrapped_module,
                                RowwiseQuantConfig(fractions={"fp16": 0.3, "int8": 0.3, "int4": 0.4}), None, comm)
    results = []
    for seed in (1, 2):  # two batches: the kept exchange buffers are reused
        g = torch.Generator().manual_seed(10 * seed + env.rank)
        B = 5 + env.rank + seed
        lengths = torch.randint(0, 4, (len(tables), B), generator=g)
        values = torch.cat([torch.randint(0, t.num_embeddings, (int(lengths[i].sum()),), generator=g)
                            for i, t in enumerate(tables)])
        weights = torch.rand(values.numel(), generator=g) + 0.5
        pooled = mixed(KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.reshape(-1), weights=weights))
        # the rows of those ids: one id per bag, unit weight; every key the same number of bags
        # on this rank (padded with empty bags), the same number of calls on every rank
        per_key = lengths.sum(1)
        n = int(comm.all_reduce(per_key.max().reshape(1)))  # the sum of the ranks' maxima: the same on every rank
        single_lengths = torch.cat([torch.cat([torch.ones(int(k), dtype=torch.long),
                                               torch.zeros(n - int(k), dtype=torch.long)]) for k in per_key])
        rows = mixed(KeyedJaggedTensor(keys=keys, values=values, lengths=single_lengths,
                                       weights=torch.ones(values.numel()))).to_dict()
        results.append({"lengths": lengths, "weights": weights, "pooled": pooled.to_dict(),
                        "rows": {k: rows[k][:int(c)] for k, c in zip(keys, per_key)}})
    torch.save({"results": results, "mean_key": keys[MEAN_TABLE]}, f"{args.out}.{env.rank}")
    destroy_distributed()
    exit_worker()


if __name__ == "__main__":
    main()
