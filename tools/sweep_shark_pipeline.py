#!/usr/bin/env python
"""A grid of SHARK pipeline settings on one trained model: bytes saved against the paired ΔAUC.

Every grid point is one run of ``recipes/shark_dlrm.py``; points share every finished stage
whose key (its inputs and the stages before it) another point's has: one trained model for
all points that vary only prune or quantize settings, one pruned and fine-tuned model for all
points that differ only in quantization settings, so a grid costs little more than its
distinct stages.

    python tools/sweep_shark_pipeline.py --out runs/sweep_syn \\
        --grid drop_fraction=0.25,0.35,0.45 quant_budget_fraction=0.25,0.15 -- \\
        --data synthetic_criteo --batch_size 1024 --eval_split dev

Tune on the dev split (``--eval_split dev`` after ``--``), then report the chosen setting on
the test split.  Writes ``OUT/results.json``, ``OUT/summary.md`` (one row per point: bytes
saved, ΔAUC with its 95% CI, the pruning and quantization steps' ΔAUC) and
``OUT/tradeoff.png`` (bytes saved vs ΔAUC).
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

from report_io import finished_report, pipeline_stage_keys, save_results, split_recipe_args

from shark_torchrec.run_config import STAGES
from shark_torchrec.stages import StageSharing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "shark_dlrm.py")
COMPARISONS = ("compressed vs uncompressed", "pruning step (pruned vs uncompressed)",
               "quantization step (quantized vs pruned)")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def parse_grid(items: List[str]) -> Dict[str, List[str]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid {item!r}: expected name=value1,value2,...")
        grid[key.lstrip("-")] = [v for v in values.split(",") if v]
    return grid


def main() -> None:
    own, recipe_args = split_recipe_args(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", nargs="+", required=True, help="name=v1,v2 ... (recipe flags without --)")
    p.add_argument("--out", default="runs/sweep_shark_pipeline")
    args = p.parse_args(own)
    grid = parse_grid(args.grid)
    for key in grid:
        if f"--{key}" in recipe_args:
            raise SystemExit(f"--{key} is in the grid; remove it after --")
    if "--out" in recipe_args:
        raise SystemExit("--out is set by this tool; remove it after --")
    keys = list(grid)
    t0 = time.perf_counter()
    results = {"recipe_args": recipe_args, "grid": grid, "points": []}
    sharing = StageSharing(STAGES)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        name = "_".join(f"{k}={v}" for k, v in point.items()).replace("/", "-")
        run_dir = os.path.join(args.out, name)
        flags = [x for k, v in point.items() for x in (f"--{k}", v)]
        stage_keys = pipeline_stage_keys([*recipe_args, *flags])
        if not finished_report(run_dir, stage_keys):
            linked = sharing.link(run_dir, stage_keys)
            cmd = [sys.executable, RECIPE, *recipe_args, *flags, "--out", run_dir, "--log_level", "WARNING"]
            log(f"== {name}" + (f" (sharing the finished {', '.join(linked)} stage(s))" if linked else ""))
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            log(f"   {time.perf_counter() - start:.0f} s")
        sharing.finished(run_dir, stage_keys)
        with open(os.path.join(run_dir, "report.json")) as f:
            r = json.load(f)
        results["points"].append({
            "point": point, "bytes_saved": r["stages"]["quantized"]["bytes_saved_fraction"],
            "paired": {k: r["paired"][k] for k in COMPARISONS}, "eval_split": r.get("eval_split"),
            "fields_after": r["plan"]["fields_after"], "dropped": r["plan"]["dropped_features"]})
    results["wall_seconds"] = time.perf_counter() - t0
    plt = save_results(results, args.out)
    write_summary(results, args.out)
    plot(results, plt, args.out)
    log(f"wrote {args.out}/summary.md ({results['wall_seconds']:.0f} s)")


def write_summary(results: Dict, out: str) -> None:
    pts = results["points"]
    keys = list(results["grid"])
    n = pts[0]["paired"][COMPARISONS[0]]["examples"]
    lines = [f"{len(pts)} settings on one trained model; paired on the same {n:,} "
             f"{pts[0]['eval_split']} rows (95% bootstrap CIs); recipe flags: "
             f"`{' '.join(results['recipe_args'])}`; {results['wall_seconds'] / 60:.0f} min in all.", "",
             "| " + " | ".join(keys) + " | fields kept | bytes saved | ΔAUC [95% CI] | pruning step | "
             "quantization step |", "|---" * (len(keys) + 5) + "|"]
    for p in sorted(pts, key=lambda p: -p["bytes_saved"]):
        a = p["paired"][COMPARISONS[0]]
        lines.append("| " + " | ".join(str(p["point"][k]) for k in keys) +
                     f" | {p['fields_after']} | {p['bytes_saved']:.1%} | {a['delta_auc']:+.4f} "
                     f"[{a['delta_auc_ci'][0]:+.4f}, {a['delta_auc_ci'][1]:+.4f}] | "
                     f"{p['paired'][COMPARISONS[1]]['delta_auc']:+.4f} | "
                     f"{p['paired'][COMPARISONS[2]]['delta_auc']:+.4f} |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: Dict, plt, out: str) -> None:
    pts = results["points"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in pts:
        a = p["paired"][COMPARISONS[0]]
        ax.errorbar([p["bytes_saved"] * 100], [a["delta_auc"]],
                    yerr=[[a["delta_auc"] - a["delta_auc_ci"][0]], [a["delta_auc_ci"][1] - a["delta_auc"]]],
                    fmt="o", capsize=3, color="C0")
        ax.annotate(", ".join(f"{v}" for v in p["point"].values()), (p["bytes_saved"] * 100, a["delta_auc"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(-0.002, color="red", lw=0.8, ls="--", label="ΔAUC −0.002")
    ax.axvline(85, color="green", lw=0.8, ls=":", label="85% saved")
    ax.set_xlabel("embedding bytes saved (%)")
    ax.set_ylabel("ΔAUC vs uncompressed (95% CI)")
    ax.set_title(" × ".join(results["grid"]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tradeoff.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
