#!/usr/bin/env python
"""Cost of SHARK's trackers on a sharded DLRM training step: what the pipeline attaches, and
each piece alone.

Measures the median time of a training step (forward, backward, fused embedding update, dense
optimizer step) without trackers and with:

* ``pipeline``: exactly what ``recipes/shark_dlrm.py`` attaches while training — a
  ``TaylorFieldImportance`` (``--baseline``, default ``mean``; its gradient scales come from the
  same hook) and one ``RowPriority`` with the pipeline's four row-count channels;
* ``taylor (<baseline>)``: the field tracker alone, for every baseline;
* ``row counters``: the ``RowPriority`` alone (its own time in its hook is reported per step too);

on the same model and batches, the variants interleaved round by round so that machine noise
hits them alike.  Each is reported as a ratio to the untracked step of the same run; under
``torchrun`` a step counts as long as its slowest rank.

    python tools/bench_importance_overhead.py                      # one process
    torchrun --standalone --nproc_per_node 2 tools/bench_importance_overhead.py

Writes JSON (``--out``) and prints a Markdown table for BENCHMARKS.md.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.importance import BASELINES, RowPriority, TaylorFieldImportance
from shark_torchrec.cli_run import parse_pipeline
from shark_torchrec.pipeline import _row_counters
from shark_torchrec.training import DLRMConfig, DLRMTrainer, OptimConfig, init_distributed
from shark_torchrec.training.distributed import destroy_distributed, exit_worker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2048, help="global batch")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--baseline", default="mean", choices=BASELINES, help="the pipeline's field-tracker baseline")
    p.add_argument("--out", default="runs/bench_importance_overhead.json")
    args = p.parse_args()

    env = init_distributed("auto")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
    cfg = SyntheticConfig.default(num_fields=args.fields, num_informative=min(6, args.fields),
                                  cardinality=args.rows, multi_hot_fields=min(4, args.fields),
                                  max_hot=10)
    config = DLRMConfig(feature_names=cfg.feature_names,
                        num_embeddings_per_feature=cfg.num_embeddings_per_feature,
                        embedding_dim=args.dim, dense_arch_layer_sizes=(256, args.dim),
                        over_arch_layer_sizes=(256, 128, 1))
    local = args.batch_size // env.world_size
    trainer = DLRMTrainer(config, OptimConfig(), env, local)
    data = SyntheticClickDataset(cfg, local, 8, rank=env.rank, world_size=env.world_size)
    batches = [b.to(env.device) for b in data]

    channels = _row_counters(parse_pipeline([]).quant)  # the pipeline's defaults
    counters = RowPriority(config.tables(), channels=channels)
    taylor = {b: TaylorFieldImportance(trainer.model, baseline=b) for b in BASELINES}
    variants = {
        "none": [],
        f"pipeline (taylor {args.baseline} + row counters)": [taylor[args.baseline], counters],
        **{f"taylor ({b})": [taylor[b]] for b in BASELINES},
        "row counters": [counters],
    }

    def attach(trackers):
        for t in trackers:
            t.attach(trainer.model) if isinstance(t, RowPriority) else t.attach()

    def detach(trackers):
        for t in trackers:
            t.detach()

    # Variants take turns in short blocks (one untimed step, then --steps timed), their order
    # reversed every round; a variant's cost is its block's median step over the untracked
    # block's of the same round (steps a second apart: the machine's drift, 2-4x over
    # minutes, hits both alike), summarised as the median over rounds with its IQR.  The
    # trackers' own time in their hooks is measured too: their direct cost, free of that drift.
    names = list(variants)
    block_ms = {v: [] for v in names}
    hook_ms = {v: [] for v in names}  # per timed step, the trackers' time in their hooks
    step = 0
    for r in range(args.rounds + 1):  # round 0 warms up
        for v in (names if r % 2 == 0 else names[::-1]):
            trackers = variants[v]
            attach(trackers)
            own0 = sum(t.hook_seconds if isinstance(t, TaylorFieldImportance) else t.seconds for t in trackers)
            times = []
            for j in range(args.steps + 1):
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.train_step(batches[step % len(batches)])
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                if j:
                    times.append(time.perf_counter() - t0)
                step += 1
            own = sum(t.hook_seconds if isinstance(t, TaylorFieldImportance) else t.seconds for t in trackers) - own0
            detach(trackers)
            if r > 0:
                block_ms[v].append(1e3 * statistics.median(times))
                hook_ms[v].append(1e3 * own / (args.steps + 1))
    if dist.is_initialized() and env.world_size > 1:
        # A step is as slow as its slowest rank.
        packed = torch.tensor([block_ms[v] + hook_ms[v] for v in names], dtype=torch.float64)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        n = args.rounds
        block_ms = {v: packed[i, :n].tolist() for i, v in enumerate(names)}
        hook_ms = {v: packed[i, n:].tolist() for i, v in enumerate(names)}

    def quartiles(xs):
        xs = sorted(xs)
        return statistics.median(xs), xs[len(xs) // 4], xs[(3 * len(xs)) // 4]

    rows = {}
    for v in names:
        ratios = [b / a for a, b in zip(block_ms["none"], block_ms[v])]
        direct = [h / a for a, h in zip(block_ms["none"], hook_ms[v])]
        rows[v] = {"step_ms": quartiles(block_ms[v]), "ratio": quartiles(ratios),
                   "hook_ms": quartiles(hook_ms[v]), "hook_fraction": quartiles(direct)}
    result = {"config": vars(args), "world_size": env.world_size, "device": str(env.device), "variants": rows,
              "blocks_ms": block_ms, "hook_ms": hook_ms}
    if env.is_main:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("| trackers | ms / step | step vs untracked (IQR over rounds) | in the hooks, ms / step | "
              "in the hooks / untracked step |\n|---|---|---|---|---|")
        for v in names:
            x = rows[v]
            print(f"| {v} | {x['step_ms'][0]:.1f} | {x['ratio'][0]:.3f} ({x['ratio'][1]:.3f}–{x['ratio'][2]:.3f}) | "
                  f"{x['hook_ms'][0]:.2f} | {100 * x['hook_fraction'][0]:.1f}% |")
    destroy_distributed(synchronize=True)


if __name__ == "__main__":
    main()
    exit_worker(0)  # skip interpreter finalization (see exit_worker)
