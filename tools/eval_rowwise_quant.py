#!/usr/bin/env python
"""Test AUC of a trained DLRM after row-wise mixed precision (``quantize_``), against its fp32
self, over several tier policies and row-priority variants.

For every seed: train a DLRM (sharded with DMP, ``--epochs``) with a :class:`RowPriority` tracker
attached; gather it into an unsharded model; evaluate fp32; then for every policy, quantize a
copy with ``quantize_`` and evaluate it.  Bytes are what the converted collection holds
(weights as FBGEMM allocates them + the bit-packed id map) over the fp32 tables' bytes.

Priority variants: ``shark`` (label-aware with decay: α = 1, β = 0.2, γ = 0.9999), ``frequency``
(α = β = 1, γ = 1: plain counts) and ``uniform`` (every row equal: precision by row id).

    python tools/eval_rowwise_quant.py --data criteo \
        --data_path ../shared/data/criteo_kaggle_sample --batch_size 128 --out runs/eval_rowwise_quant
"""

import copy
import os
import statistics
import sys
import warnings
from typing import Dict

import torch
import torch.nn.functional as F

from report_io import save_results
from shark_torchrec.evaluation import auc, paired_compare
from shark_torchrec.importance import RowPriority
from shark_torchrec.quant import RowwiseQuantConfig, quantize_
from shark_torchrec.training import DLRMTrainer, build_dlrm_train, init_distributed
from shark_torchrec.training.gather import full_state_dict
from shark_torchrec.cli_run import train_parser, train_run
from shark_torchrec.training.datasets import require_rows
from shark_torchrec.training.train_dlrm import (
    data_spec_from,
    model_config_from,
    optim_config_from,
)

POLICIES = {
    "fractions 10/30/60 fp16/int8/int4": RowwiseQuantConfig(fractions={"fp16": .1, "int8": .3, "int4": .6}),
    "fractions 20/80 fp16/int8": RowwiseQuantConfig(fractions={"fp16": .2, "int8": .8}),
    "budget 30%": RowwiseQuantConfig(budget_fraction=0.30),
    "budget 20%": RowwiseQuantConfig(budget_fraction=0.20),
    "budget 12.5%": RowwiseQuantConfig(budget_fraction=0.125),
    "budget 35%, no DROP": RowwiseQuantConfig(budget_fraction=0.35, tiers=("fp16", "int8", "int4", "int2")),
}
PRIORITIES = {"shark": dict(alpha=1.0, beta=0.2, gamma=0.9999),
              "frequency": dict(alpha=1.0, beta=1.0, gamma=1.0)}


@torch.no_grad()
def evaluate(model, batches) -> Dict[str, float]:
    model.eval()
    logits, labels = [], []
    for b in batches:
        _, (_, lg, lb) = model(b)
        logits.append(lg.float())
        labels.append(lb.float())
    lg, lb = torch.cat(logits), torch.cat(labels)
    # (ranks the logits, as the paired comparison does: a float32 sigmoid ties those above ~16.6)
    return {"auc": auc(lg.double().numpy(), lb.numpy()),
            "log_loss": float(F.binary_cross_entropy_with_logits(lg, lb)),
            "logits": lg, "labels": lb}


def paired(reference: Dict, new: Dict, bootstrap: int, seed: int) -> Dict:
    """ΔAUC of ``new`` vs ``reference`` on the same test rows, with its bootstrap CI."""
    c = paired_compare(reference["labels"].numpy(), reference["logits"].numpy(),
                       new["logits"].numpy(), bootstrap=bootstrap, seed=seed)
    return {"delta_auc": c.delta_auc, "ci": c.delta_auc_ci, "examples": c.examples}


