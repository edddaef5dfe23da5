#!/usr/bin/env python
"""Embedding lookup throughput: TorchRec's fp32 collection, FBGEMM uniform FP16/INT8/INT4
(TorchRec's quantized collection, one IntNBit TBE) and the row-wise mixed-precision collection,
on two shapes, single-threaded and with the default torch threads; plus a model-level figure
(a DLRM forward with the fp32 vs the mixed collection).

Shapes:

* benchmark shape (issue 4): 8 tables × 1,000,000 rows × dim 64, batch 4,096, 20 ids per bag,
  Zipf-distributed ids (exponent 1.05);
* pipeline shape (what ``shark-torchrec run`` serves): ``SyntheticConfig.default`` — 26
  tables × 20,000 rows × dim 16, 24 one-hot fields and 2 multi-hot ones (1-5 ids), batch 512.

Row priorities for the mixed tiers are the id counts of a separate sample of batches (popular
rows get the precise tiers).  The mixed collection is timed three ways: its default forward
(the fused CPU kernel: id map, tier, lookup and pooling in one pass); FBGEMM's path
(``block_bucketize_sparse_features`` then FBGEMM's TBE, in ``G`` table groups run in threads —
the previous default, kept as the CUDA / fallback path); and with the id-to-tier step done
beforehand by its input transform (where a serving pipeline could run it: data-loader workers),
only FBGEMM's lookup timed.  Every variant runs the same rotating batches, Python's garbage
collector paused while timing (it would otherwise fire inside whichever variant allocates
next).  The variants take turns in short blocks (an untimed call, then a tenth of a round's
timed calls): the tables report the median time per batch over blocks, and ratios to the fp32
collection and to uniform INT8 taken block by block (calls made milliseconds apart, so the
shared machine's drift hits both sides of a ratio alike) — their median over all blocks of the
run, with the interquartile range.

    python tools/bench_lookup.py --out runs/bench_lookup.json
    python tools/bench_lookup.py --device cuda        # EmbeddingLocation.DEVICE tables
    python tools/bench_lookup.py --row_alignment 1 --threads 1   # FBGEMM's unpadded CPU rows

Sharded (``--sharded`` under ``torchrun``): TorchRec's fp32 collection sharded by
``DistributedModelParallel`` (``--sharding_type``, on every table) against the mixed collection
converted from it where its shards lie (:func:`shark_torchrec.sharded.quantize_sharded`), each
rank feeding its part of the global batch (``--batch_size`` is global); a call is as slow as
its slowest rank, so each block's time is the maximum over ranks:

    torchrun --standalone --nproc_per_node 2 tools/bench_lookup.py --sharded --out runs/bench_lookup_sharded.json
"""

import argparse
import copy
import gc
import json
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig, SyntheticField
from shark_torchrec.quant import RowwiseMixedEmbeddingBagCollection, assign_by_fractions, quantize_rows
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.quant.shared_rows import cluster_rows
from shark_torchrec.quant.tiers import TIER_ORDER, Tier

MIXES = {
    "mixed 10/30/60 fp16/int8/int4": {"fp16": 0.1, "int8": 0.3, "int4": 0.6},
    "mixed 20/80 fp16/int8": {"fp16": 0.2, "int8": 0.8},
}
#: A mix with SHARED rows (issue 21): the least-used 30% of each table's rows read as one of its
#: K centroids (a k-means of the rows weighted by their id counts), storing only the id map.
SHARED_MIX = ("mixed 10/30/30/30 fp16/int8/int4/shared", {"fp16": 0.1, "int8": 0.3, "int4": 0.3, "int2": 0.3}, 256)
FP32 = "torchrec fp32 EmbeddingBagCollection"
INT8 = "fbgemm uniform int8"


def _with_kernel(m: RowwiseMixedEmbeddingBagCollection, on: bool) -> Callable:
    def call(kjt):
        if m.use_cpu_kernel != on:  # the variants share the module; nn.Module.__setattr__ costs µs
            m.use_cpu_kernel = on
        return m(kjt).values()
    return call


