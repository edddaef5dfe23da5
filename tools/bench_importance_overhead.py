#!/usr/bin/env python
"""Cost of SHARK's field-importance tracker on a sharded DLRM training step.

Measures the median time of a training step (forward, backward, fused embedding update,
dense optimizer step) without a tracker and with a TaylorFieldImportance tracker of each
baseline attached, on the same model and batches, interleaving the variants round by round so
that machine noise hits them alike.  Reports each as a ratio to the untracked step of the
same run.

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
from shark_torchrec.importance import BASELINES, TaylorFieldImportance
from shark_torchrec.training import DLRMConfig, DLRMTrainer, OptimConfig, init_distributed
from shark_torchrec.training.distributed import destroy_distributed, exit_worker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2048, help="global batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
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

    variants = ["none", *BASELINES]
    trackers = {b: TaylorFieldImportance(trainer.model, baseline=b) for b in BASELINES}
    times = {v: [] for v in variants}
    step = 0
    for r in range(args.rounds + 1):  # round 0 warms up
        for v in variants:
            if v != "none":
                trackers[v].attach()
            for _ in range(args.steps):
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.train_step(batches[step % len(batches)])
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                if r > 0:
                    times[v].append(time.perf_counter() - t0)
                step += 1
            if v != "none":
                trackers[v].detach()
    if dist.is_initialized() and env.world_size > 1:
        # A step is as slow as its slowest rank.
        packed = torch.tensor([times[v] for v in variants], dtype=torch.float64)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        times = {v: packed[i].tolist() for i, v in enumerate(variants)}
    med = {v: statistics.median(times[v]) for v in variants}
    result = {
        "config": vars(args), "world_size": env.world_size, "device": str(env.device),
        "median_step_ms": {v: 1e3 * med[v] for v in variants},
        "ratio_to_untracked": {v: med[v] / med["none"] for v in variants},
    }
    if env.is_main:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("| tracker | ms / step | ratio to untracked |\n|---|---|---|")
        for v in variants:
            print(f"| {v} | {1e3 * med[v]:.1f} | {med[v] / med['none']:.3f} |")
    destroy_distributed(synchronize=True)


if __name__ == "__main__":
    main()
    exit_worker(0)  # skip interpreter finalization (see exit_worker)
