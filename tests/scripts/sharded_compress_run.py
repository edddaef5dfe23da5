"""Compress a DMP-sharded DLRM where its shards lie; save what the tests compare with one
process.  Used by tests/test_sharded_compress.py.

The model has one table per sharding type (table-wise, row-wise, column-wise, table-row-wise,
data-parallel, table-column-wise; or only some, --types), initialised the same way on any
number of ranks.  For each tier policy it saves every shard's tiers (gathered: small); and the
full tables, gathered for the test's single-process reference only.
"""

import argparse
import json

import torch
from torchrec.distributed.planner import ParameterConstraints

from shark_torchrec.planning import AllShardingTypesEBCSharder
from shark_torchrec.quant import RowwiseQuantConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.sharded import REPLICATED, Comm, assign_tiers_sharded, collection_layout, quantize_sharded_dlrm
from shark_torchrec.sharded.convert import dense_state
from shark_torchrec.training import DLRMConfig, DLRMTrainer, OptimConfig, init_distributed
from shark_torchrec.training.distributed import destroy_distributed, exit_worker
from shark_torchrec.training.gather import full_state_dict

TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel", "table_column_wise"]
POLICIES = {
    "budget": dict(budget_fraction=0.2, row_alignment=1),
    "budget_unused": dict(budget_fraction=0.45, drop_rows="unused", row_alignment=16),
    "fractions": dict(fractions={"fp16": 0.1, "int8": 0.3, "int4": 0.5, "drop": 0.1}),
    "mixed": dict(budget_fraction=0.4, table_overrides={"t_f0": "int8"},
                  table_fractions={"t_f1": {"fp16": 0.5, "int2": 0.5}}, table_budgets={"t_f3": 3000}),
    # shard-local centroids (column-wise tables take no SHARED rows); unused rows dropped;
    # integer rows fitted by least squares (each column block apart)
    "shared": dict(budget_fraction=0.3, tiers=("fp16", "int8", "int4", "int2", "shared", "drop"),
                   drop_rows="unused", row_alignment=1, row_fit="lsq"),
    # each shard's centroid count chosen on a sample of 40 of its rows (the same on any ranks)
    "shared_sampled": dict(budget_fraction=0.25, tiers=("fp16", "int8", "int4", "int2", "shared"),
                           row_alignment=1, shared_sample_rows=40),
}
#: The policy of the converted model that is served, exported and loaded.
SERVED = "shared"


def priorities(table: str, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, table)))
    p = torch.rand(rows, generator=g, dtype=torch.float64) ** 4
    p[::9] = 0.0  # rows never read
    p[1::11] = p[1]  # ties
    return p


