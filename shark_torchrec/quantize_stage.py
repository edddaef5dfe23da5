"""The SHARK pipeline's quantize stage, run where the shards lie (every rank, no table gathered):

1. the row priorities are read from the train stage's sharded counters, each rank asking for
   the rows whose tiers it decides (:meth:`~shark_torchrec.importance.RowPriority.rows`);
2. the pruned model (still sharded by DMP) is converted in place
   (:func:`~shark_torchrec.sharded.quantize_sharded_dlrm`): a sharded mixed collection;
3. every stage's model is evaluated sharded (AUC and log loss reduced over ranks), and only
   their logits are gathered, for the paired comparisons;
4. the compressed model is exported, each rank writing its part
   (:func:`~shark_torchrec.sharded.export.export_sharded`), and its tiers are saved per rank.

Memory per rank: its own shards (fp32, of the pruned and the reference models), their
quantized form, and a chunk of rows at a time.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.evaluation import PairedBootstrap
from shark_torchrec.importance import RowPriority
from shark_torchrec.quant.attribution import attribution_report
from shark_torchrec.quant.config import RowwiseQuantConfig
from shark_torchrec.quant.id_map import map_bytes
from shark_torchrec.quant.tiers import CENTROID_TIER, TIER_ORDER, Tier, sub_table_bytes
from shark_torchrec.sharded import Comm, ShardedLayout, build_sharded_collection, quantize_sharded_dlrm
from shark_torchrec.sharded.collection import ShardedRowwiseMixedEmbeddingBagCollection
from shark_torchrec.sharded.layout import collection_layout
from shark_torchrec.training.trainer import DLRMTrainer, evaluate_model

logger = logging.getLogger(__name__)

#: Rows per table each rank samples for the row-priority plot.
PLOT_SAMPLE_ROWS = 4096


def priority_rows(counters: RowPriority, requests: Sequence[Tuple[str, int, int]], mix: Dict[str, float],
                  table_scale: Optional[Dict[str, float]] = None) -> Dict[Tuple[str, int], torch.Tensor]:
    """Collective: ``{(table, row_offset): priorities}`` of the requested rows, ``Σ coef ·
    channel`` times the table's scale (``table_scale``, default 1)."""
    got = counters.rows(requests, mix)
    scale = table_scale or {}
    return {(t, r0): p * scale.get(t, 1.0) for (t, r0, _), p in zip(requests, got)}


# ------------------------------------------------------------------------------ bytes
def shard_counts(tiers: Dict[str, torch.Tensor], comm: Comm, shared: Optional[Dict[str, Any]] = None
                 ) -> Dict[str, List[int]]:
    """``{shard: rows per TIER_ORDER tier}`` of every shard, on every rank (small); the FP16
    count includes the shard's centroids (``shared``: its SharedRows), stored among them."""
    mine = {k: torch.bincount(v.long(), minlength=len(TIER_ORDER)).tolist() for k, v in tiers.items()}
    for k, s in (shared or {}).items():
        mine[k][TIER_ORDER.index(CENTROID_TIER)] += s.k
    out: Dict[str, List[int]] = {}
    for part in comm.all_gather_object(mine):
        out.update(part)
    return out


def bytes_per_table(layout: ShardedLayout, counts: Dict[str, List[int]], row_alignment: int
                    ) -> Dict[str, Dict[str, int]]:
    """``{table: {tier: bytes, "id map": bytes}}``: what the sharded collection holds (every
    shard's sub-tables, cache-line aligned as FBGEMM allocates them, and id maps)."""
    out: Dict[str, Dict[str, int]] = {}
    widths = layout.map_bits(layout.shards)
    for s in layout.shards:
        table = out.setdefault(s.table, {})
        for tier, n in zip(TIER_ORDER, counts[s.name]):
            b = sub_table_bytes(tier, n, s.cols, row_alignment)
            if b:
                table[tier.value] = table.get(tier.value, 0) + b
        table["id map"] = table.get("id map", 0) + map_bytes(s.rows, widths[s.name])
    return out


# ------------------------------------------------------------------------------ tiers on disk
#: The key of the tier order in a row-tiers file (files without it used the order before SHARED).
_ORDER_KEY = "__tier_order__"
_ORDER_BEFORE_SHARED = [t.value for t in TIER_ORDER if t is not Tier.SHARED]


