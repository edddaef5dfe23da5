"""Compress to fit: per-table tier mixes chosen so that a model's embedding tables fit a
topology, with the least predicted quality loss, then planned by TorchRec's planner.

Predicted loss of a table stored with a tier mix = Σ over its rows of priority × the tier's
quantization error.  Errors are *measured* once per (tier, dim) by quantizing Gaussian rows with
FBGEMM's own quantizers (relative squared error, DROP = 1).  Priorities come from
:class:`~shark_torchrec.importance.RowPriority` when a trained model's are at hand; for planning
a model before training (or for a topology you do not have), rows are assumed to be used with a
Zipf law of exponent ``zipf`` (popular rows first), integrated over ``buckets`` row quantiles so
that 40M-row tables cost nothing to plan.  The mix of all tables is chosen together by
Lagrangian relaxation over a price per byte (the same rule as
:func:`~shark_torchrec.quant.assign_by_budget`), and the resulting bytes — FBGEMM's row sizes,
16-byte alignment, the id map (the bits a table's rows need, packed).  The compressed model is then planned as what it
serves with: TorchRec's quantized collection holding one table per (table, tier) in that tier's
data type, with TorchRec's quant sharder and its own storage estimates (so the planner places
the compressed tables by their real bytes), and the id maps reserved on every device.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.quant_embeddingbag import QuantEmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from shark_torchrec.planning.storage import TrackerStorageReservation
from shark_torchrec.quant.id_map import TAIL_BYTES, entry_bits, table_map_bytes
from shark_torchrec.quant.tiers import (
    DEFAULT_ROW_ALIGNMENT,
    BudgetError,
    TIER_ORDER,
    Tier,
    lowest_price,
    quantization_error,
    row_bytes,
    sub_table_bytes,
)

_DATA_TYPES = {Tier.FP32: DataType.FP32, Tier.FP16: DataType.FP16, Tier.INT8: DataType.INT8,
               Tier.INT4: DataType.INT4, Tier.INT2: DataType.INT2}


_NO_SHARED = ("compress to fit: the SHARED tier's loss depends on the trained rows (their clusters), which "
              "a plan made without them cannot predict; plan with fp32..int2 and drop, and let the "
              "conversion (RowwiseQuantConfig tiers) share rows")


@lru_cache(maxsize=None)
def tier_error(tier: Tier, dim: int, samples: int = 2048) -> float:
    """Mean relative squared error of a Gaussian row of ``dim`` stored in ``tier`` (measured)."""
    if tier is Tier.SHARED:
        raise ValueError(_NO_SHARED)
    if tier is Tier.DROP:
        return 1.0
    w = torch.randn(samples, dim, generator=torch.Generator().manual_seed(dim))
    return float(quantization_error(w, tier).sum() / (w.double() ** 2).sum())


def zipf_bucket_mass(rows: int, zipf: float, buckets: int) -> Tuple[List[int], List[float]]:
    """Rows per bucket (geometric buckets, popular rows first) and each bucket's share of the
    accesses under a Zipf(``zipf``) law, from the integral of ``x^-s`` over the bucket."""
    edges = sorted({0, rows} | {min(rows, int(round(rows ** (i / buckets)))) for i in range(1, buckets)})

    def cdf(x: float) -> float:  # ∫_1^{x+1} t^-s dt, unnormalised
        if abs(zipf - 1.0) < 1e-9:
            return math.log(x + 1.0)
        return ((x + 1.0) ** (1.0 - zipf) - 1.0) / (1.0 - zipf)

    total = cdf(rows)
    counts = [b - a for a, b in zip(edges, edges[1:])]
    mass = [(cdf(b) - cdf(a)) / total for a, b in zip(edges, edges[1:])]
    return counts, mass


@dataclasses.dataclass
class TableCompression:
    """The tier mix chosen for one table: rows per tier, bytes and predicted loss."""

    name: str
    rows: Dict[str, int]
    bytes: int
    fp32_bytes: int
    predicted_loss: float
    #: False for a table left as it is (pinned ``"exclude"``): no id map, no sub-tables
    converted: bool = True

    @property
    def fractions(self) -> Dict[str, float]:
        total = sum(self.rows.values())
        return {t: n / total for t, n in self.rows.items() if n}


def compressed_bytes(rows_per_tier: Dict[Tier, int], dim: int, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
    """Bytes a table converted with these tiers holds: each tier's rows as an FBGEMM sub-table
    (its rows in FBGEMM's layout, cache-line aligned, as FBGEMM allocates it) and the table's
    id map (every converted table has one, a table in a single tier too) — what the collection
    holds for it, its group's :data:`~shark_torchrec.quant.id_map.TAIL_BYTES` aside (tested
    against the module's buffers)."""
    total_rows = sum(rows_per_tier.values())
    rows = sum(sub_table_bytes(t, n, dim, row_alignment) for t, n in rows_per_tier.items())
    return rows + table_map_bytes(total_rows)


def _fixed_mix(t: EmbeddingBagConfig, fractions: Dict[str, float], zipf: float, buckets: int,
               row_alignment: int) -> TableCompression:
    """A table whose tier mix is given (``{tier: fraction}``): the most popular rows in the
    most precise tier; its predicted loss gives each popularity bucket's mass its tier's error."""
    counts, mass = zipf_bucket_mass(t.num_embeddings, zipf, buckets)
    order = sorted((Tier.parse(k) for k in fractions), key=TIER_ORDER.index)
    rows: Dict[str, int] = {}
    start, acc = 0, 0.0
    for i, tier in enumerate(order):
        acc += fractions[tier.value]
        end = t.num_embeddings if i == len(order) - 1 else int(round(acc * t.num_embeddings))
        rows[tier.value] = end - start
        start = end
    edges, pos = [], 0
    for tier in order:
        pos += rows[tier.value]
        edges.append((pos, tier))
    seen, loss = 0, 0.0
    for n, m in zip(counts, mass):
        seen += n
        tier = next(tt for e, tt in edges if seen <= e)
        loss += m * tier_error(tier, t.embedding_dim)
    b = compressed_bytes({Tier(k): n for k, n in rows.items()}, t.embedding_dim, row_alignment)
    return TableCompression(t.name, rows, b, t.num_embeddings * row_bytes(Tier.FP32, t.embedding_dim, row_alignment),
                            loss)


#: Rounds of solving again for a budget less what padding took over it (see ``_solved``).
_FIT_ROUNDS = 8


def _solved(items, allowed: List[Tier], budget: int, row_alignment: int) -> Dict[str, TableCompression]:
    """Each popularity bucket of each table in the tier of least ``mass · error + λ · bytes``,
    at the lowest price ``λ`` whose bytes fit ``budget``."""

    def solve(lam: float):
        total, picks = 0.0, []
        for t, counts, mass, err, per_row, _ in items:
            choice = []
            for n, m in zip(counts, mass):
                k = min(range(len(allowed)), key=lambda i: m * err[i] + lam * n * per_row[i])
                choice.append(k)
                total += n * per_row[k]
            picks.append(choice)
        return picks, total

    # The price counts rows and id-map entries; the tables as stored also pad each tier's
    # sub-table to a cache line and the id map to a word: where that takes them over the budget,
    # solve again for the budget less the excess (a few rounds at most).
    target = budget
    for _ in range(_FIT_ROUNDS):
        try:
            picks, _ = solve(lowest_price(lambda lam: solve(lam)[1], target, iterations=80))
        except BudgetError:  # (the budget less the padding's excess is below the least bytes)
            raise BudgetError(f"the tables cannot fit {budget} bytes once their sub-tables and id maps "
                              f"are padded (the rows would need to fit {target} bytes)") from None
        out: Dict[str, TableCompression] = {}
        for (t, counts, mass, err, per_row, fp32), choice in zip(items, picks):
            rows: Dict[str, int] = {}
            loss = 0.0
            for n, m, k in zip(counts, mass, choice):
                rows[allowed[k].value] = rows.get(allowed[k].value, 0) + n
                loss += m * err[k]
            b = compressed_bytes({Tier(k): n for k, n in rows.items()}, t.embedding_dim, row_alignment)
            out[t.name] = TableCompression(t.name, rows, b, fp32, loss)
        excess = sum(c.bytes for c in out.values()) - budget
        if excess <= 0:
            return out
        target -= excess
    raise BudgetError(f"the tables cannot fit {budget} bytes once their sub-tables and id maps are padded "
                      f"({excess} bytes over after {_FIT_ROUNDS} rounds)")


def choose_compression(
    tables: Sequence[EmbeddingBagConfig],
    budget_bytes: int,
    tiers: Sequence[str] = ("fp32", "fp16", "int8", "int4", "int2", "drop"),
    pins: Optional[Dict[str, str]] = None,
    zipf: float = 1.05,
    buckets: int = 48,
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
    fractions: Optional[Dict[str, Dict[str, float]]] = None,
    table_budgets: Optional[Dict[str, int]] = None,
) -> Dict[str, TableCompression]:
    """Tier mixes for all ``tables`` within ``budget_bytes`` (all tables together, id maps
    included) minimising the predicted loss.  Per-table settings (as in the planner overrides
    file) are respected: ``pins`` ``{table: tier | "exclude"}`` fixes a table (``exclude``: kept
    fp32, no id map), ``fractions`` ``{table: {tier: fraction}}`` fixes its mix (the most
    popular rows in the most precise tier), ``table_budgets`` ``{table: bytes}`` gives it a
    budget of its own."""
    pins = dict(pins or {})
    fixed_tables: Dict[str, TableCompression] = {}
    for t in tables:
        if fractions and t.name in fractions:
            fixed_tables[t.name] = _fixed_mix(t, fractions[t.name], zipf, buckets, row_alignment)
        elif table_budgets and t.name in table_budgets:
            fixed_tables.update(choose_compression([t], table_budgets[t.name], tiers=tiers, zipf=zipf,
                                                   buckets=buckets, row_alignment=row_alignment))
    if fixed_tables:
        rest = [t for t in tables if t.name not in fixed_tables]
        out = dict(fixed_tables)
        if rest:
            out.update(choose_compression(rest, budget_bytes - sum(c.bytes for c in fixed_tables.values()),
                                          tiers=tiers, pins=pins, zipf=zipf, buckets=buckets,
                                          row_alignment=row_alignment))
        return {t.name: out[t.name] for t in tables}
    allowed = sorted({Tier.parse(t) for t in tiers}, key=TIER_ORDER.index)
    named = list(allowed) + [Tier.parse(v) for v in pins.values() if v != "exclude"]
    if Tier.SHARED in named:
        raise ValueError(_NO_SHARED)
    fixed_bytes = 0
    out: Dict[str, TableCompression] = {}
    items = []  # (table, bucket rows, bucket mass, cost per tier, bytes per tier)
    for t in tables:
        fp32 = t.num_embeddings * row_bytes(Tier.FP32, t.embedding_dim, row_alignment)
        if t.name in pins:
            tier = Tier.FP32 if pins[t.name] == "exclude" else Tier.parse(pins[t.name])
            b = fp32 if pins[t.name] == "exclude" else compressed_bytes({tier: t.num_embeddings}, t.embedding_dim, row_alignment)
            out[t.name] = TableCompression(t.name, {tier.value: t.num_embeddings}, b, fp32,
                                           tier_error(tier, t.embedding_dim), converted=pins[t.name] != "exclude")
            fixed_bytes += b
            continue
        counts, mass = zipf_bucket_mass(t.num_embeddings, zipf, buckets)
        err = [tier_error(tier, t.embedding_dim) for tier in allowed]
        per_row = [row_bytes(tier, t.embedding_dim, row_alignment) + entry_bits(t.num_embeddings) / 8
                   for tier in allowed]
        items.append((t, counts, mass, err, per_row, fp32))
    smallest = sum(sum(c) * min(p) for _, c, _, _, p, _ in items)
    if smallest > budget_bytes - fixed_bytes:
        raise BudgetError(f"the tables cannot fit {budget_bytes} bytes: at least "
                         f"{fixed_bytes + smallest} with tiers {[t.value for t in allowed]}")
    out.update(_solved(items, allowed, budget_bytes - fixed_bytes, row_alignment))
    return out


CRITEO_1TB_ROWS = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10, 2209,
    11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]  # TorchRec's DLRM example for Criteo 1TB (its --num_embeddings_per_feature)


