#!/usr/bin/env python
"""Evaluate field pruning: SHARK's scores (each baseline) against exact permutation importance
and random selection, by the test AUC of pruned and fine-tuned DLRMs.

The training split is cut in two, as in the streaming setting SHARK is used in: the first
part trains the baseline, the last ``--finetune_fraction`` (fresh data the baseline never saw)
fine-tunes the pruned models.  (Fine-tuning on data already seen overfits the small samples:
a second epoch over the 7,200-row Criteo sample costs the unpruned model 0.02-0.07 AUC.)

For every seed:
  1. train a baseline DLRM (sharded with DMP) for ``--epochs`` over the first part;
  2. score the fields with SHARK while training (``mean``, ``shuffle``, ``zero``: the same
     training run repeated with one tracker attached, so the model is the same), with exact
     permutation importance on the dev split, and at random;
  3. for every ``k`` in ``--keep``: prune to the ``k`` best fields of each method, record the
     test AUC as pruned and after fine-tuning on the second part (``k`` = all fields is the
     unpruned model fine-tuned the same way).
Writes ``OUT/results.json``, ``OUT/auc_vs_fields.png`` and ``OUT/summary.md`` (the tables for
BENCHMARKS.md): mean ± std AUC per method and k, scoring time per method, and the Spearman rank
correlation between each SHARK baseline and permutation importance.

    python tools/eval_field_pruning.py --data criteo \
        --data_path ../shared/data/criteo_kaggle_sample --out runs/eval_field_pruning
    python tools/eval_field_pruning.py --data synthetic --out runs/eval_field_pruning_syn

Accepts every data/model/training flag of recipes/train_dlrm.py.  Runs in one process or
under torchrun.
"""

import logging
import os
import statistics
import sys
import time
import warnings
from typing import Dict

import torch

from report_io import save_results
from shark_torchrec.evaluation import paired_compare, spearman
from shark_torchrec.cli_args import fraction, positive_int
from shark_torchrec.importance import (
    BASELINES,
    PermutationImportance,
    RandomImportance,
    TaylorFieldImportance,
    dlrm_per_sample_loss,
)
from shark_torchrec.pruning import choose_plan
from shark_torchrec.pruning.sharded import prune_trainer
from shark_torchrec.training import CheckpointManager, DLRMTrainer, init_distributed
from shark_torchrec.cli_run import train_parser, train_run
from shark_torchrec.training.datasets import require_rows
from shark_torchrec.training.train_dlrm import (
    data_spec_from,
    model_config_from,
    optim_config_from,
    test_batches,
)


