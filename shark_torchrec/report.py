"""The SHARK pipeline's report: ``report.md`` and plots beside ``report.json``.

Plots (PNG): field scores (pruned fields marked), test AUC by stage, embedding bytes per table
before and after (stacked by tier), and the distribution of row priorities with the priority
at which each tier starts.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

TIER_COLOURS = {"fp32": "#1f77b4", "fp16": "#2ca02c", "int8": "#ff7f0e", "int4": "#d62728",
                "int2": "#9467bd", "shared": "#bcbd22", "drop": "#7f7f7f", "id map": "#17becf"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_field_scores(scores: Dict[str, float], dropped: Sequence[str], path: str) -> None:
    plt = _plt()
    order = sorted(scores, key=lambda f: -scores[f])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(order)), 4))
    colours = ["#bbbbbb" if f in set(dropped) else "#1f77b4" for f in order]
    ax.bar(range(len(order)), [scores[f] for f in order], color=colours)
    ax.set_xticks(range(len(order)), order, rotation=90)
    ax.set_ylabel("SHARK field score")
    ax.set_title("Field scores (grey: pruned)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_auc_by_stage(stages: Dict[str, Dict[str, float]], path: str) -> None:
    plt = _plt()
    names = list(stages)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(names, [stages[n]["auc"] for n in names], marker="o")
    for i, n in enumerate(names):
        ax.annotate(f"{stages[n]['auc']:.4f}", (i, stages[n]["auc"]), textcoords="offset points",
                    xytext=(0, 6), ha="center")
    ax.set_ylabel("test AUC")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes_per_table(fp32_bytes: Dict[str, int], after: Dict[str, Dict[str, int]], path: str) -> None:
    """``after``: ``{table: {tier or "id map": bytes}}`` of the compressed model (pruned tables
    absent)."""
    plt = _plt()
    tables = list(fp32_bytes)
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(tables)), 4))
    x = torch.arange(len(tables)).float()
    ax.bar(x - 0.2, [fp32_bytes[t] / 2**20 for t in tables], width=0.4, color="#cccccc", label="before (fp32)")
    bottom = [0.0] * len(tables)
    for tier, colour in TIER_COLOURS.items():
        h = [after.get(t, {}).get(tier, 0) / 2**20 for t in tables]
        if any(h):
            ax.bar(x + 0.2, h, width=0.4, bottom=bottom, color=colour, label=f"after: {tier}")
            bottom = [b + v for b, v in zip(bottom, h)]
    ax.set_xticks(x.tolist(), tables, rotation=90)
    ax.set_ylabel("MiB")
    ax.set_title("Embedding bytes per table")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_priorities(priorities: Dict[str, torch.Tensor], tiers: Dict[str, torch.Tensor], path: str,
                    never_used: Optional[int] = None) -> None:
    """Histogram of row priorities (log scale) over the compressed tables, with the lowest
    priority of each tier marked.  ``priorities``/``tiers`` may be a sample of the rows (a
    sharded run samples each rank's); ``never_used`` then counts all rows of priority 0."""
    from shark_torchrec.quant.tiers import TIER_ORDER

    plt = _plt()
    p = torch.cat([priorities[t].double() for t in tiers])
    k = torch.cat([tiers[t].long() for t in tiers])
    fig, ax = plt.subplots(figsize=(6, 4))
    positive = p[p > 0]
    if positive.numel():
        bins = torch.logspace(float(positive.min().log10()), float(positive.max().log10()) + 1e-9, 50)
        ax.hist(positive.numpy(), bins=bins.numpy(), color="#1f77b4")
        ax.set_xscale("log")
    for i, tier in enumerate(TIER_ORDER):
        sel = p[k == i]
        if sel.numel() and float(sel.min()) > 0:
            ax.axvline(float(sel.min()), color=TIER_COLOURS[tier.value], ls="--", label=f"{tier.value} from")
    ax.set_xlabel("row priority")
    ax.set_ylabel("rows")
    unused = int((p == 0).sum()) if never_used is None else never_used
    ax.set_title(f"Row priorities ({unused:,} rows never used"
                 + (f"; {p.numel():,} rows sampled)" if never_used is not None else ")"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(out: str, report: Dict, figures: List[str]) -> str:
    s = report["stages"]
    q = s["quantized"]
    ref = s.get("uncompressed, fine-tuned", s["trained"])
    lines = ["# SHARK report", "",
             f"**Embedding bytes:** {q['fp32_embedding_bytes'] / 2**20:.1f} MiB → "
             f"{q['embedding_bytes'] / 2**20:.1f} MiB ({q['bytes_saved_fraction']:.1%} saved"
             + (f"; rows padded to {report['row_alignment']} byte{'s' * (report['row_alignment'] != 1)}"
                if report.get("row_alignment") else "")
             + ").  ",
             f"**{report.get('eval_split', 'test').capitalize()} AUC:** {q['auc']:.4f} compressed, {ref['auc']:.4f} uncompressed "
             f"({q['auc'] - ref['auc']:+.4f}; both fine-tuned the same way).  "]
    if "lookup_speed_vs_fp32" in report:
        lines.append(f"**Embedding lookup:** {report['lookup_speed_vs_fp32']:.2f}× the fp32 "
                     f"collection's throughput on the test batches (the uncompressed model's collection, "
                     f"every field: pruned fields' lookups count as saved).")
    paired = report.get("paired") or {}
    if paired:
        c = paired["compressed vs uncompressed"]
        lines += ["", f"**Paired on the same {c['examples']:,} rows** ({c['bootstrap']} bootstrap "
                      f"resamples, {c['level']:.0%} intervals; seed {c['seed']}):", "",
                  "| comparison | ΔAUC | 95% CI | Δ log loss | 95% CI | verdict |",
                  "|---|---|---|---|---|---|"]
        for name, c in paired.items():
            lo, hi = c["delta_auc_ci"]
            llo, lhi = c["delta_log_loss_ci"]
            words = c["verdict"].split(": ", 1)[-1]
            lines.append(f"| {name} | {c['delta_auc']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                         f"{c['delta_log_loss']:+.4f} | [{llo:+.4f}, {lhi:+.4f}] | {words} |")
    if report.get("scorer") or report.get("row_priority"):
        lines += ["", f"Field scores: {report.get('scorer', '')}; row priorities: "
                      f"{report.get('row_priority', '')}."]
    rows = report.get("rows_per_tier")
    if rows:
        from shark_torchrec.quant.tiers import TIER_ORDER

        totals = [sum(c[i] for c in rows.values()) for i in range(len(TIER_ORDER))]
        text = ", ".join(f"{n:,} {t.value}" for t, n in zip(TIER_ORDER, totals) if n)
        k = report.get("centroids") or {}
        lines += ["", f"Rows: {text}" + (f" (sharing {sum(k.values()):,} centroids in {len(k)} tables)" if k else "")
                  + "."]
    lines += ["", "| stage | AUC | log loss |", "|---|---|---|"]
    for name, m in s.items():
        lines.append(f"| {name} | {m['auc']:.4f} | {m['log_loss']:.4f} |")
    attribution = report.get("quant_loss_attribution")
    if attribution:
        a = attribution["auc"]
        lines += ["", "**Where the quantization step loses** (AUC recovered when only these rows "
                      f"stay fp32, paired on the same rows; all rows: {a['quantized']:.4f} → "
                      f"{a['fp32']:.4f}):", "",
                  "| rows kept fp32 | rows | AUC recovered | 95% CI |", "|---|---|---|---|"]
        for kind in ("tiers", "tables"):
            for name, e in attribution[kind].items():
                lo, hi = e["ci"]
                lines.append(f"| {kind[:-1]} {name} | {e['rows']:,} | {e['recovered']:+.4f} | "
                             f"[{lo:+.4f}, {hi:+.4f}] |")
    plan = report.get("plan", {})
    if plan:
        lines += ["", f"Fields: {plan['fields_before']} → {plan['fields_after']} "
                      f"(dropped: {', '.join(plan['dropped_features']) or 'none'})."]
    lines += [""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in figures]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