def criteo_1tb_tables(dim: int = 128) -> List[EmbeddingBagConfig]:
    """The 26 tables of TorchRec's DLRM example for Criteo 1TB (about 178M rows)."""
    return [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=n,
                               feature_names=[f"cat_{i}"]) for i, n in enumerate(CRITEO_1TB_ROWS)]


class InferenceModel(nn.Module):
    """A planning skeleton: the quantized collection a (compressed) model would serve with, on
    the meta device — one TorchRec table per (table, tier), in that tier's data type."""

    def __init__(self, tables: Sequence[EmbeddingBagConfig],
                 compression: Optional[Dict[str, TableCompression]] = None,
                 row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> None:
        super().__init__()
        physical = []
        for t in tables:
            rows = {"fp32": t.num_embeddings} if compression is None else compression[t.name].rows
            for tier in TIER_ORDER:
                n = rows.get(tier.value, 0)
                if n and tier.stored:
                    suffix = "" if compression is None else f"@{tier.value}"
                    physical.append(EmbeddingBagConfig(
                        name=f"{t.name}{suffix}", embedding_dim=t.embedding_dim, num_embeddings=n,
                        feature_names=[f"{f}{suffix}" for f in t.feature_names],
                        data_type=_DATA_TYPES[tier]))
        self.ebc = QuantEmbeddingBagCollection(tables=physical, is_weighted=False,
                                               device=torch.device("meta"), row_alignment=row_alignment)


def plan_inference(
    tables: Sequence[EmbeddingBagConfig],
    topology: Topology,
    compression: Optional[Dict[str, TableCompression]] = None,
    batch_size: int = 512,
    device_only: bool = True,
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
) -> Tuple[ShardingPlan, EmbeddingShardingPlanner]:
    """Plan the inference model with TorchRec's planner and quant sharder (no devices needed).
    A compressed model's id maps (bit-packed, on every rank) are reserved up front.
    ``device_only``: tables must sit in device memory (the ``quant`` kernel), not in host memory
    through UVM.  Raises TorchRec's ``PlannerError`` when it does not fit."""
    # (every converted table's map, and the slack after its group's map: one group by default)
    id_map = 0 if compression is None else TAIL_BYTES + sum(
        table_map_bytes(sum(c.rows.values())) for c in compression.values() if c.converted)
    key = "ddr" if topology.compute_device == "cpu" else "hbm"
    model = InferenceModel(tables, compression, row_alignment)
    constraints = None
    if device_only:
        constraints = {c.name: ParameterConstraints(compute_kernels=[EmbeddingComputeKernel.QUANT.value])
                       for c in model.ebc.embedding_bag_configs()}
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints,
        storage_reservation=TrackerStorageReservation({key: id_map}))
    plan = planner.plan(model, [QuantEmbeddingBagCollectionSharder()])
    return plan, planner


