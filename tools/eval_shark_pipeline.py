#!/usr/bin/env python
"""The SHARK pipeline over several seeds and compared variants, judged on the same test rows.

For every seed, ``recipes/shark_dlrm.py`` runs once per variant; the variants of a seed share
one trained model (the first variant trains it, the others start from a copy of its finished
``train`` stage), so they differ only in what is compared:

* ``shark``: SHARK field scores (``--prune_baseline``) and SHARK row priorities;
* ``permutation``: exact permutation importance on the dev split, SHARK row priorities;
* ``random``: random field scores, SHARK row priorities;
* ``frequency-tiers``: SHARK field scores, plain row frequencies as priorities.

Every run's report carries paired comparisons (bootstrap intervals of the AUC difference on
the same rows) of the compressed model against the uncompressed one fine-tuned the same way,
and of the pruning and quantization steps alone.  This tool adds the summary over seeds (mean,
spread, t-interval) and, on synthetic data, agreement with the generator's ground truth: the
Spearman correlation of the field scores with the true field importance, the recall of the
informative fields among the top-scored ones, where the constant fields rank, the true
importance the pruning dropped, and how the true row importance is spread over the tiers.

    python tools/eval_shark_pipeline.py --seeds 0,1,2 --out runs/eval_shark_syn -- \\
        --data synthetic_criteo --batch_size 1024
    python tools/eval_shark_pipeline.py --nproc 2 --out runs/eval_shark_ml100k -- --data ml100k

Everything after ``--`` goes to the recipe (``--seed``, ``--out``, ``--field_scorer`` and
``--row_priority`` are set here).  Writes ``OUT/results.json``, ``OUT/summary.md`` and
``OUT/delta_auc.png``.  Runs that finished are not run again (the recipe resumes).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

from report_io import distinct, finished_report, pipeline_stage_keys, save_results, split_recipe_args
from shark_torchrec.evaluation import bottom_k, recall_at_k, spearman, summarize_seeds
from shark_torchrec.quant import TIER_ORDER
from shark_torchrec.run_config import STAGES
from shark_torchrec.stages import StageSharing, StageStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "shark_dlrm.py")
VARIANTS = {
    "shark": ["--field_scorer", "shark", "--row_priority", "shark"],
    "permutation": ["--field_scorer", "permutation", "--row_priority", "shark"],
    "random": ["--field_scorer", "random", "--row_priority", "shark"],
    "frequency-tiers": ["--field_scorer", "shark", "--row_priority", "frequency"],
}
COMPARISONS = ("compressed vs uncompressed", "pruning step (pruned vs uncompressed)",
               "quantization step (quantized vs pruned)")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def run_variant(out: str, seed: int, variant: str, recipe_args: List[str], nproc: int,
                sharing: StageSharing) -> Dict:
    """One pipeline run (or its finished report), with the finished stages of the seed's
    earlier variants whose keys it shares linked in (the trained model, for variants that
    differ only in later stages)."""
    argv = [*recipe_args, *VARIANTS[variant], "--seed", str(seed)]
    keys = pipeline_stage_keys(argv, world_size=nproc)
    if not finished_report(out, keys):
        sharing.link(out, keys)
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
        cmd = [*launcher, RECIPE, *argv, "--out", out, "--log_level", "WARNING"]
        log(f"== seed {seed} {variant}: {' '.join(cmd[len(launcher):])}")
        t0 = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if nproc > 1 else "2"))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"seed {seed} {variant} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        log(f"   {time.perf_counter() - t0:.0f} s")
    sharing.finished(out, keys)  # (its trained model, for the seed's next variants)
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    report["field_scores"] = StageStore(out).read("prune")["result"].get("scores", {})
    return report


def field_truth_metrics(scores: Dict[str, float], truth: Dict[str, float], constant: List[str],
                        dropped: List[str]) -> Dict[str, float]:
    informative = [f for f, v in truth.items() if v > 0]
    return {
        "spearman_vs_truth": spearman(scores, truth),
        "recall_informative": recall_at_k(scores, informative),
        "constant_fields_rank_last": bool(set(bottom_k(scores, len(constant))) == set(constant))
        if constant else None,
        "true_importance_dropped": sum(truth[f] for f in dropped) / sum(truth.values()),
    }


def row_truth_metrics(cfg, run_dir: str) -> Dict[str, float]:
    """Shares of the true row importance (of the kept tables) stored in each tier."""
    from shark_torchrec.data import true_row_importance

    from shark_torchrec.quantize_stage import read_row_tiers

    tiers = read_row_tiers(os.path.join(run_dir, "quantize", "row_tiers"))
    mass = np.zeros(len(TIER_ORDER))
    for table, t in tiers.items():
        field = table[len("t_"):]
        truth = true_row_importance(cfg, field)
        mass += np.bincount(t.long().numpy(), weights=truth, minlength=len(TIER_ORDER))
    total = mass.sum()
    return {tier.value: float(m / total) if total else float("nan") for tier, m in zip(TIER_ORDER, mass)}


def main() -> None:
    own, recipe_args = split_recipe_args(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--out", default="runs/eval_shark_pipeline")
    args = p.parse_args(own)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown} (known: {sorted(VARIANTS)})")
    for flag in ("--seed", "--out", "--field_scorer", "--row_priority"):
        if flag in recipe_args:
            raise SystemExit(f"{flag} is set by this tool; remove it after --")
    seeds = distinct([int(s) for s in args.seeds.split(",") if s], "--seeds")

    # The data the recipe will read (for the ground truth of synthetic data).
    from shark_torchrec.cli_run import parse_pipeline
    from shark_torchrec.training.train_dlrm import data_spec_from

    t_start = time.perf_counter()
    results = {"recipe_args": recipe_args, "seeds": seeds, "variants": variants, "runs": {}}
    for seed in seeds:
        run = parse_pipeline([*recipe_args, "--seed", str(seed)])
        spec = data_spec_from(run.data, run.training.seed)
        cfg = spec.synthetic
        truth = None
        if cfg is not None:
            from shark_torchrec.data import true_field_importance

            truth = true_field_importance(cfg)
            constant = [f.name for f in cfg.fields if f.mode_probability >= 1.0 or f.cardinality == 1]
        sharing = StageSharing(STAGES)
        for variant in variants:
            run_dir = os.path.join(args.out, f"seed_{seed}", variant)
            r = run_variant(run_dir, seed, variant, recipe_args, args.nproc, sharing)
            entry = {"bytes_saved": r["stages"]["quantized"]["bytes_saved_fraction"],
                     "paired": {k: r["paired"][k] for k in COMPARISONS},
                     "auc": {k: v["auc"] for k, v in r["stages"].items()},
                     "fields_after": r["plan"]["fields_after"], "dropped": r["plan"]["dropped_features"],
                     "lookup_speed_vs_fp32": r.get("lookup_speed_vs_fp32")}
            if truth is not None:
                entry["fields_vs_truth"] = field_truth_metrics(r["field_scores"], truth, constant,
                                                               r["plan"]["dropped_features"])
                entry["row_importance_by_tier"] = row_truth_metrics(cfg, run_dir)
            results["runs"].setdefault(variant, {})[seed] = entry
        if truth is not None:
            results.setdefault("true_field_importance", {})[seed] = truth
    results["wall_seconds"] = time.perf_counter() - t_start

    # Summary over seeds.
    summary = {}
    for variant in variants:
        runs = results["runs"][variant]
        s = {"bytes_saved": summarize_seeds(r["bytes_saved"] for r in runs.values()).to_dict()}
        for k in COMPARISONS:
            s[k] = summarize_seeds(r["paired"][k]["delta_auc"] for r in runs.values()).to_dict()
        s["seeds_excluding_losses_over_0.002"] = sum(
            r["paired"][COMPARISONS[0]]["delta_auc_ci"][0] >= -0.002 for r in runs.values())
        if truth is not None:
            for k in ("spearman_vs_truth", "recall_informative", "true_importance_dropped"):
                s[k] = summarize_seeds(r["fields_vs_truth"][k] for r in runs.values()).to_dict()
            s["constant_fields_rank_last"] = [r["fields_vs_truth"]["constant_fields_rank_last"]
                                              for r in runs.values()]
            s["row_importance_by_tier"] = {
                t.value: float(np.mean([r["row_importance_by_tier"][t.value] for r in runs.values()]))
                for t in TIER_ORDER}
        summary[variant] = s
    results["summary"] = summary
    plt = save_results(results, args.out)
    write_summary(results, args.out)
    plot(results, plt, args.out)
    log(f"wrote {args.out}/summary.md ({results['wall_seconds']:.0f} s)")


def write_summary(results: Dict, out: str) -> None:
    runs, summary = results["runs"], results["summary"]
    first = next(iter(next(iter(runs.values())).values()))
    n = first["paired"][COMPARISONS[0]]["examples"]
    lines = [f"Seeds {results['seeds']}; {n:,} evaluation rows per seed; recipe flags: "
             f"`{' '.join(results['recipe_args'])}`; {results['wall_seconds'] / 60:.0f} min in all.", "",
             "Per seed (ΔAUC of the compressed model vs the uncompressed one fine-tuned the same way, "
             "paired on the same rows, 95% bootstrap CI):", "",
             "| variant | seed | bytes saved | ΔAUC [95% CI] | pruning step | quantization step |",
             "|---|---|---|---|---|---|"]
    for variant, per_seed in runs.items():
        for seed, r in per_seed.items():
            c = r["paired"]
            a = c[COMPARISONS[0]]
            lines.append(f"| {variant} | {seed} | {r['bytes_saved']:.1%} | {a['delta_auc']:+.4f} "
                         f"[{a['delta_auc_ci'][0]:+.4f}, {a['delta_auc_ci'][1]:+.4f}] | "
                         f"{c[COMPARISONS[1]]['delta_auc']:+.4f} | {c[COMPARISONS[2]]['delta_auc']:+.4f} |")
    lines += ["", "Over seeds (mean ± std; t-interval of the mean):", "",
              "| variant | bytes saved | mean ΔAUC | 95% t-interval | seeds whose CI excludes losses > 0.002 |"
              + (" Spearman vs truth | recall of informative fields | true importance dropped |"
                 " constant fields last |" if "spearman_vs_truth" in next(iter(summary.values())) else ""),
              "|---|---|---|---|---|" + ("---|---|---|---|" if "spearman_vs_truth" in next(iter(summary.values())) else "")]
    for variant, s in summary.items():
        d = s[COMPARISONS[0]]
        row = (f"| {variant} | {s['bytes_saved']['mean']:.1%} | {d['mean']:+.4f} ± {d['std']:.4f} | "
               f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] | {s['seeds_excluding_losses_over_0.002']} of "
               f"{len(d['values'])} |")
        if "spearman_vs_truth" in s:
            row += (f" {s['spearman_vs_truth']['mean']:.3f} | {s['recall_informative']['mean']:.3f} | "
                    f"{s['true_importance_dropped']['mean']:.4f} | "
                    + (f"{sum(bool(x) for x in s['constant_fields_rank_last'])} of {len(d['values'])} |"
                       if any(x is not None for x in s["constant_fields_rank_last"]) else "no constant fields |"))
        lines.append(row)
    if "row_importance_by_tier" in next(iter(summary.values())):
        lines += ["", "Share of the true row importance (kept tables) stored in each tier (mean over seeds):", "",
                  "| variant | " + " | ".join(t.value for t in TIER_ORDER) + " |",
                  "|---|" + "---|" * len(TIER_ORDER)]
        for variant, s in summary.items():
            lines.append(f"| {variant} | " + " | ".join(f"{s['row_importance_by_tier'][t.value]:.3f}"
                                                       for t in TIER_ORDER) + " |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: Dict, plt, out: str) -> None:
    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (variant, per_seed) in enumerate(runs.items()):
        for j, (seed, r) in enumerate(per_seed.items()):
            a = r["paired"][COMPARISONS[0]]
            x = i + (j - (len(per_seed) - 1) / 2) * 0.12
            ax.errorbar([x], [a["delta_auc"]], yerr=[[a["delta_auc"] - a["delta_auc_ci"][0]],
                                                     [a["delta_auc_ci"][1] - a["delta_auc"]]],
                        fmt="o", color=f"C{i}", capsize=3)
        saved = np.mean([r["bytes_saved"] for r in per_seed.values()])
        ax.annotate(f"{saved:.1%} saved", (i, 0), textcoords="offset points", xytext=(0, -28),
                    ha="center", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(-0.002, color="red", lw=0.8, ls="--", label="−0.002")
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(list(runs))
    ax.set_ylabel("ΔAUC vs uncompressed (95% CI), per seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "delta_auc.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