def save_row_tiers(directory: str, layout: ShardedLayout, tiers: Dict[str, torch.Tensor], comm: Comm) -> None:
    """Every row's tier (:data:`TIER_ORDER` index), each rank writing the row groups it
    decides (``rank-<r>.pt``: ``{(table, row_offset): tiers}``, and the tier order)."""
    os.makedirs(directory, exist_ok=True)
    mine: Dict[str, Any] = {_ORDER_KEY: [t.value for t in TIER_ORDER]}
    for t in layout.tables:
        for g in layout.row_groups(t["name"]):
            if g.leader == comm.rank:
                mine[f"{g.table}@{g.row_offset}"] = tiers[g.blocks[0].name].clone()
    torch.save(mine, os.path.join(directory, f"rank-{comm.rank:05d}.pt"))
    comm.barrier()


def read_row_tiers(directory: str) -> Dict[str, torch.Tensor]:
    """``{table: tiers of every row}`` from :func:`save_row_tiers`' parts (whole tables: for
    tools and small models)."""
    parts: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("rank-") and name.endswith(".pt"):
            saved = torch.load(os.path.join(directory, name), weights_only=True)
            order = saved.pop(_ORDER_KEY, _ORDER_BEFORE_SHARED)
            lut = torch.tensor([TIER_ORDER.index(Tier(v)) for v in order], dtype=torch.int8)
            for key, t in saved.items():
                table, r0 = key.rsplit("@", 1)
                parts.setdefault(table, []).append((int(r0), lut[t.long()]))
    return {t: torch.cat([x for _, x in sorted(p, key=lambda q: q[0])]) for t, p in parts.items()}


# ------------------------------------------------------------------------------ evaluation
def evaluate(model, batches, env, desc: str) -> Dict[str, Any]:
    """A sharded model's AUC and log loss over all ranks, with every example's logit and label
    (gathered in global order)."""
    if isinstance(model, DLRMTrainer):
        return model.evaluate(batches, desc=desc, return_predictions=True)
    model.eval()
    return evaluate_model(model, batches, env, desc, return_predictions=True)


PREDICTIONS_FILE = "predictions.pt"


