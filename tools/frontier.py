#!/usr/bin/env python
"""Bytes saved against quality loss: SHARK's frontier and the alternatives at the same bytes.

For each seed, one model is trained and fine-tuned (``recipes/shark_dlrm.py`` with no field
pruning) and compressed many ways, every way judged **paired** against that uncompressed model on
the same test rows (ΔAUC with a 95% bootstrap interval per seed, then mean ± std over the seeds
with a t-interval):

* ``shark``: SHARK's row tiers at byte budgets (``--saved``: the fractions of the fp32
  embedding bytes saved, id map included), tiers FP16/INT8/INT4/INT2/SHARED;
* ``shark-drop``: the same with DROP (rows read as zeros) instead of SHARED;
* ``shark-lsq``: ``shark`` with integer rows fitted by least squares (``--quant_row_fit lsq``:
  FBGEMM's format, a scale and bias per row chosen for the least error instead of the row's range);
* ``frequency``: as ``shark``, tiers by plain use counts (``--row_priority frequency``);
* ``uniform int8/int4/int2``: every row in one tier — TorchRec's uniform quantized collection
  (computed through the mixed collection, which reads each tier exactly as FBGEMM does; its
  bytes are counted in TorchRec's own layout: rows only, no id map);
* ``uniform-lsq int4/int2``: the same with fitted rows (what the mixed collection stores with
  ``--quant_row_fit lsq``; TorchRec's own collection quantizes by the range);
* ``hashed``: smaller tables trained from scratch (``--hash_rows_fraction``: each table a
  fraction of its rows, ids hashed into them), fine-tuned like the others, at the same
  fractions of the bytes.

The runs of one seed share the trained model (stages linked, checked by their keys).

    python tools/frontier.py --seeds 0,1,2 --out runs/frontier_ml1 -- --data ml100k
    python tools/frontier.py --seeds 0,1,2 --out runs/frontier_ml16 -- --data ml100k --row_alignment 16
    python tools/frontier.py --seeds 0,1,2 --saved 0.80,0.85,0.90,0.93 --out runs/frontier_syn -- \
        --data synthetic_criteo     # dim 16: the id map weighs more (a 1M-row table's 20-bit entry: 3.9% of its fp32 row)

Writes ``OUT/results.json``, ``OUT/summary.md`` (one row per method and point) and
``OUT/frontier.png`` (bytes saved against mean ΔAUC, with the seeds' t-intervals).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import torch
from report_io import distinct, finished_report, pipeline_stage_keys, save_results, split_recipe_args

from shark_torchrec.evaluation import PairedBootstrap, summarize_seeds
from shark_torchrec.cli_run import parse_pipeline
from shark_torchrec.quant.tiers import Tier, row_bytes
from shark_torchrec.run_config import STAGES
from shark_torchrec.quantize_stage import PREDICTIONS_FILE
from shark_torchrec.stages import StageSharing
from shark_torchrec.training.train_dlrm import data_spec_from, model_config_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "shark_dlrm.py")
METHODS = ("shark", "shark-drop", "shark-lsq", "frequency", "uniform", "uniform-lsq", "hashed")
SHARED_TIERS = ["--quant_tiers", "fp16,int8,int4,int2,shared"]
DROP_TIERS = ["--quant_tiers", "fp16,int8,int4,int2,drop"]
UNIFORM_TIERS = ("int8", "int4", "int2")
LSQ = ["--quant_row_fit", "lsq"]
#: uniform tiers also run with fitted rows (INT8's error is too small to show a difference)
LSQ_UNIFORM_TIERS = ("int4", "int2")
OWN_FLAGS = ("--out", "--seed", "--quant_budget_fraction", "--quant_fractions", "--quant_tiers", "--row_priority",
             "--quant_row_fit", "--hash_rows_fraction", "--drop_fraction", "--keep_fields", "--drop_score_share")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def fractions(text: str) -> List[float]:
    values = [float(x) for x in text.split(",") if x]
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in (0, 1), got {text!r}")
    return values


def pipeline_argv(recipe_args: List[str], flags: List[str]) -> List[str]:
    """The recipe's arguments for one run (the tool compares compressions: no field pruning)."""
    return [*recipe_args, *flags, "--drop_fraction", "0"]