def main() -> None:
    p = train_parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--keep", default="", help="comma-separated numbers of fields to keep "
                   "(default: about 8 points from all fields down to 2)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--finetune_fraction", type=fraction, default=0.25,
                   help="last fraction of the train split, kept for fine-tuning")
    p.add_argument("--permutation_repeats", type=positive_int, default=1)
    p.add_argument("--permutation_split", choices=["dev", "train"], default="dev",
                   help="data for exact permutation importance (the dev split, when the data "
                   "has one; on tiny samples the train split gives steadier scores)")
    p.add_argument("--methods", default="shark-mean,shark-shuffle,shark-zero,permutation,random")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of each paired ΔAUC interval")
    p.set_defaults(out="runs/eval_field_pruning", log_level="WARNING")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    # Every pruned model is planned anew; torchrec repeats one dry-run notice each time.
    logging.getLogger("torchrec.distributed.planner.storage_reservations").setLevel(logging.ERROR)
    env = init_distributed(args.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
    methods = [m for m in args.methods.split(",") if m]
    run = train_run(args)
    spec = data_spec_from(run.data, run.training.seed)
    # an empty split is an error naming its files
    require_rows(spec, args.batch_size, env.world_size, args.limit_train_batches, args.limit_test_batches)
    config = model_config_from(run.model, spec)
    optim = optim_config_from(run.training)
    F = len(config.feature_names)
    keep = sorted({int(k) for k in args.keep.split(",") if k} or
                  {max(1, round(F * x)) for x in (1, 0.8, 0.6, 0.45, 0.3, 0.2, 0.12)} | {2}, reverse=True)
    dev_split = args.permutation_split
    if dev_split == "dev" and spec.kind != "synthetic" and not spec.dev_files:
        dev_split = "test"
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if env.is_main else (lambda *a: None)

    total = spec.train_batches(args.batch_size * env.world_size, args.limit_train_batches)
    n_base = total - max(1, int(round(total * args.finetune_fraction)))
    if n_base < 1:
        raise SystemExit(f"the train split has {total} batches: too few to split")
    parts = {"base": (0, n_base), "finetune": (n_base, total)}
    log(f"train split: {total} global batches; baseline on [0, {n_base}), fine-tuning on [{n_base}, {total})")

    def train_epochs(trainer: DLRMTrainer, epochs: int, part: str, tracker=None) -> float:
        t0 = time.perf_counter()
        start, end = parts[part]
        for epoch in range(epochs):
            ds = spec.dataset("train", args.batch_size, env.rank, env.world_size,
                              start_batch=start, max_batches=end)
            if tracker is not None:
                tracker.attach()
            try:
                trainer.train(spec.batches(ds, args.num_workers), desc=f"train {epoch}")
            finally:
                if tracker is not None:
                    tracker.detach()
        return time.perf_counter() - t0

    def test_eval(trainer: DLRMTrainer) -> Dict:
        return trainer.evaluate(test_batches(run.data, run.training, spec, env), desc="test", return_predictions=True)

    def test_auc(trainer: DLRMTrainer) -> float:
        return trainer.evaluate(test_batches(run.data, run.training, spec, env), desc="test")["auc"]

    def paired(reference: Dict, new: Dict, seed: int) -> Dict:
        """ΔAUC of ``new`` vs ``reference`` on the same test rows, with its bootstrap CI."""
        c = paired_compare(reference["labels"].numpy(), reference["logits"].numpy(),
                           new["logits"].numpy(), bootstrap=args.bootstrap, seed=seed)
        return {"delta_auc": c.delta_auc, "ci": c.delta_auc_ci, "examples": c.examples}

    results = {"args": vars(args), "keep": keep, "methods": methods, "dev_split": dev_split,
               "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        log(f"== seed {seed}: baseline")
        base = DLRMTrainer(config, optim, env, args.batch_size, seed=seed)
        t_base = train_epochs(base, args.epochs, "base")
        base_eval = test_eval(base)
        base_auc = base_eval["auc"]
        ckpt = CheckpointManager(os.path.join(args.out, f"seed_{seed}", "base"), {"seed": seed})
        base_path = ckpt.save(base.state_dict(), {"global_step": 0})
        scores, timing = {}, {"train_seconds": t_base}
        for b in BASELINES:
            name = f"shark-{b}"
            if name not in methods:
                continue
            log(f"== seed {seed}: scoring with {name} while training")
            twin = DLRMTrainer(config, optim, env, args.batch_size, seed=seed)
            tracker = TaylorFieldImportance(twin.model, baseline=b, seed=seed)
            t = train_epochs(twin, args.epochs, "base", tracker)
            scores[name] = tracker.scores()
            timing[name] = {"hook_seconds": tracker.hook_seconds, "train_seconds": t,
                            "wall_overhead_seconds": t - t_base}
            del twin
        if "permutation" in methods:
            log(f"== seed {seed}: exact permutation importance on the {dev_split} split")
            base.model.eval()
            t0 = time.perf_counter()
            pi = PermutationImportance(dlrm_per_sample_loss(base.model), config.feature_names,
                                       repeats=args.permutation_repeats, seed=seed)
            kwargs = {"max_batches": n_base} if dev_split == "train" else {}
            pi.evaluate(spec.batches(spec.dataset(dev_split, args.test_batch_size or args.batch_size,
                                                  env.rank, env.world_size, **kwargs),
                                     args.num_workers))
            scores["permutation"] = pi.scores()
            timing["permutation"] = {"seconds": time.perf_counter() - t0}
        if "random" in methods:
            scores["random"] = RandomImportance(config.feature_names, seed=seed).scores()
        auc: Dict[str, Dict[int, float]] = {m: {} for m in methods}
        auc_pruned: Dict[str, Dict[int, float]] = {m: {} for m in methods}
        delta: Dict[str, Dict[int, Dict]] = {m: {} for m in methods}
        delta_pruned: Dict[str, Dict[int, Dict]] = {m: {} for m in methods}
        # The reference every pruned model is judged against, on the same test rows: the
        # unpruned model as it is (for "as pruned") and fine-tuned the same way.
        full = DLRMTrainer(config, optim, env, args.batch_size, seed=seed)
        state = full.state_dict()
        ckpt.load(state, base_path)
        full.load_state_dict(state)
        train_epochs(full, 1, "finetune")
        full_eval = test_eval(full)
        del full
        for k in keep:
            if k == F:  # nothing to prune: the reference itself
                for m in methods:
                    auc[m][k], auc_pruned[m][k] = full_eval["auc"], base_auc
                    delta[m][k] = delta_pruned[m][k] = {"delta_auc": 0.0, "ci": [0.0, 0.0]}
                log(f"seed {seed} k={k} (all fields): AUC {full_eval['auc']:.4f}")
                continue
            for m in methods:
                plan = choose_plan(scores[m], config.tables(), keep=k, method=m)
                pruned = prune_trainer(base, plan, base_path, args.batch_size, seed=seed)
                as_pruned = test_eval(pruned)
                auc_pruned[m][k] = as_pruned["auc"]
                delta_pruned[m][k] = paired(base_eval, as_pruned, seed)
                train_epochs(pruned, 1, "finetune")
                tuned = test_eval(pruned)
                auc[m][k] = tuned["auc"]
                delta[m][k] = paired(full_eval, tuned, seed)
                log(f"seed {seed} k={k} {m}: AUC {auc_pruned[m][k]:.4f} pruned, "
                    f"{auc[m][k]:.4f} fine-tuned")
        corr = {m: spearman(scores[m], scores["permutation"]) for m in scores
                if m.startswith("shark") and "permutation" in scores}
        results["seeds"][seed] = {"base_auc": base_auc, "scores": scores, "timing": timing,
                                  "auc": auc, "auc_pruned": auc_pruned,
                                  "delta_auc": delta, "delta_auc_pruned": delta_pruned,
                                  "test_examples": base_eval["examples"],
                                  "spearman_vs_permutation": corr}
    if env.is_main:
        write_outputs(results, args.out)


def write_outputs(results: Dict, out: str) -> None:
    plt = save_results(results, out)
    seeds = list(results["seeds"].values())
    keep, methods = results["keep"], results["methods"]
    lines = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for key, title, ax in (("auc", "after fine-tuning", axes[0]), ("auc_pruned", "as pruned", axes[1])):
        lines += [f"Test AUC {title} (mean ± std over {len(seeds)} seeds):", "",
                  "| fields kept | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for m in methods:
            vals = [[s[key][m][k] for s in seeds] for k in keep]
            ax.errorbar(keep, [statistics.fmean(v) for v in vals],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals],
                        marker="o", capsize=3, label=m)
        for k in keep:
            cells = []
            for m in methods:
                v = [s[key][m][k] for s in seeds]
                cells.append(f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
        ax.set_xlabel("fields kept")
        ax.set_title(f"test AUC {title}")
        ax.grid(alpha=0.3)
    for key, title in (("delta_auc", "after fine-tuning, vs the unpruned model fine-tuned the same way"),
                       ("delta_auc_pruned", "as pruned, vs the unpruned model")):
        lines += [f"Paired ΔAUC {title}, on the same {seeds[0].get('test_examples', 0):,} test rows: "
                  f"mean over {len(seeds)} seeds, and per seed whether the 95% bootstrap CI lies "
                  "below 0 (−), includes 0 (0) or lies above 0 (+):", "",
                  "| fields kept | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for k in keep:
            cells = []
            for m in methods:
                d = [s[key][m][k] for s in seeds]
                signs = "".join("−" if x["ci"][1] < 0 else "+" if x["ci"][0] > 0 else "0" for x in d)
                cells.append(f"{statistics.fmean(x['delta_auc'] for x in d):+.4f} ({signs})")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    axes[0].set_ylabel(f"test AUC (mean ± std, {len(seeds)} seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "auc_vs_fields.png"), dpi=120)
    lines += ["", "| method | scoring cost (s, mean over seeds) | ratio to permutation | "
              "Spearman vs permutation | Spearman between seeds |", "|---|---|---|---|---|"]

    def stability(m: str) -> float:
        pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
        if not pairs:
            return float("nan")
        return statistics.fmean(spearman(a["scores"][m], b["scores"][m]) for a, b in pairs)

    perm = [s["timing"]["permutation"]["seconds"] for s in seeds if "permutation" in s["timing"]]
    perm_mean = statistics.fmean(perm) if perm else float("nan")
    for m in methods:
        if m.startswith("shark"):
            cost = statistics.fmean(s["timing"][m]["hook_seconds"] for s in seeds)
            rho = statistics.fmean(s["spearman_vs_permutation"].get(m, float("nan")) for s in seeds)
            lines.append(f"| {m} (tracker hooks during training) | {cost:.3f} | "
                         f"{cost / perm_mean:.3f} | {rho:.3f} | {stability(m):.3f} |")
        elif m == "permutation":
            n = len(seeds[0]["scores"]["permutation"])
            lines.append(f"| permutation ({n} fields + 1 passes over {results['dev_split']}) | "
                         f"{perm_mean:.3f} | 1.000 | 1.000 | {stability(m):.3f} |")
        else:
            lines.append(f"| {m} | 0 | 0 | - | {stability(m):.3f} |")
    lines.append("")
    lines.append("Baseline (unpruned, before fine-tuning) test AUC per seed: " +
                 ", ".join(f"{s['base_auc']:.4f}" for s in seeds))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