def save_predictions(path: str, reference: Dict[str, Any], pruned: Dict[str, Any], quantized: Dict[str, Any]) -> None:
    """The evaluation rows' labels and each model's logits (float32, in the evaluation's global
    order: the same rows in the same order for every run on the same data and batch size)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"labels": reference["labels"].float(), "reference": reference["logits"].float(),
                "pruned": pruned["logits"].float(), "quantized": quantized["logits"].float()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def paired(reference: Dict[str, Any], pruned: Dict[str, Any], quantized: Dict[str, Any], bootstrap: int,
           seed: int) -> Dict[str, Any]:
    """Paired comparisons on the same evaluation rows: the compressed model, the pruning step
    and the quantization step, each with a bootstrap interval and a verdict in words."""
    for name, m in (("pruned", pruned), ("quantized", quantized)):
        if not torch.equal(reference["labels"], m["labels"]):
            raise RuntimeError(f"the {name} and the reference evaluations saw different rows")
    boot = PairedBootstrap(reference["labels"].numpy(),
                           {"uncompressed": reference["logits"].numpy(), "pruned": pruned["logits"].numpy(),
                            "quantized": quantized["logits"].numpy()},
                           bootstrap=bootstrap, seed=seed)
    out = {}
    for name, (ref, new) in {"compressed vs uncompressed": ("uncompressed", "quantized"),
                             "pruning step (pruned vs uncompressed)": ("uncompressed", "pruned"),
                             "quantization step (quantized vs pruned)": ("pruned", "quantized")}.items():
        c = boot.compare(ref, new)
        out[name] = {**c.to_dict(), "verdict": c.verdict()}
    return out


def attribute(model, weights: Dict[str, torch.Tensor], tiers: Dict[str, torch.Tensor], rows_per_tier: Dict[str, List[int]],
              evaluate_logits: Callable[[], torch.Tensor], fp32_logits: torch.Tensor,
              quantized_logits: torch.Tensor, labels: torch.Tensor, row_alignment: int, comm: Comm,
              bootstrap: int, seed: int, shared: Optional[Dict[str, Any]] = None,
              row_fit: str = "minmax") -> Dict[str, object]:
    """Where the quantization step loses: the AUC each tier's rows and each table's rows give
    back when only they stay fp32, each by converting the sharded model again with those rows
    in FP32 and evaluating it (every variant sharded; the model's collection is restored)."""
    sparse = model.model.sparse_arch
    original = sparse.embedding_bag_collection
    layout: ShardedLayout = original.layout
    fp32 = TIER_ORDER.index(Tier.FP32)
    groups: Dict[str, Callable[[str, torch.Tensor], torch.Tensor]] = {}
    rows: Dict[str, int] = {"fp32": sum(sum(c) for c in rows_per_tier.values())}
    for i, tier in enumerate(TIER_ORDER):
        n = sum(c[i] for c in rows_per_tier.values())
        if tier is not Tier.FP32 and n:
            groups[f"tier:{tier.value}"] = lambda shard, t, i=i: torch.where(t == i, fp32, t).to(torch.int8)
            rows[f"tier:{tier.value}"] = n
    for table in sorted(rows_per_tier):
        groups[f"table:{table}"] = lambda shard, t, table=table: (
            torch.full_like(t, fp32) if shard.rsplit("#", 1)[0] == table else t)
        rows[f"table:{table}"] = sum(rows_per_tier[table])
    logits = {"fp32": fp32_logits, "quantized": quantized_logits}
    try:
        for key, change in groups.items():
            variant = {name: change(name, t) for name, t in tiers.items()}
            sparse.embedding_bag_collection = build_sharded_collection(
                layout, weights, variant, row_alignment, comm, check_ids=original.check_ids, shared=shared,
                row_fit=row_fit)
            logits[key] = evaluate_logits()
            sparse.embedding_bag_collection = original  # before the next variant is built
            gc.collect()
    finally:
        sparse.embedding_bag_collection = original
    return attribution_report(logits, labels, rows, bootstrap, seed)


@torch.no_grad()
def lookup_speed(fp32_ebc, mixed: ShardedRowwiseMixedEmbeddingBagCollection, batches: List[KeyedJaggedTensor],
                 comm: Comm) -> float:
    """Throughput of the sharded compressed collection over the sharded uncompressed one on
    the same batches (each rank its part; both forwards are collectives).  Batches are timed
    one at a time, the two collections alternating, with Python's garbage collector paused:
    the ratio of the median per-batch times over 7 passes (the first a warm-up), averaged over
    ranks."""
    times = {"fp32": [], "mixed": []}

    def run(module, kjt):
        out = module(kjt)
        return out.wait() if hasattr(out, "wait") else out

    for p in range(7):
        gc.collect()
        gc.disable()
        try:
            for kjt in batches:
                for name, module in (("fp32", fp32_ebc), ("mixed", mixed)):
                    t0 = time.perf_counter()
                    run(module, kjt)
                    if p:
                        times[name].append(time.perf_counter() - t0)
        finally:
            gc.enable()
    ratio = statistics.median(times["fp32"]) / statistics.median(times["mixed"])
    return float(comm.all_reduce(torch.tensor([ratio], dtype=torch.float64))[0]) / comm.world


def sample_priorities(requests: Sequence[Tuple[str, int, int]], priorities: Dict[Tuple[str, int], torch.Tensor],
                      layout: ShardedLayout, tiers: Dict[str, torch.Tensor], comm: Comm, seed: int
                      ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], int]:
    """For the row-priority plot: a sample of (priority, tier) per table, on every rank, and
    the number of rows never used (all rows, counted over ranks)."""
    g = torch.Generator().manual_seed(seed + comm.rank)
    mine: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    unused = 0
    for t, r0, n in requests:
        p = priorities[(t, r0)]
        group = next(x for x in layout.row_groups(t) if x.row_offset == r0)
        k = tiers[group.blocks[0].name]
        unused += int((p == 0).sum())
        pick = torch.randperm(n, generator=g)[:PLOT_SAMPLE_ROWS] if n > PLOT_SAMPLE_ROWS else torch.arange(n)
        a, b = mine.get(t, (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int8)))
        mine[t] = (torch.cat([a, p[pick]]), torch.cat([b, k[pick]]))
    prio: Dict[str, List[torch.Tensor]] = {}
    tier: Dict[str, List[torch.Tensor]] = {}
    for part in comm.all_gather_object(mine):
        for t, (a, b) in part.items():
            prio.setdefault(t, []).append(a)
            tier.setdefault(t, []).append(b)
    unused = int(comm.all_reduce(torch.tensor([unused]))[0])
    return {t: torch.cat(v) for t, v in prio.items()}, {t: torch.cat(v) for t, v in tier.items()}, unused