def run_pipeline(run_dir: str, recipe_args: List[str], flags: List[str], sharing: StageSharing) -> Dict:
    """One pipeline run (or its finished report), with the finished stages of earlier runs
    whose keys it shares linked in (the trained model of a seed, for every method but hashed)."""
    argv = pipeline_argv(recipe_args, flags)
    keys = pipeline_stage_keys(argv)
    if not finished_report(run_dir, keys):
        sharing.link(run_dir, keys)
        cmd = [sys.executable, RECIPE, *argv, "--out", run_dir, "--log_level", "WARNING"]
        log(f"== {os.path.relpath(run_dir, ROOT)}: {' '.join(flags)}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{run_dir} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        log(f"   {time.perf_counter() - t0:.0f} s")
    sharing.finished(run_dir, keys)
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def predictions(run_dir: str) -> Dict[str, torch.Tensor]:
    return torch.load(os.path.join(run_dir, "quantize", PREDICTIONS_FILE), weights_only=True)


def tables_of(recipe_args: List[str]):
    """(rows, dim) of every table of the uncompressed model, as the pipeline builds it."""
    run = parse_pipeline(recipe_args)
    config = model_config_from(run.model, data_spec_from(run.data, run.training.seed))
    return [(t.num_embeddings, t.embedding_dim) for t in config.tables()]


def planned_runs(methods: List[str], saved_fractions: List[float]) -> List[tuple]:
    """The pipeline runs of one seed: ``(method, point label, run name, its flags, whether it
    shares the seed's trained model)`` for each method and point."""
    todo = []
    for saved in saved_fractions:
        budget = f"{1 - saved:.4g}"
        if "shark" in methods:
            todo.append(("shark", f"{saved:.0%}", f"shark_{budget}",
                         ["--quant_budget_fraction", budget, *SHARED_TIERS], True))
        if "shark-drop" in methods:
            todo.append(("shark-drop", f"{saved:.0%}", f"shark-drop_{budget}",
                         ["--quant_budget_fraction", budget, *DROP_TIERS], True))
        if "shark-lsq" in methods:
            todo.append(("shark-lsq", f"{saved:.0%}", f"shark-lsq_{budget}",
                         ["--quant_budget_fraction", budget, *SHARED_TIERS, *LSQ], True))
        if "frequency" in methods:
            todo.append(("frequency", f"{saved:.0%}", f"frequency_{budget}",
                         ["--quant_budget_fraction", budget, *SHARED_TIERS, "--row_priority", "frequency"], True))
    if "uniform" in methods:
        for tier in UNIFORM_TIERS:
            todo.append((f"uniform {tier}", tier, f"uniform_{tier}", ["--quant_fractions", f"{tier}=1"], True))
    if "uniform-lsq" in methods:
        for tier in LSQ_UNIFORM_TIERS:
            todo.append((f"uniform-lsq {tier}", tier, f"uniform-lsq_{tier}",
                         ["--quant_fractions", f"{tier}=1", *LSQ], True))
    if "hashed" in methods:
        for saved in saved_fractions:
            frac = f"{1 - saved:.4g}"
            todo.append(("hashed", f"{saved:.0%}", f"hashed_{frac}",
                         ["--hash_rows_fraction", frac, "--quant_fractions", "fp32=1"], False))
    return todo


def main() -> None:
    own, recipe_args = split_recipe_args(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--saved", type=fractions, default=fractions("0.80,0.85,0.90,0.93,0.95,0.97"),
                   help="fractions of the fp32 embedding bytes saved (SHARK, frequency and hashed points)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", default="runs/frontier")
    p.add_argument("--replot", action="store_true", help="only rewrite summary.md and frontier.png from results.json")
    args = p.parse_args(own)
    if args.replot:
        replot(args.out)
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown} (known: {', '.join(METHODS)})")
    clash = [f for f in OWN_FLAGS if f in recipe_args]
    if clash:
        raise SystemExit(f"{', '.join(clash)} are set by this tool; remove them after --")
    seeds = distinct([int(s) for s in args.seeds.split(",") if s], "--seeds")
    # (a point is labelled by its percent: two budgets of one label would overwrite each other)
    distinct([f"{saved:.0%}" for saved in args.saved], "--saved (as whole percents)")
    tables = tables_of(recipe_args)
    alignment = parse_pipeline(recipe_args).quant.row_alignment
    alignment = 1 if alignment in ("auto", "1") else 16  # (the tool runs on CPU: auto is 1)
    fp32 = sum(rows * dim * 4 for rows, dim in tables)

    t0 = time.perf_counter()
    points: Dict[str, Dict[str, dict]] = {}  # method label -> point label -> {seed: comparison}
    saved_of: Dict[str, Dict[str, List[float]]] = {}
    examples = None
    for seed in seeds:
        base = os.path.join(args.out, f"seed{seed}")
        runs: Dict[tuple, tuple] = {}  # (method, point) -> (run dir, which model, bytes saved)
        first = None  # the run whose reference (the uncompressed model, fine-tuned) the others are paired with
        sharing = StageSharing(STAGES)
        todo = planned_runs(methods, args.saved)
        # Runs already finished in OUT (from an interrupted run, or kept from an earlier round
        # when only some methods are redone) lend their stages first: whichever run comes first
        # then finds this seed's trained model instead of training it again.
        for method, point, name, flags, shares in todo:
            run_dir = os.path.join(base, name)
            keys = pipeline_stage_keys(pipeline_argv(recipe_args, [*flags, "--seed", str(seed)]))
            if shares and finished_report(run_dir, keys):
                sharing.finished(run_dir, keys)
        for method, point, name, flags, shares in todo:
            run_dir = os.path.join(base, name)
            report = run_pipeline(run_dir, recipe_args, [*flags, "--seed", str(seed)], sharing)
            if shares and first is None:
                first = run_dir
            if method.startswith("uniform"):  # (TorchRec's layout: no id map)
                tier = Tier.parse(point)
                saved = 1 - sum(rows * row_bytes(tier, dim, alignment) for rows, dim in tables) / fp32
                runs[(method, point)] = (run_dir, "quantized", saved)
            elif method == "hashed":  # its fp32 tables, as the pipeline sized them
                hashed = tables_of([*recipe_args, "--hash_rows_fraction", flags[1]])
                saved = 1 - sum(rows * dim * 4 for rows, dim in hashed) / fp32
                runs[(method, point)] = (run_dir, "reference", saved)
            else:
                runs[(method, point)] = (run_dir, "quantized", report["stages"]["quantized"]["bytes_saved_fraction"])
        if first is None:
            raise SystemExit("no method shares the trained model: add shark, frequency or uniform to --methods")
        reference = predictions(first)
        logits = {"uncompressed": reference["reference"].numpy()}
        for (method, point), (run_dir, which, _) in runs.items():
            pred = predictions(run_dir)
            if not torch.equal(pred["labels"], reference["labels"]):
                raise SystemExit(f"{run_dir}: evaluated other rows than {first}")
            if which == "quantized" and not torch.equal(pred["reference"], reference["reference"]):
                # A compression of another model than the one it is paired against (e.g. a run
                # left by other code, whose stages were not shared): its ΔAUC would mix the
                # two models' difference into the compression's.
                raise SystemExit(f"{run_dir}: compresses another model than {first} (their uncompressed "
                                 f"predictions differ); delete it to run it again on the shared model")
            logits[f"{method}|{point}"] = pred[which].numpy()
        boot = PairedBootstrap(reference["labels"].numpy(), logits, bootstrap=args.bootstrap, seed=seed)
        examples = boot.n
        for (method, point), (_, _, saved) in runs.items():
            c = boot.compare("uncompressed", f"{method}|{point}")
            points.setdefault(method, {}).setdefault(point, {})[seed] = {**c.to_dict(), "bytes_saved": saved}
            saved_of.setdefault(method, {}).setdefault(point, []).append(saved)

    results = {"recipe_args": recipe_args, "seeds": seeds, "row_alignment": alignment, "examples": examples,
               "fp32_bytes": fp32, "methods": {}}
    for method, by_point in points.items():
        results["methods"][method] = {}
        for point, by_seed in by_point.items():
            s = summarize_seeds([by_seed[k]["delta_auc"] for k in seeds])
            results["methods"][method][point] = {
                "bytes_saved": sum(saved_of[method][point]) / len(saved_of[method][point]),
                "delta_auc_mean": s.mean, "delta_auc_std": s.std, "delta_auc_ci": s.ci,
                "per_seed": {str(k): by_seed[k] for k in seeds}}
    results["wall_seconds"] = time.perf_counter() - t0
    plt = save_results(results, args.out)
    write_summary(results, args.out)
    plot(results, plt, args.out)
    log(f"wrote {args.out}/summary.md ({results['wall_seconds'] / 60:.0f} min)")