def _shared_mix(fp32: EmbeddingBagCollection, tables, counts, fractions, k: int, row_alignment: int
                ) -> RowwiseMixedEmbeddingBagCollection:
    """The tiers of ``fractions`` by id counts, the INT2 share's rows then SHARED: ``k``
    centroids per table, weighted by the counts."""
    a = assign_by_fractions(counts, {t.name: t.embedding_dim for t in tables}, fractions, row_alignment)
    tiers, shared = {}, {}
    for t in tables:
        tiers[t.name] = a.tiers[t.name].clone()
        tiers[t.name][tiers[t.name] == TIER_ORDER.index(Tier.INT2)] = TIER_ORDER.index(Tier.SHARED)
        shared[t.name] = cluster_rows(fp32.embedding_bags[t.name].weight.detach(), counts[t.name], k)
    return RowwiseMixedEmbeddingBagCollection.from_weights(
        tables, {t.name: fp32.embedding_bags[t.name].weight for t in tables}, tiers, row_alignment=row_alignment,
        shared=shared)


def build_case(name: str, cfg: SyntheticConfig, dim: int, batch_size: int, iters: int, args, device) -> Dict:
    """Tables, batches and every variant of one shape."""
    id_dtype = torch.int32 if args.int32 else torch.int64
    data = SyntheticClickDataset(cfg, batch_size, args.batches, id_dtype=id_dtype)
    batches = [b.sparse_features.to(device) for b in data]
    dense = [b.dense_features.to(device) for b in data]
    tables = [EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=dim, num_embeddings=f.cardinality,
                                 feature_names=[f.name]) for f in cfg.fields]
    print(f"building {name}: {len(tables)} x {max(t.num_embeddings for t in tables):,} x {dim}", flush=True)
    fp32 = EmbeddingBagCollection(tables=tables, device=device)

    # Priorities: id counts over a separate sample of batches.
    sample = SyntheticClickDataset(cfg, batch_size, 4, batch_offset=1000).global_batch
    counts = {t.name: torch.zeros(t.num_embeddings) for t in tables}
    for g in range(4):
        kjt = sample(g).sparse_features
        for t in tables:
            v = kjt[t.feature_names[0]].values().long()
            counts[t.name].index_add_(0, v, torch.ones(v.numel()))

    variants: Dict[str, Callable] = {FP32: lambda kjt: fp32(kjt).values()}
    inputs: Dict[str, List] = {}
    bytes_of = {FP32: sum(p.numel() * p.element_size() for p in fp32.parameters())}
    for tier, dt in ((Tier.FP16, DataType.FP16), (Tier.INT8, DataType.INT8), (Tier.INT4, DataType.INT4)):
        v = f"fbgemm uniform {tier.value}"
        q = QuantEBC(tables=[EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim,
                                                num_embeddings=t.num_embeddings,
                                                feature_names=t.feature_names, data_type=dt)
                             for t in tables], is_weighted=False, device=device,
                     row_alignment=args.row_alignment)
        for tbe in q._emb_modules:
            tbe.bounds_check_mode_int = BoundsCheckMode.NONE.value  # same as the mixed module
            for spec, (w, sb) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
                qw, qsb = quantize_rows(fp32.embedding_bags[spec[0]].weight.cpu(), tier)
                w.copy_(qw.to(w.device))
                if sb is not None:
                    sb.copy_(qsb.to(sb.device))
        variants[v] = (lambda m: lambda kjt: m(kjt).values())(q)
        bytes_of[v] = sum(int(tbe.weights_host.numel() + tbe.weights_dev.numel() + tbe.weights_uvm.numel())
                          for tbe in q._emb_modules)
    mixes = dict(MIXES)
    if device.type == "cuda":
        # INT2 rows take a second, fp16-output FBGEMM call on CUDA (see _MixedGroup._lookups).
        mixes["mixed 10/30/40/20 fp16/int8/int4/int2"] = {"fp16": 0.1, "int8": 0.3, "int4": 0.4, "int2": 0.2}
    groups = max(1, min(torch.get_num_threads(), len(tables)))
    first_mixed = None
    if device.type == "cpu":
        mixes[SHARED_MIX[0]] = SHARED_MIX[1]
    for label, fractions in mixes.items():
        if label == SHARED_MIX[0]:
            m = _shared_mix(fp32, tables, counts, fractions, SHARED_MIX[2], args.row_alignment)
        else:
            a = assign_by_fractions(counts, {t.name: dim for t in tables}, fractions, args.row_alignment)
            m = RowwiseMixedEmbeddingBagCollection.from_float(fp32, a, check_ids=True)
        first_mixed = first_mixed or m
        size = m.memory_report()["total_bytes"]
        if device.type == "cpu" and label == SHARED_MIX[0]:  # the fused kernel only
            variants[f"{label}, fused CPU kernel"] = _with_kernel(m, True)
            bytes_of[f"{label}, fused CPU kernel"] = size
            continue
        if device.type == "cpu":
            variants[f"{label}, fused CPU kernel"] = _with_kernel(m, True)
            bytes_of[f"{label}, fused CPU kernel"] = size
            variants[f"{label}, FBGEMM bucketize + TBE, 1 group"] = _with_kernel(m, False)
            bytes_of[f"{label}, FBGEMM bucketize + TBE, 1 group"] = size
            if groups > 1:
                mg = RowwiseMixedEmbeddingBagCollection.from_float(fp32, a, check_ids=True, num_groups=groups)
                key = f"{label}, FBGEMM bucketize + TBE, {groups} groups in threads"
                variants[key] = _with_kernel(mg, False)
                bytes_of[key] = mg.memory_report()["total_bytes"]
        else:
            variants[f"{label}, remap in forward"] = _with_kernel(m, False)
            bytes_of[f"{label}, remap in forward"] = size
            unchecked = RowwiseMixedEmbeddingBagCollection.from_float(fp32, a, check_ids=False)
            key = f"{label}, remap in forward, ids unchecked (no host sync)"
            variants[key] = _with_kernel(unchecked, False)
            bytes_of[key] = size
        key = f"{label}, remap in input transform (only the lookup timed)"
        inputs[key] = [m.input_transform(k) for k in batches]
        variants[key] = _with_kernel(m, False)
        bytes_of[key] = size

    # Model level: the same DLRM (dense and over arch) around either collection.
    dlrm = DLRM(embedding_bag_collection=fp32, dense_in_features=dense[0].shape[1],
                dense_arch_layer_sizes=[2 * dim, dim], over_arch_layer_sizes=[2 * dim, 1]).to(device).eval()
    dlrm_mixed = copy.copy(dlrm)  # shares the dense layers; only the collection differs
    dlrm_mixed.sparse_arch = copy.copy(dlrm.sparse_arch)
    dlrm_mixed.sparse_arch.embedding_bag_collection = first_mixed
    first_mixed.use_cpu_kernel = True
    model_variants = {"DLRM forward, fp32 collection": dlrm,
                      f"DLRM forward, {next(iter(MIXES))} collection": dlrm_mixed}
    for v, model in model_variants.items():
        variants[v] = (lambda model: lambda i: model(dense[i], batches[i]))(model)
        inputs[v] = list(range(len(batches)))
        bytes_of[v] = bytes_of[FP32] if "fp32" in v else first_mixed.memory_report()["total_bytes"]
    ids_per_batch = statistics.mean(k.values().numel() for k in batches)
    return {"name": name, "batches": batches, "variants": variants, "inputs": inputs,
            "bytes": bytes_of, "bags": batch_size * len(tables), "ids": ids_per_batch,
            "tables": len(tables), "rows": [t.num_embeddings for t in tables], "dim": dim,
            "batch_size": batch_size, "iters": iters}


