#!/usr/bin/env python
"""Compressing a sharded model as its tables grow: time and peak memory per rank.

For each total size of fp32 tables (``--sizes_gib``), a collection of ``--tables`` tables of
dim ``--dim`` is sharded row-wise over ``--nproc`` processes by TorchRec's
``DistributedModelParallel`` (under ``torchrun``), and compressed to a byte budget
(``--budget_fraction``) with random row priorities:

* ``sharded`` (what the pipeline does): each rank assigns the tiers of its rows and converts
  its own shards (:func:`shark_torchrec.sharded.quantize_sharded`);
* ``gathered`` (what the pipeline did before): every table gathered whole on rank 0
  (``full_state_dict``), then ``quantize_`` there.

Per rank it records the time of the tier assignment and of the conversion, its own shards'
fp32 bytes, the resident memory before the model was built (the fixed overhead: Python,
torch, TorchRec), and the peak resident memory during the compression alone (Linux's VmHWM,
reset before it starts).  ``--mem_cap_gib`` runs every process under a memory cap (a cgroup
of its own; exceeding it is an out-of-memory kill), to show a model whose fp32 tables exceed
the cap compressed sharded where the gathering version is killed.

    python tools/bench_sharded_compress.py --out runs/bench_sharded_compress
    python tools/bench_sharded_compress.py --sizes_gib 8 --gathered_sizes_gib 8 --mem_cap_gib 6.5 \\
        --out runs/bench_sharded_cap
    python tools/bench_sharded_compress.py --tiers fp16,int8,int4,int2,shared --gathered_sizes_gib "" \\
        --out runs/bench_sharded_shared
    python tools/bench_sharded_compress.py --row_fit lsq --gathered_sizes_gib "" --out runs/bench_sharded_lsq

Writes ``OUT/results.json``, ``OUT/summary.md`` (the table for BENCHMARKS.md) and
``OUT/scale.png`` (time and peak memory per rank against the tables' size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


# ------------------------------------------------------------------------------ worker
def _sample_rows(text: str):
    """``--shared_sample_rows``: a row count, ``none`` (every row) or ``default``."""
    from shark_torchrec.quant import RowwiseQuantConfig

    if text == "default":
        return RowwiseQuantConfig.shared_sample_rows
    return None if text == "none" else int(text)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _join_memory_cap(cap_bytes: int) -> None:
    """Put this process in a memory cgroup of its own capped at ``cap_bytes`` (v1 or v2)."""
    for base, limit in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        if os.path.isfile(os.path.join(base, limit)) or os.path.isdir(os.path.join(base, "cgroup.procs")):
            path = os.path.join(base, f"shark_bench_{os.getpid()}")
            try:
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, limit), "w") as f:
                    f.write(str(cap_bytes))
                with open(os.path.join(path, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                return
            except OSError:
                continue
    raise SystemExit("--mem_cap_gib: no writable memory cgroup on this machine")


def worker(args) -> None:
    if args.mem_cap_gib:
        _join_memory_cap(int(args.mem_cap_gib * GIB))
    import torch
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from shark_torchrec.quant import RowwiseQuantConfig
    from shark_torchrec.sharded import Comm
    from shark_torchrec.sharded.layout import collection_layout
    from shark_torchrec.quant.cpu_kernel import cpu_kernel_available

    dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    cpu_kernel_available()  # built (once per machine) before anything is timed
    # One tiny conversion first: FBGEMM's inference TBE takes ~0.4 s to set up the first time
    # in a process (a fixed cost, which a pipeline has paid long before it compresses).
    from shark_torchrec.quant import TIER_ORDER, RowwiseMixedEmbeddingBagCollection, Tier

    RowwiseMixedEmbeddingBagCollection.from_weights(
        [EmbeddingBagConfig(name="w", embedding_dim=8, num_embeddings=4, feature_names=["w"])],
        {"w": torch.zeros(4, 8)},
        {"w": torch.tensor([TIER_ORDER.index(Tier(t)) for t in ("fp16", "int8", "int4", "drop")], dtype=torch.int8)})
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = int(args.size_gib * GIB / (4 * args.dim * args.tables))
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=rows,
                                 feature_names=[f"f{i}"]) for i in range(args.tables)]
    rss_libs = _rss_kib("VmRSS")  # libraries loaded, no table yet: the fixed overhead
    t0 = time.perf_counter()
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    plan = construct_module_sharding_plan(ebc, {t.name: row_wise() for t in tables}, world_size=world,
                                          device_type="cpu")
    sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.01})
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}),
                                   sharders=[sharder], env=ShardingEnv.from_process_group(dist.GroupMember.WORLD))
    sharded = dmp._dmp_wrapped_module
    layout, weights = collection_layout(sharded, rank, world)
    with torch.no_grad():  # random rows, each rank its own
        g = torch.Generator().manual_seed(rank)
        for w in weights.values():
            # --rows clustered: drawn around 2,000 centres per shard (the budget then takes
            # K = 1,024 centroids, where uniform rows take 1: the SHARED tier's costliest case)
            centres = torch.empty(2000, w.shape[1]).uniform_(-0.05, 0.05, generator=g)
            for r0 in range(0, w.shape[0], 1 << 20):
                part = w[r0:r0 + (1 << 20)]
                if args.rows == "clustered":
                    part.copy_(centres[torch.randint(2000, (part.shape[0],), generator=g)])
                    part.add_(torch.empty_like(part).normal_(0.0, 0.002, generator=g))
                else:
                    part.uniform_(-0.05, 0.05, generator=g)
    build_seconds = time.perf_counter() - t0
    shard_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    comm = Comm()
    # The priorities of the rows each rank decides, ready before the clock starts (the
    # pipeline reads them from its sharded row counters: RowPriority.rows).
    gp = torch.Generator().manual_seed(100 + rank)
    ready = {(g.table, g.row_offset): torch.rand(g.rows, generator=gp, dtype=torch.float64) ** 4
             for t in layout.tables for g in layout.row_groups(t["name"]) if g.leader == rank}

    def priorities(t, r0, n):
        return ready[(t, r0)]

    config = RowwiseQuantConfig(budget_fraction=args.budget_fraction, row_alignment=1,
                                tiers=[t for t in args.tiers.split(",") if t], row_fit=args.row_fit,
                                shared_sample_rows=_sample_rows(args.shared_sample_rows))
    dist.barrier()
    rss_before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak below is the compression's
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    if args.mode == "sharded":
        from shark_torchrec.sharded import assign_tiers_sharded, build_sharded_collection

        a = assign_tiers_sharded(layout, weights, config, priorities, comm)
        timings["assign_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        mixed = build_sharded_collection(layout, weights, a.tiers, config.row_alignment, comm, shared=a.shared,
                                         row_fit=a.row_fit)
        timings["convert_s"] = time.perf_counter() - t1
        held = sum(m.memory_report()["total_bytes"] for m in (mixed.routed, mixed.replicated) if m is not None)
    else:
        from shark_torchrec.quant import quantize_
        from shark_torchrec.training.gather import full_state_dict

        full = full_state_dict(dmp)
        timings["gather_s"] = time.perf_counter() - t0
        held = 0
        if rank == 0:
            plain = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
            plain = plain.to_empty(device=torch.device("cpu"))
            plain.load_state_dict({k: v for k, v in full.items()})
            del full
            p = {t.name: torch.rand(rows, generator=gp, dtype=torch.float64) ** 4 for t in tables}
            t1 = time.perf_counter()
            mixed = quantize_(plain, config, priorities=p)
            timings["quantize_s"] = time.perf_counter() - t1
            held = mixed.memory_report()["total_bytes"]
        dist.barrier()
    timings["total_s"] = time.perf_counter() - t0
    result = {"rank": rank, "world": world, "size_gib": args.size_gib, "rows_per_table": rows,
              "shard_bytes": shard_bytes, "rss_libs_kib": rss_libs, "rss_before_kib": rss_before,
              "peak_kib": _rss_kib("VmHWM"), "build_s": build_seconds, "held_bytes": held, **timings}
    results = comm.all_gather_object(result)
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------------------ driver
def _remove_cgroups() -> None:
    """The memory cgroups the workers made (empty once they have exited)."""
    for base in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        if os.path.isdir(base):
            for name in os.listdir(base):
                if name.startswith("shark_bench_"):
                    try:
                        os.rmdir(os.path.join(base, name))
                    except OSError:
                        pass


def run_size(args, size: float, mode: str) -> Dict:
    result = os.path.join(args.out, f"{mode}_{size:g}.json")
    if os.path.exists(result):
        os.remove(result)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           os.path.abspath(__file__), "--worker", "--mode", mode, "--size_gib", str(size), "--tables",
           str(args.tables), "--dim", str(args.dim), "--budget_fraction", str(args.budget_fraction),
           "--threads", str(args.threads), "--tiers", args.tiers, "--row_fit", args.row_fit, "--result", result,
           "--rows", args.rows, "--shared_sample_rows", args.shared_sample_rows]
    if args.mem_cap_gib:
        cmd += ["--mem_cap_gib", str(args.mem_cap_gib)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    wall = time.perf_counter() - t0
    if args.mem_cap_gib:
        _remove_cgroups()
    if proc.returncode != 0 or not os.path.exists(result):
        killed = "SIGKILL" in proc.stderr or "-9" in proc.stderr or "exitcode  : -9" in proc.stderr
        print(f"  {mode} {size:g} GiB: FAILED ({'killed: out of memory' if killed else 'rc ' + str(proc.returncode)})",
              flush=True)
        return {"mode": mode, "size_gib": size, "failed": True, "killed": killed, "wall_s": wall,
                "stderr_tail": proc.stderr[-2000:]}
    with open(result) as f:
        ranks = json.load(f)
    print(f"  {mode} {size:g} GiB: " + ", ".join(_describe(r) for r in ranks), flush=True)
    return {"mode": mode, "size_gib": size, "failed": False, "wall_s": wall, "ranks": ranks}


def _describe(r: Dict) -> str:
    t = r.get("total_s", 0.0)
    return (f"rank {r['rank']}: {t:.1f} s, peak {r['peak_kib'] / 2**20:.2f} GiB "
            f"(shards {r['shard_bytes'] / GIB:.2f} GiB, fixed {r['rss_libs_kib'] / 2**20:.2f} GiB)")


def summarise(runs: List[Dict], args) -> str:
    lines = ["| mode | fp32 tables | rank | own shards | assign | convert | total | GiB/s per rank "
             "| peak RSS | (peak − fixed) / own shards |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        if run["failed"]:
            lines.append(f"| {run['mode']} | {run['size_gib']:g} GiB | — | — | — | — | — | — | "
                         f"{'killed at the cap' if run['killed'] else 'failed'} | — |")
            continue
        for r in run["ranks"]:
            shards = r["shard_bytes"] / GIB
            peak = r["peak_kib"] / 2**20
            fixed = r["rss_libs_kib"] / 2**20
            total = r["total_s"]
            if run["mode"] == "sharded":
                rate = f"{shards / total:.2f}" if shards / total >= 0.1 else f"{shards / total:.2g}"
                parts = f"{r['assign_s']:.1f} s | {r['convert_s']:.1f} s"
            else:
                rate = f"{run['size_gib'] / total:.2f} (rank 0 alone)" if r["rank"] == 0 else "—"
                parts = f"gather {r['gather_s']:.1f} s | quantize_ {r.get('quantize_s', 0):.1f} s"
            lines.append(f"| {run['mode']} | {run['size_gib']:g} GiB | {r['rank']} | {shards:.2f} GiB | {parts} | "
                         f"{total:.1f} s | {rate} | {peak:.2f} GiB | {(peak - fixed) / shards:.2f} |")
    return "\n".join(lines)


def plot(runs: List[Dict], path: str, title: str = "Compressing a sharded collection: time and memory per rank "
         "(2 processes)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, colour in (("sharded", "#1f77b4"), ("gathered", "#d62728")):
        ok = [r for r in runs if r["mode"] == mode and not r["failed"]]
        if not ok:
            continue
        sizes = [r["size_gib"] for r in ok]
        a.plot(sizes, [max(x["total_s"] for x in r["ranks"]) for r in ok], "o-", color=colour,
               label=f"{mode}" + (" (rank 0 alone)" if mode == "gathered" else ""))
        b.plot(sizes, [max(x["peak_kib"] for x in r["ranks"]) / 2**20 for r in ok], "o-", color=colour,
               label=f"{mode}: peak RSS (largest rank)")
        if mode == "sharded":
            b.plot(sizes, [max(x["shard_bytes"] for x in r["ranks"]) / GIB for r in ok], "o--", color="grey",
                   label="own shards' fp32 (per rank)")
    a.set_xlabel("fp32 tables, all ranks (GiB)")
    a.set_ylabel("compression time, slowest rank (s)")
    b.set_xlabel("fp32 tables, all ranks (GiB)")
    b.set_ylabel("GiB per rank")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes_gib", default="0.25,0.5,1,2,4,8,12", help="sizes compressed sharded")
    p.add_argument("--gathered_sizes_gib", default="0.25,0.5,1,2",
                   help="sizes compressed the gathering way (rank 0 holds about 5x the whole model: "
                   "keep them small, or cap the memory)")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--budget_fraction", type=float, default=0.15)
    p.add_argument("--tiers", default="fp16,int8,int4,int2,drop",
                   help="tiers the budget may use (with shared: the centroids' k-means and "
                   "assignment passes are part of the tier assignment)")
    p.add_argument("--row_fit", choices=["minmax", "lsq"], default="minmax",
                   help="integer rows' scale and bias: FBGEMM's (minmax) or least-squares fitted")
    p.add_argument("--rows", choices=["random", "clustered"], default="random",
                   help="the tables' rows: uniform random, or drawn around 2,000 centres per shard")
    p.add_argument("--shared_sample_rows", default="default",
                   help="RowwiseQuantConfig.shared_sample_rows: rows per group on which the SHARED "
                   "tier's centroid count is chosen (a count, 'none': every row, or 'default')")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--mem_cap_gib", type=float, help="memory cap per process (a cgroup each)")
    p.add_argument("--out", default="runs/bench_sharded_compress")
    # worker mode (launched by the driver under torchrun)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="sharded", help=argparse.SUPPRESS)
    p.add_argument("--size_gib", type=float, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for mode, sizes in (("sharded", args.sizes_gib), ("gathered", args.gathered_sizes_gib)):
        for size in [float(x) for x in sizes.split(",") if x]:
            runs.append(run_size(args, size, mode))
    summary = summarise(runs, args)
    command = "python tools/bench_sharded_compress.py " + " ".join(sys.argv[1:])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "runs": runs}, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"`{command}`\n\n{summary}\n")
    plot(runs, os.path.join(args.out, "scale.png"))
    print(summary)


if __name__ == "__main__":
    main()