def fp32_weights(model) -> Tuple[ShardedLayout, Dict[str, torch.Tensor]]:
    """The layout and this rank's fp32 shards (views) of a DMP-sharded DLRMTrain's collection."""
    ebc = model.module.model.sparse_arch.embedding_bag_collection
    comm = Comm()
    layout, weights = collection_layout(ebc, comm.rank, comm.world)
    return layout, {k: v.detach() for k, v in weights.items()}


@dataclasses.dataclass
class QuantizeResult:
    """What the quantize stage gives the report (metrics with logits popped)."""

    metrics: Dict[str, Any]
    pruned: Dict[str, Any]
    reference: Dict[str, Any]
    paired: Dict[str, Any]
    speed: float
    attribution: Optional[Dict[str, object]]
    bytes_per_table: Dict[str, Dict[str, int]]
    rows_per_tier: Dict[str, List[int]]
    plot_priorities: Dict[str, torch.Tensor]
    plot_tiers: Dict[str, torch.Tensor]
    unused_rows: int
    centroids: Dict[str, int]  # per table (all its shards'), where rows share


def quantize_stage(pruned: DLRMTrainer, reference: DLRMTrainer, config: RowwiseQuantConfig,
                   counters: RowPriority, mix: Dict[str, float], table_scale: Dict[str, float],
                   eval_batches: Callable[[], Any], speed_batches: List[KeyedJaggedTensor], env, out: str,
                   attribute_loss: bool, bootstrap: int, seed: int, export: Callable[[Any, Dict[str, Any]], None]
                   ) -> QuantizeResult:
    """Run the stage on every rank (see the module docstring); ``export(model, metrics)``
    writes the compressed model."""
    comm = Comm()
    layout, weights = fp32_weights(pruned.model)
    requests = layout.led_by(comm.rank)
    prio = priority_rows(counters, requests, mix, table_scale)
    pruned_eval = evaluate(pruned, eval_batches(), env, "eval (pruned)")
    reference_eval = evaluate(reference, eval_batches(), env, "eval (reference)")
    t0 = time.perf_counter()
    model, assignment = quantize_sharded_dlrm(pruned.model, config, lambda t, r0, n: prio[(t, r0)], comm)
    logger.info("row-wise mixed precision, sharded over %d ranks: %.1f s", comm.world, time.perf_counter() - t0)
    metrics = evaluate(model, eval_batches(), env, "eval (quantized)")
    counts = shard_counts(assignment.tiers, comm, assignment.shared)
    per_table = bytes_per_table(layout, counts, config.row_alignment)
    save_row_tiers(os.path.join(out, "quantize", "row_tiers"), layout, assignment.tiers, comm)
    export(model, metrics)
    metrics["embedding_bytes"] = sum(sum(v.values()) for v in per_table.values())
    comparisons = paired(reference_eval, pruned_eval, metrics, bootstrap, seed)
    if comm.rank == 0:  # every example's logit, for comparisons across runs (tools/frontier.py)
        save_predictions(os.path.join(out, "quantize", PREDICTIONS_FILE), reference_eval, pruned_eval, metrics)
    attribution = None
    if attribute_loss:
        attribution = attribute(model, weights, assignment.tiers, assignment.rows_per_tier,
                                lambda: evaluate(model, eval_batches(), env, "eval (attribution)")["logits"],
                                pruned_eval["logits"], metrics["logits"], metrics["labels"], config.row_alignment,
                                comm, bootstrap, seed, assignment.shared, assignment.row_fit)
    fp32_ebc = reference.model.module.model.sparse_arch.embedding_bag_collection
    speed = lookup_speed(fp32_ebc, model.model.sparse_arch.embedding_bag_collection, speed_batches, comm)
    plot_p, plot_t, unused = sample_priorities(requests, prio, layout, assignment.tiers, comm, seed)
    for m in (metrics, pruned_eval, reference_eval):
        m.pop("logits"), m.pop("labels")
    return QuantizeResult(metrics, pruned_eval, reference_eval, comparisons, speed, attribution, per_table,
                          assignment.rows_per_tier, plot_p, plot_t, unused, assignment.centroids)


def lookup_batches(spec, batch_size: int, limit: Optional[int], env) -> List[KeyedJaggedTensor]:
    """This rank's test batches' sparse features, for :func:`lookup_speed`."""
    ds = spec.dataset("test", batch_size, env.rank, env.world_size, max_batches=limit)
    return [b.sparse_features for b in spec.batches(ds, 0)]