def main() -> None:
    p = train_parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of each paired ΔAUC interval")
    p.set_defaults(out="runs/eval_rowwise_quant", log_level="WARNING")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    env = init_distributed("cpu")
    if env.world_size != 1:
        raise SystemExit("run this tool as one process")
    run = train_run(args)
    spec = data_spec_from(run.data, run.training.seed)
    # an empty split is an error naming its files
    require_rows(spec, args.batch_size, env.world_size, args.limit_train_batches, args.limit_test_batches)
    config = model_config_from(run.model, spec)
    test = list(spec.batches(spec.dataset("test", args.test_batch_size or args.batch_size, 0, 1)))
    results = {"args": vars(args), "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        trainer = DLRMTrainer(config, optim_config_from(run.training), env, args.batch_size, seed=seed)
        trackers = {name: RowPriority(config.tables(), **kw).attach(trainer.model)
                    for name, kw in PRIORITIES.items()}
        for epoch in range(args.epochs):
            ds = spec.dataset("train", args.batch_size, 0, 1, max_batches=args.limit_train_batches)
            trainer.train(spec.batches(ds, args.num_workers), desc=f"seed {seed} epoch {epoch}")
        for t in trackers.values():
            t.detach()
        priorities = {name: t.priorities() for name, t in trackers.items()}
        priorities["uniform"] = None
        model = build_dlrm_train(config, torch.device("cpu"), seed, embedding_device=torch.device("cpu"))
        model.load_state_dict(full_state_dict(trainer.model))
        fp32 = evaluate(model, test)
        fp32_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in config.tables())
        rows = {}
        for pname, pr in priorities.items():
            for policy, qconfig in POLICIES.items():
                q = copy.deepcopy(model)
                quantize_(q, qconfig, priorities=pr)
                mixed = q.model.sparse_arch.embedding_bag_collection
                m = evaluate(q, test)
                m["paired"] = paired(fp32, m, args.bootstrap, seed)
                m.pop("logits"), m.pop("labels")
                rep = mixed.memory_report()
                rows[f"{pname} | {policy}"] = {
                    **m, "auc_delta": m["auc"] - fp32["auc"], "bytes": rep["total_bytes"],
                    "bytes_fraction": rep["total_bytes"] / fp32_bytes,
                    "rows_per_tier": {t: sum(r["rows"].get(t, 0) for r in mixed.assignment.report().values())
                                      for t in ("fp32", "fp16", "int8", "int4", "int2", "drop")}}
                print(f"seed {seed} {pname:9s} {policy:36s} AUC {m['auc']:.4f} "
                      f"({m['auc'] - fp32['auc']:+.4f}) bytes {rep['total_bytes'] / fp32_bytes:.3f}",
                      file=sys.stderr, flush=True)
        fp32 = {k: v for k, v in fp32.items() if k not in ("logits", "labels")}
        results["seeds"][seed] = {"fp32": fp32, "fp32_bytes": fp32_bytes, "quantized": rows}
    write_outputs(results, args.out)


def write_outputs(results: Dict, out: str) -> None:
    plt = save_results(results, out)
    seeds = list(results["seeds"].values())
    keys = list(seeds[0]["quantized"])
    lines = ["fp32 test AUC per seed: " + ", ".join(f"{s['fp32']['auc']:.4f}" for s in seeds), "",
             f"Paired on the same {seeds[0]['quantized'][keys[0]]['paired']['examples']:,} test rows; "
             "per seed, the 95% bootstrap CI of ΔAUC lies below 0 (−), includes 0 (0) or lies above 0 (+).", "",
             "| priorities | policy | embedding bytes vs fp32 | test AUC | AUC − fp32 (mean ± std) | CI per seed | mean CI | rows fp16/int8/int4/int2/drop (seed 0) |",
             "|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pname in dict.fromkeys(k.split(" | ")[0] for k in keys):
        xs, ys = [], []
        for k in keys:
            if not k.startswith(pname + " |"):
                continue
            d = [s["quantized"][k]["auc_delta"] for s in seeds]
            frac = statistics.fmean(s["quantized"][k]["bytes_fraction"] for s in seeds)
            auc = statistics.fmean(s["quantized"][k]["auc"] for s in seeds)
            sd = statistics.pstdev(d) if len(d) > 1 else 0.0
            r = seeds[0]["quantized"][k]["rows_per_tier"]
            cis = [s["quantized"][k]["paired"]["ci"] for s in seeds]
            signs = "".join("−" if hi < 0 else "+" if lo > 0 else "0" for lo, hi in cis)
            lo, hi = statistics.fmean(c[0] for c in cis), statistics.fmean(c[1] for c in cis)
            lines.append(f"| {pname} | {k.split(' | ')[1]} | {frac:.3f} | {auc:.4f} | "
                         f"{statistics.fmean(d):+.4f} ± {sd:.4f} | {signs} | [{lo:+.4f}, {hi:+.4f}] | "
                         f"{r['fp16']}/{r['int8']}/{r['int4']}/{r['int2']}/{r['drop']} |")
            xs.append(frac)
            ys.append(statistics.fmean(d))
        ax.plot(xs, ys, "o", label=pname)
    ax.axhline(0, color="gray", lw=0.8)
    ax.axhline(-0.002, color="red", lw=0.8, ls="--", label="−0.002")
    ax.set_xlabel("embedding bytes / fp32 bytes")
    ax.set_ylabel("test AUC − fp32 AUC (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "auc_vs_bytes.png"), dpi=120)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