def time_case(case: Dict, args, device) -> Dict[str, List[float]]:
    """Per variant, the median seconds per call of each timed block, blocks in the same order
    for every variant (so entry i of two variants was timed within milliseconds).

    The variants take turns in short blocks — one untimed call (which brings the variant's hot
    rows back into the caches the other variants used), then ``ceil(iters / blocks)`` timed
    calls — in an order reversed every block; ``--blocks`` blocks per round, ``--rounds``
    timed rounds after a warm-up round.  A shared host drifts (2-4x slower for minutes at a
    time, and its last-level cache shared with other tenants): ratios are taken block by
    block, between calls made milliseconds apart, not between whole runs of each variant."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    names = list(case["variants"])
    per_block = max(1, -(-case["iters"] // args.blocks))
    blocks: Dict[str, List[float]] = {v: [] for v in names}
    with torch.no_grad():
        for r in range(args.rounds + 1):  # round 0 warms up
            calls = 0
            gc.collect()
            gc.disable()
            try:
                for blk in range(args.blocks):
                    for v in (names if blk % 2 == 0 else names[::-1]):
                        fn = case["variants"][v]
                        inputs = case["inputs"].get(v, case["batches"])
                        times = []
                        for j in range(per_block + 1):
                            x = inputs[(calls + j) % len(inputs)]
                            sync()
                            t0 = time.perf_counter()
                            fn(x)
                            sync()
                            if j:
                                times.append(time.perf_counter() - t0)
                        if r:
                            blocks[v].append(statistics.median(times))
                    calls += per_block + 1
            finally:
                gc.enable()
    return blocks


def _quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[round(q * (len(xs) - 1))]


def _ratio(base: List[float], v: List[float]) -> Dict[str, float]:
    """Speed of ``v`` over ``base``: the median of the per-block ratios and their interquartile
    range."""
    ratios = [b / t for b, t in zip(base, v)]
    return {"median": statistics.median(ratios), "p25": _quantile(ratios, 0.25),
            "p75": _quantile(ratios, 0.75), "min": min(ratios), "max": max(ratios), "blocks": len(ratios)}


def _fmt(r: Dict[str, float]) -> str:
    return f"{r['median']:.2f} ({r['p25']:.2f}–{r['p75']:.2f})"


def build_sharded_case(name: str, cfg: SyntheticConfig, dim: int, batch_size: int, iters: int, args) -> Dict:
    """The sharded fp32 collection and its sharded mixed conversions, on this rank's part of
    each global batch (a collective: every rank builds the same case)."""
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from shark_torchrec.quant import RowwiseQuantConfig
    from shark_torchrec.sharded import Comm, quantize_sharded

    rank, world = dist.get_rank(), dist.get_world_size()
    local = batch_size // world
    id_dtype = torch.int32 if args.int32 else torch.int64
    data = SyntheticClickDataset(cfg, local, args.batches, rank=rank, world_size=world, id_dtype=id_dtype)
    batches = [b.sparse_features for b in data]
    tables = [EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=dim, num_embeddings=f.cardinality,
                                 feature_names=[f.name]) for f in cfg.fields]
    if rank == 0:
        print(f"building {name} ({args.sharding_type} over {world}): {len(tables)} x "
              f"{max(t.num_embeddings for t in tables):,} x {dim}", flush=True)
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    kind = {"table_wise": lambda i: table_wise(rank=i % world), "row_wise": lambda i: row_wise()}[args.sharding_type]
    plan = construct_module_sharding_plan(ebc, {t.name: kind(i) for i, t in enumerate(tables)}, world_size=world,
                                          device_type="cpu")
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}),
                                   sharders=[EmbeddingBagCollectionSharder()],
                                   env=ShardingEnv.from_process_group(dist.GroupMember.WORLD))
    fp32 = dmp._dmp_wrapped_module
    fp32.eval()
    # Priorities: id counts over a separate sample of global batches (small: one vector per table).
    sample = SyntheticClickDataset(cfg, batch_size, 4, batch_offset=1000).global_batch
    counts = {t.name: torch.zeros(t.num_embeddings, dtype=torch.float64) for t in tables}
    for g in range(4):
        kjt = sample(g).sparse_features
        for t in tables:
            v = kjt[t.feature_names[0]].values().long()
            counts[t.name].index_add_(0, v, torch.ones(v.numel(), dtype=torch.float64))

    def fp32_call(kjt):
        return fp32(kjt).wait().values()

    variants: Dict[str, Callable] = {FP32: fp32_call}
    comm = Comm()
    for label, fractions in MIXES.items():
        mixed, _ = quantize_sharded(fp32, RowwiseQuantConfig(fractions=fractions, row_alignment=args.row_alignment),
                                    lambda t, r0, n: counts[t][r0:r0 + n], comm)
        variants[f"{label}, sharded, fused CPU kernel per shard"] = (lambda m: lambda kjt: m(kjt).values())(mixed)
    ids_per_batch = statistics.mean(k.values().numel() for k in batches)
    return {"name": name, "batches": batches, "variants": variants, "inputs": {}, "bags": local * len(tables),
            "ids": ids_per_batch, "tables": len(tables), "rows": [t.num_embeddings for t in tables], "dim": dim,
            "batch_size": batch_size, "iters": iters}


def sharded_main(args, big: SyntheticConfig, pipeline: SyntheticConfig, shapes: List[str]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    cases = []
    if "benchmark" in shapes:
        cases.append(build_sharded_case("benchmark shape", big, args.dim, args.batch_size, args.iters, args))
    if "pipeline" in shapes:
        cases.append(build_sharded_case("pipeline shape", pipeline, args.pipeline_dim, args.pipeline_batch_size,
                                        args.pipeline_iters, args))
    result = {"config": vars(args), "world_size": dist.get_world_size(), "cases": []}
    lines = []
    for case in cases:
        blocks = time_case(case, args, torch.device("cpu"))
        names = list(case["variants"])
        packed = torch.tensor([blocks[v] for v in names], dtype=torch.float64)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)  # a sharded call is as slow as its slowest rank
        blocks = {v: packed[i].tolist() for i, v in enumerate(names)}
        rows = [{"variant": v, "ms_per_batch": 1e3 * statistics.median(blocks[v]),
                 "speed_vs_fp32": _ratio(blocks[FP32], blocks[v]), "ms_per_block": [1e3 * t for t in blocks[v]]}
                for v in names]
        result["cases"].append({"case": case["name"], "sharding_type": args.sharding_type, "tables": case["tables"],
                                "rows": case["rows"], "dim": case["dim"], "global_batch_size": case["batch_size"],
                                "ids_per_rank_batch": case["ids"], "results": rows})
        lines.append(f"\n{case['name']}, sharded {args.sharding_type} over {dist.get_world_size()} processes "
                     f"(1 thread each; {case['tables']} tables x {max(case['rows']):,} rows x dim {case['dim']}, "
                     f"global batch {case['batch_size']}, {case['ids']:,.0f} ids per rank):\n")
        lines.append("| variant | ms / batch (slowest rank) | speed vs sharded fp32 (IQR over blocks) |")
        lines.append("|---|---|---|")
        for r in rows:
            lines.append(f"| {r['variant']} | {r['ms_per_batch']:.3f} | {_fmt(r['speed_vs_fp32'])} |")
    if rank == 0:
        print("\n".join(lines), flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--pooling_factor", type=int, default=20)
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--pipeline_tables", type=int, default=26)
    p.add_argument("--pipeline_rows", type=int, default=20_000)
    p.add_argument("--pipeline_dim", type=int, default=16)
    p.add_argument("--pipeline_batch_size", type=int, default=512)
    p.add_argument("--batches", type=int, default=6, help="distinct batches, cycled")
    p.add_argument("--iters", type=int, default=10, help="timed calls per variant per round, benchmark shape")
    p.add_argument("--pipeline_iters", type=int, default=100,
                   help="timed calls per variant per round, pipeline shape (its calls take well under a ms)")
    p.add_argument("--blocks", type=int, default=10,
                   help="blocks per round: the variants take turns block by block, each block one "
                   "untimed call then its share of the round's timed calls")
    p.add_argument("--rounds", type=int, default=5,
                   help="timed rounds (after a warm-up round), each --blocks blocks")
    p.add_argument("--threads", default="1,default",
                   help="torch thread settings to time, comma-separated ('default': as started)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--int32", action="store_true", help="int32 ids (default int64)")
    p.add_argument("--row_alignment", type=int, choices=[16, 1], default=16,
                   help="bytes the quantized rows (uniform and mixed) are padded to: 16 (TorchRec's "
                   "quantized collection, GPUs) or 1 (FBGEMM's CPU layout)")
    p.add_argument("--shapes", default="benchmark,pipeline", help="shapes to time, comma-separated")
    p.add_argument("--out", default="runs/bench_lookup.json")
    p.add_argument("--sharded", action="store_true",
                   help="under torchrun: the sharded fp32 collection against the sharded mixed one")
    p.add_argument("--sharding_type", choices=["table_wise", "row_wise"], default="table_wise",
                   help="--sharded: how every table is sharded")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    settings = [default_threads if s == "default" else int(s) for s in args.threads.split(",")]
    if device.type == "cpu" and not cpu_kernel_available():
        raise SystemExit("the mixed collection's CPU kernel could not be built (see the warning)")

    big = SyntheticConfig(fields=[SyntheticField(f"f{i}", args.rows, args.zipf, args.pooling_factor,
                                                 args.pooling_factor) for i in range(args.tables)],
                          informative=[], num_dense=13, seed=0)
    pipeline = SyntheticConfig.default(num_fields=args.pipeline_tables, cardinality=args.pipeline_rows,
                                       num_dense=13, seed=0)
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - {"benchmark", "pipeline"})
    if unknown:
        p.error(f"--shapes: unknown {unknown} (known: benchmark, pipeline)")
    if args.sharded:
        sharded_main(args, big, pipeline, shapes)
        return
    cases = []
    if "benchmark" in shapes:
        cases.append(build_case("benchmark shape", big, args.dim, args.batch_size, args.iters, args, device))
    if "pipeline" in shapes:
        cases.append(build_case("pipeline shape", pipeline, args.pipeline_dim, args.pipeline_batch_size,
                                args.pipeline_iters, args, device))

    result = {"config": vars(args), "device": str(device),
              "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "default_threads": default_threads, "cases": []}
    lines = []
    for case in cases:
        for threads in settings:
            torch.set_num_threads(threads)
            blocks = time_case(case, args, device)
            rows = []
            for v in case["variants"]:
                base = "DLRM forward, fp32 collection" if v.startswith("DLRM") else FP32
                ms = statistics.median(blocks[v])
                rows.append({"variant": v, "ms_per_batch": 1e3 * ms,
                             "bags_per_s": case["bags"] / ms, "bytes": case["bytes"][v],
                             "speed_vs_fp32": _ratio(blocks[base], blocks[v]),
                             "speed_vs_int8": None if v.startswith("DLRM") else _ratio(blocks[INT8], blocks[v]),
                             "bytes_vs_fp32": case["bytes"][v] / case["bytes"][FP32],
                             "ms_per_block": [1e3 * t for t in blocks[v]]})
            result["cases"].append({"case": case["name"], "threads": threads, "tables": case["tables"],
                                    "rows": case["rows"], "dim": case["dim"],
                                    "batch_size": case["batch_size"], "ids_per_batch": case["ids"],
                                    "results": rows})
            lines.append(f"\n{case['name']} ({case['tables']} tables x {max(case['rows']):,} rows x dim "
                         f"{case['dim']}, batch {case['batch_size']}, {case['ids']:,.0f} ids), "
                         f"{threads} torch thread{'s' if threads > 1 else ''}:\n")
            lines.append("| variant | ms / batch | M bags/s | MiB | speed vs fp32 (IQR over blocks) | "
                         "speed vs uniform int8 (IQR) | bytes vs fp32 |")
            lines.append("|---|---|---|---|---|---|---|")
            for r in rows:
                vs8 = "" if r["speed_vs_int8"] is None else _fmt(r["speed_vs_int8"])
                lines.append(f"| {r['variant']} | {r['ms_per_batch']:.3f} | {r['bags_per_s'] / 1e6:.2f} | "
                             f"{r['bytes'] / 2**20:.1f} | {_fmt(r['speed_vs_fp32'])} | {vs8} | "
                             f"{r['bytes_vs_fp32']:.3f} |")
            print("\n".join(lines[-len(rows) - 3:]), flush=True)
    torch.set_num_threads(default_threads)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwritten: {args.out}, {md}")


if __name__ == "__main__":
    main()
    if os.environ.get("WORLD_SIZE"):  # under torchrun: skip the finalization that can abort (exit_worker)
        from shark_torchrec.training.distributed import exit_worker

        exit_worker(0)