def write_summary(results: Dict, out: str) -> None:
    seeds = results["seeds"]
    lines = [f"Paired on the same {results['examples']:,} test rows against the uncompressed model of each "
             f"seed (seeds {', '.join(map(str, seeds))}; {results['row_alignment']}-byte rows); recipe flags: "
             f"`{' '.join(results['recipe_args'])}`; {results['wall_seconds'] / 60:.0f} min.", "",
             "| method | point | bytes saved | " + " | ".join(f"seed {k}: ΔAUC [95% CI]" for k in seeds)
             + " | mean ΔAUC ± std [95% t-interval] |", "|---" * (4 + len(seeds)) + "|"]
    rows = [(m, pt, r) for m, by in results["methods"].items() for pt, r in by.items()]
    for m, pt, r in sorted(rows, key=lambda x: (x[2]["bytes_saved"], x[0])):
        cells = [f"{r['per_seed'][str(k)]['delta_auc']:+.4f} [{r['per_seed'][str(k)]['delta_auc_ci'][0]:+.4f}, "
                 f"{r['per_seed'][str(k)]['delta_auc_ci'][1]:+.4f}]" for k in seeds]
        lo, hi = r["delta_auc_ci"]
        lines.append(f"| {m} | {pt} | {r['bytes_saved']:.1%} | " + " | ".join(cells) +
                     f" | {r['delta_auc_mean']:+.4f} ± {r['delta_auc_std']:.4f} [{lo:+.4f}, {hi:+.4f}] |")
    lines += ["", "Mean ΔAUC over the seeds [95% t-interval], each method at each target (bytes saved as "
                  "measured):", ""]
    targets = sorted({pt for m, by in results["methods"].items() if not m.startswith("uniform") for pt in by},
                     key=lambda t: float(t.rstrip("%")))
    lines += ["| method | " + " | ".join(targets) + " |", "|---" * (1 + len(targets)) + "|"]
    for m, by in results["methods"].items():
        if m.startswith("uniform"):
            continue
        cells = []
        for t in targets:
            r = by.get(t)
            cells.append("" if r is None else f"{r['delta_auc_mean']:+.4f} [{r['delta_auc_ci'][0]:+.4f}, "
                         f"{r['delta_auc_ci'][1]:+.4f}] ({r['bytes_saved']:.1%})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "shark" in results["methods"]:
        lines += ["", "SHARK against the other methods at the same target, paired (the same model and rows: "
                      "per seed the difference of the two ΔAUCs; mean over seeds [95% t-interval]):", "",
                  "| shark − | " + " | ".join(targets) + " |", "|---" * (1 + len(targets)) + "|"]
        shark = results["methods"]["shark"]
        for m, by in results["methods"].items():
            if m == "shark" or m.startswith("uniform"):
                continue
            cells = []
            for t in targets:
                if t not in by or t not in shark:
                    cells.append("")
                    continue
                d = summarize_seeds([shark[t]["per_seed"][str(k)]["delta_auc"] - by[t]["per_seed"][str(k)]["delta_auc"]
                                     for k in seeds])
                cells.append(f"{d.mean:+.4f} [{d.ci[0]:+.4f}, {d.ci[1]:+.4f}]")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for prefix, title in (("uniform ", "TorchRec's uniform collections (no id map)"),
                          ("uniform-lsq ", "Uniform tiers with least-squares-fitted rows (bytes as TorchRec's layout)")):
        uniform = [(m, pt, r) for m, by in results["methods"].items() if m.startswith(prefix) for pt, r in by.items()]
        if uniform:
            lines += ["", f"{title}: " + "; ".join(
                f"{pt.upper()} {r['bytes_saved']:.1%} saved, {r['delta_auc_mean']:+.4f} [{r['delta_auc_ci'][0]:+.4f}, "
                f"{r['delta_auc_ci'][1]:+.4f}]" for _, pt, r in sorted(uniform, key=lambda x: x[2]["bytes_saved"])) + "."]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: Dict, plt, out: str) -> None:
    """Bytes saved against mean ΔAUC with the seeds' t-intervals: every point (left), and the
    region near 0 where the methods part (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, zoom in zip(axes, (False, True)):
        for method, by in results["methods"].items():
            pts = sorted(by.values(), key=lambda r: r["bytes_saved"])
            x = [100 * r["bytes_saved"] for r in pts]
            y = [r["delta_auc_mean"] for r in pts]
            err = [[r["delta_auc_mean"] - r["delta_auc_ci"][0] for r in pts],
                   [r["delta_auc_ci"][1] - r["delta_auc_mean"] for r in pts]]
            style = "o" if method.startswith("uniform") else "o-"
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("embedding bytes saved (%)")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_ylim(-0.02, 0.003)
            ax.set_title("near 0")
        else:
            ax.set_ylabel("ΔAUC vs uncompressed (mean over seeds, 95% t-interval)")
            ax.set_title(f"{' '.join(results['recipe_args'])}, {results['row_alignment']}-byte rows, "
                         f"seeds {', '.join(map(str, results['seeds']))}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=110)
    plt.close(fig)


def replot(out: str) -> None:
    """Rewrite ``OUT/summary.md`` and ``OUT/frontier.png`` from ``OUT/results.json``."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_summary(results, out)
    plot(results, plt, out)


if __name__ == "__main__":
    main()