def global_batch(features, rows, size: int, seed: int):
    """A batch of ``size`` samples (the same on every rank): dense inputs, a KJT, labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(features), size), generator=g)
    values = [torch.randint(0, n, (int(lengths[i].sum()),), generator=g) for i, n in enumerate(rows)]
    return torch.rand(size, 4, generator=g), lengths, values


def rank_slice(features, batch, rank: int, world: int):
    """This rank's samples of a global batch: a contiguous slice (uneven sizes, maybe empty)."""
    dense, lengths, values = batch
    size = dense.shape[0]
    bounds = [size * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    vals = []
    for i in range(len(features)):
        start = int(lengths[i, :lo].sum())
        vals.append(values[i][start:start + int(lengths[i, lo:hi].sum())])
    kjt = KeyedJaggedTensor.from_lengths_sync(features, torch.cat(vals), lengths[:, lo:hi].reshape(-1))
    return dense[lo:hi], kjt


def zero_row_shard_error() -> str:
    """What reading the layout of a 1-row table sharded row-wise over 2 ranks says (a shard of 0
    rows: TorchRec's config for it failed with a ZeroDivisionError on one rank, and the other
    waited for it forever)."""
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="one", embedding_dim=8, num_embeddings=1,
                                                            feature_names=["f"])], device=torch.device("meta"))
    plan = construct_module_sharding_plan(ebc, {"one": row_wise()}, world_size=2, device_type="cpu")
    dmp = DistributedModelParallel(
        ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}), env=ShardingEnv.from_process_group(dist.group.WORLD),
        sharders=[EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1})])
    try:
        collection_layout(dmp._dmp_wrapped_module, dist.get_rank(), 2)
    except ValueError as e:
        return str(e)
    return "no error"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--export", help="also export the converted model to this directory and load it back")
    args = p.parse_args()
    env = init_distributed("cpu")
    torch.set_num_threads(1)
    types = args.types.split(",")
    rows = [300 + 37 * i for i in range(len(types))]
    config = DLRMConfig(feature_names=[f"f{i}" for i in range(len(types))], num_embeddings_per_feature=rows,
                        embedding_dim=16, dense_in_features=4, dense_arch_layer_sizes=(16, 16),
                        over_arch_layer_sizes=(8, 1))
    constraints = {t.name: ParameterConstraints(sharding_types=[ty], min_partition=8)
                   for t, ty in zip(config.tables(), types)}
    trainer = DLRMTrainer(config, OptimConfig(embedding_optimizer="sgd"), env, 8, seed=5,
                          constraints=constraints, sharders=[AllShardingTypesEBCSharder()])
    ebc = trainer.model.module.model.sparse_arch.embedding_bag_collection
    layout, weights = collection_layout(ebc, env.rank, env.world_size)
    comm = Comm()
    prio = {t.name: priorities(t.name, t.num_embeddings) for t in config.tables()}
    result = {"layout": layout.to_dict(), "tiers": {}, "rows_per_tier": {}}
    for name, kwargs in POLICIES.items():
        a = assign_tiers_sharded(layout, weights, RowwiseQuantConfig(**kwargs),
                                 lambda t, r0, n: prio[t][r0:r0 + n], comm)
        gathered = comm.all_gather_object({k: v.clone() for k, v in a.tiers.items()})
        merged = {}
        for part in gathered:
            for k, v in part.items():
                if k in merged:  # replicated tables: every rank must hold the same tiers
                    assert torch.equal(merged[k], v), k
                merged[k] = v
        result["tiers"][name] = merged
        result["rows_per_tier"][name] = a.rows_per_tier
        result.setdefault("centroids", {})[name] = a.centroids
    # Convert with the SERVED policy and serve: pooled embeddings and logits of batches split
    # unevenly over the ranks (one rank may get none), gathered in global sample order.
    model, a = quantize_sharded_dlrm(trainer.model, RowwiseQuantConfig(**POLICIES[SERVED]),
                                     lambda t, r0, n: prio[t][r0:r0 + n], comm)
    collection = model.model.sparse_arch.embedding_bag_collection
    served = []
    for size, seed in ((32, 1), (9, 2), (1, 3), (48, 4)):  # (buffers kept between calls: shrink, grow)
        batch = global_batch(config.feature_names, rows, size, seed)
        dense, kjt = rank_slice(config.feature_names, batch, env.rank, env.world_size)
        kt = collection(kjt)
        logits = model.model(dense, kjt)
        parts = comm.all_gather_object((kt.keys(), kt.values(), logits.reshape(-1)))
        served.append({"batch": batch, "keys": parts[0][0], "pooled": torch.cat([p[1] for p in parts]),
                       "logits": torch.cat([p[2] for p in parts])})
    result["served"] = served
    # output_dtype fp16: the same pooled embeddings, in fp16; each table's data type, on every rank
    collection.output_dtype = torch.float16
    kt16 = collection(kjt)
    result["fp16_matches"] = comm.all_gather_object(
        (kt16.values().dtype == torch.float16, torch.equal(kt16.values(), kt.values().half())))
    collection.output_dtype = torch.float32
    result["data_types"] = comm.all_gather_object({c.name: c.data_type.value for c in collection.embedding_bag_configs()})
    # A sharded RowPriority as the priorities: each rank asks it for the rows it decides; the
    # tiers are those of its whole tables given as a function.
    from shark_torchrec.importance import RowPriority
    from shark_torchrec.sharded import quantize_sharded

    tracker = RowPriority(config.tables(), gamma=0.9, flush_every=2)
    for seed in range(5):
        _, kjt = rank_slice(config.feature_names, global_batch(config.feature_names, rows, 16, 20 + seed),
                            env.rank, env.world_size)
        tracker.update(kjt, (torch.arange(kjt.stride()) % 3 == 0).float())
    whole = tracker.priorities()  # (gathered: the comparison's reference only)
    budget = RowwiseQuantConfig(budget_fraction=0.3, row_alignment=1)
    source = trainer.model.module.model.sparse_arch.embedding_bag_collection
    _, by_tracker = quantize_sharded(source, budget, tracker, comm)
    _, by_function = quantize_sharded(source, budget, lambda t, r0, n: whole[t][r0:r0 + n], comm)
    result["tracker_tiers_agree"] = all(comm.all_gather_object(
        all(torch.equal(by_tracker.tiers[k], by_function.tiers[k]) for k in by_function.tiers)))
    # An id outside its table in one rank's batch: every rank raises (none is left waiting in
    # a collective), the one holding it naming the feature, the id and the table.
    dense, kjt = rank_slice(config.feature_names, global_batch(config.feature_names, rows, 8, 9), env.rank,
                            env.world_size)
    if env.rank == 1:
        values = kjt.values().clone()
        values[0] = 10_000
        kjt = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())
    try:
        collection(kjt)
        message = None
    except ValueError as e:
        message = str(e)
    result["bad_id_messages"] = comm.all_gather_object(message)
    # Lengths that do not add up to the ids on rank 0: every rank raises, rank 0 saying why.
    dense, kjt = rank_slice(config.feature_names, global_batch(config.feature_names, rows, 8, 9), env.rank,
                            env.world_size)
    if env.rank == 0:
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat([kjt.values(), kjt.values()[:1]]),
                                lengths=kjt.lengths())
    try:
        collection(kjt)
        message = None
    except ValueError as e:
        message = str(e)
    result["malformed_messages"] = comm.all_gather_object(message)
    # A data-parallel table whose copy on rank 1 differs: every rank refuses it, naming it (each
    # converted its own copy under rank 0's tiers, silently).
    replicated = [s.name for s in layout.shards if s.rank == REPLICATED]
    if replicated:
        drifted = dict(weights)
        if env.rank == 1:
            drifted[replicated[0]] = weights[replicated[0]] + 0.05
        try:
            assign_tiers_sharded(layout, drifted, RowwiseQuantConfig(budget_fraction=0.3), None, comm)
            message = None
        except ValueError as e:
            message = str(e)
        result["replica_messages"] = comm.all_gather_object(message)
    if args.export:
        from shark_torchrec.export import load_export
        from shark_torchrec.sharded.export import export_sharded

        export_sharded(model, args.export, metadata={"note": "test"})
        loaded, info = load_export(args.export)
        again = []
        for item in served:
            dense, kjt = rank_slice(config.feature_names, item["batch"], env.rank, env.world_size)
            again.append(torch.cat(comm.all_gather_object(loaded.model(dense, kjt).reshape(-1))))
        result["reloaded_logits"] = again
        result["reload_placement"] = info["placement"].to_dict()
    result["served_tiers"] = {k: v for part in comm.all_gather_object(a.tiers) for k, v in part.items()}
    result["served_shared"] = {k: (v.centroids, v.index) for part in comm.all_gather_object(a.shared)
                               for k, v in part.items()}
    result["dense"] = dense_state(trainer.model)
    result["features"] = list(config.feature_names)
    full = full_state_dict(trainer.model)  # the test's reference only
    if env.rank == 0:
        result["weights"] = {k.split(".")[-2]: v for k, v in full.items() if ".embedding_bags." in k}
        result["priorities"] = prio
        result["policies"] = json.dumps(POLICIES)
    zero_rows = zero_row_shard_error()  # (a collective: every rank)
    if env.rank == 0:
        result["zero_row_error"] = zero_rows
        torch.save(result, args.out)
    destroy_distributed(synchronize=True)
    exit_worker(0)


if __name__ == "__main__":
    main()