def device_storage(planner: EmbeddingShardingPlanner, world_size: int) -> List[Dict[str, int]]:
    """Per-device planned storage (``hbm``, ``ddr``) of the planner's last plan."""
    out = [{"hbm": 0, "ddr": 0} for _ in range(world_size)]
    for so in planner._best_plan:
        for shard in so.shards:
            out[shard.rank]["hbm"] += shard.storage.hbm
            out[shard.rank]["ddr"] += shard.storage.ddr
    return out


def compress_to_fit(
    tables: Sequence[EmbeddingBagConfig],
    topology: Topology,
    pins: Optional[Dict[str, str]] = None,
    tiers: Sequence[str] = ("fp32", "fp16", "int8", "int4", "int2", "drop"),
    zipf: float = 1.05,
    batch_size: int = 512,
    max_tries: int = 40,
    fractions: Optional[Dict[str, Dict[str, float]]] = None,
    table_budgets: Optional[Dict[str, int]] = None,
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
) -> Tuple[Dict[str, TableCompression], ShardingPlan, EmbeddingShardingPlanner]:
    """Choose tier mixes that make the model fit ``topology``, then plan it (per-table
    ``pins``, ``fractions`` and ``table_budgets`` as in :func:`choose_compression`; rows
    padded to ``row_alignment`` bytes, 16 by default, which GPUs need).

    The byte budget starts at the topology's total capacity and shrinks by 5% until TorchRec's
    planner (with its own reservations, buffers and placement constraints) finds a plan."""
    cap_key = "ddr" if topology.compute_device == "cpu" else "hbm"
    budget = sum(getattr(d.storage, cap_key) for d in topology.devices)
    last: Optional[Exception] = None
    for _ in range(max_tries):
        compression = choose_compression(tables, int(budget), tiers=tiers, pins=pins, zipf=zipf,
                                         fractions=fractions, table_budgets=table_budgets,
                                         row_alignment=row_alignment)
        try:
            plan, planner = plan_inference(tables, topology, compression, batch_size,
                                           row_alignment=row_alignment)
            return compression, plan, planner
        except PlannerError as e:
            last = e
            budget *= 0.95
    raise PlannerError(f"no tier mix made the model fit after {max_tries} tries: {last}")
