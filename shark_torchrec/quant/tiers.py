"""Assigning every embedding row a precision tier (SHARK's F-Quantization).

Tiers are the precisions FBGEMM's inference kernels read — ``FP32``, ``FP16``, ``INT8``,
``INT4``, ``INT2`` (integer tiers row-wise quantized, each row with an fp16 scale and bias) —,
``SHARED`` (the row stores nothing of its own and reads as one of its table's FP16 centroid
rows: :mod:`~shark_torchrec.quant.shared_rows`) and ``DROP`` (the row reads as zeros and stores
nothing).

Two ways to assign them, from per-row priorities (:class:`~shark_torchrec.importance.RowPriority`)
or counts supplied by the user:

* :func:`assign_by_fractions` — rows sorted by priority; the top fraction gets the first tier,
  and so on (e.g. 10% FP16, 30% INT8, 60% INT4).
* :func:`assign_by_budget` — minimise ``Σ_v p[v] · err_tier(v)`` subject to the bytes of all
  tables ≤ budget, where ``err_tier(v)`` is the measured squared error of row ``v`` quantized to
  that tier (DROP: the row's squared norm).  Solved by Lagrangian relaxation: for a price ``λ``
  per byte, each row takes the tier minimising ``p·err + λ·bytes``; ``λ`` is the lowest price
  that meets the budget, found exactly from each row's breakpoints
  (:mod:`~shark_torchrec.quant.budget`; the result may leave a little of the budget unused).

Bytes come from FBGEMM's own helpers (``rounded_row_size_in_bytes``: scale/bias and row
alignment included; ``align_to_cacheline`` per physical sub-table).
"""

from __future__ import annotations

import enum
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    align_to_cacheline,
    rounded_row_size_in_bytes,
)

from shark_torchrec.errors import SharkInputError


class Tier(str, enum.Enum):
    """A row's storage precision."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"
    SHARED = "shared"
    DROP = "drop"

    @property
    def sparse_type(self) -> Optional[SparseType]:
        return None if self in (Tier.SHARED, Tier.DROP) else SparseType(self.value)

    @property
    def stored(self) -> bool:
        """Whether the tier's rows have rows of their own in a sub-table (not SHARED, DROP)."""
        return self not in (Tier.SHARED, Tier.DROP)

    @staticmethod
    def parse(name: "str | Tier") -> "Tier":
        try:
            return Tier(name.lower() if isinstance(name, str) else name)
        except ValueError:
            raise ValueError(
                f"unknown tier {name!r} (tiers: {[t.value for t in Tier]})"
            ) from None


class BudgetError(SharkInputError, ValueError):
    """A byte budget too small for what the converted tables must hold whatever the tiers
    (the id map, sub-table padding, pinned tables, the smallest tier each row may take); the
    message says how small."""


#: Tiers from most to least precise (the order priorities are mapped onto).
TIER_ORDER: Tuple[Tier, ...] = (Tier.FP32, Tier.FP16, Tier.INT8, Tier.INT4, Tier.INT2, Tier.SHARED, Tier.DROP)
#: How integer rows get their scale and bias when stored: FBGEMM's min/max, or fitted by least
#: squares (:mod:`~shark_torchrec.quant.rows`).
ROW_FITS = ("minmax", "lsq")


def check_row_fit(row_fit: str) -> str:
    """``row_fit`` if it is one of :data:`ROW_FITS`, else a ValueError naming it."""
    if row_fit not in ROW_FITS:
        raise ValueError(f"row_fit must be one of {ROW_FITS}, got {row_fit!r}")
    return row_fit


#: Where SHARED rows' centroids are stored (after the table's own FP16 rows).
CENTROID_TIER = Tier.FP16

#: Row alignment of FBGEMM's inference TBE on CUDA (on CPU it is 1); 16 is the conservative
#: choice for byte budgets, since a model may be served on either.
DEFAULT_ROW_ALIGNMENT = 16


def row_bytes(tier: Tier, dim: int, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
    """Bytes of one row in ``tier`` (0 for SHARED and DROP: no row of its own), as FBGEMM lays
    it out."""
    if not tier.stored:
        return 0
    return rounded_row_size_in_bytes(dim, tier.sparse_type, row_alignment)


def sub_table_bytes(tier: Tier, rows: int, dim: int, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
    """Bytes of a physical sub-table of ``rows`` rows in ``tier`` (cache-line aligned)."""
    if not tier.stored or rows == 0:
        return 0
    return align_to_cacheline(rows * row_bytes(tier, dim, row_alignment))


def quantization_error(weights: torch.Tensor, tier: Tier, row_fit: str = "minmax") -> torch.Tensor:
    """Squared L2 error per row of ``weights`` [N, D] stored in ``tier`` and read back
    (FBGEMM's row-wise format, integer rows with the row fit ``row_fit``:
    :mod:`~shark_torchrec.quant.rows`; DROP: the squared norm; SHARED depends on the
    centroids: :class:`~shark_torchrec.quant.shared_rows.SharedRows`)."""
    if tier is Tier.SHARED:
        raise ValueError("the SHARED tier's error depends on the table's centroids (SharedRows.error)")
    w = weights.detach().float().cpu().contiguous()
    if tier is Tier.FP32:
        return torch.zeros(w.shape[0], dtype=torch.float64)
    if tier is Tier.DROP:
        back = torch.zeros_like(w)
    elif tier is Tier.FP16:
        back = w.half().float()
    else:
        from shark_torchrec.quant.rows import fused_nbit_rows, read_fused_rows  # (rows.py builds on this module)

        bits = {Tier.INT8: 8, Tier.INT4: 4, Tier.INT2: 2}[tier]
        back = read_fused_rows(fused_nbit_rows(w, bits, row_fit), bits, w.shape[1])
    return ((w - back).double() ** 2).sum(1)


@dataclass
class TierAssignment:
    """Per-row tiers of a set of tables.

    Attributes:
        tiers: ``{table: int8 tensor [rows]}`` of indices into :data:`TIER_ORDER`.
        dims: ``{table: embedding_dim}``.
        row_alignment: the row alignment bytes were computed with.
        method: how it was chosen (for reports).
        shared: ``{table: SharedRows}`` for tables with SHARED rows: their centroids (stored in
            the table's FP16 sub-table) and each row's centroid.
        row_fit: how integer rows get their scale and bias when stored (``"minmax"``, FBGEMM's,
            or ``"lsq"``: :mod:`~shark_torchrec.quant.rows`); the errors the tiers were chosen
            by are those of this fit.
    """

    tiers: Dict[str, torch.Tensor]
    dims: Dict[str, int]
    row_alignment: int = DEFAULT_ROW_ALIGNMENT
    method: str = ""
    details: Dict[str, float] = field(default_factory=dict)
    shared: Dict[str, object] = field(default_factory=dict)
    row_fit: str = "minmax"

    def rows_per_tier(self, table: str) -> Dict[Tier, int]:
        counts = torch.bincount(self.tiers[table].long(), minlength=len(TIER_ORDER))
        return {t: int(counts[i]) for i, t in enumerate(TIER_ORDER) if counts[i] > 0}

    def bytes_per_tier(self, table: str) -> Dict[Tier, int]:
        """Bytes of each tier's physical sub-table of ``table`` (cache-line aligned; the FP16
        one holds the SHARED rows' centroids too)."""
        rows = self.rows_per_tier(table)
        if table in self.shared:
            rows[CENTROID_TIER] = rows.get(CENTROID_TIER, 0) + self.shared[table].k
        return {t: sub_table_bytes(t, n, self.dims[table], self.row_alignment) for t, n in rows.items()}

    def table_bytes(self, table: str) -> int:
        return sum(self.bytes_per_tier(table).values())

    @property
    def total_bytes(self) -> int:
        return sum(self.table_bytes(t) for t in self.tiers)

    def report(self) -> Dict[str, Dict[str, object]]:
        """``{table: {"rows": {tier: n}, "bytes": {tier: b}, "total_bytes": b,
        "fp32_bytes": b}}`` (fp32 bytes: the same table stored uncompressed)."""
        out = {}
        for name, t in self.tiers.items():
            out[name] = {
                "rows": {k.value: v for k, v in self.rows_per_tier(name).items()},
                "bytes": {k.value: v for k, v in self.bytes_per_tier(name).items()},
                "total_bytes": self.table_bytes(name),
                "fp32_bytes": sub_table_bytes(Tier.FP32, t.numel(), self.dims[name], self.row_alignment),
            }
        return out


def _check_priorities(priorities: Dict[str, torch.Tensor], dims: Dict[str, int]) -> None:
    unknown = sorted(set(priorities) - set(dims))
    missing = sorted(set(dims) - set(priorities))
    if unknown or missing:
        raise ValueError(f"priorities do not match the tables: unknown {unknown}, missing {missing}")
    for name, p in priorities.items():
        if p.dim() != 1:  # (sorted along a [n, 1] tensor's last dim, every row ranked first)
            raise ValueError(f"table {name!r}: priorities must be one per row (1-D), got shape {tuple(p.shape)}")
        bad = ~torch.isfinite(p) | (p < 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(f"table {name!r}: priority of row {row} is {float(p[row])} "
                             f"(must be finite and >= 0)")


def assign_by_fractions(
    priorities: Dict[str, torch.Tensor],
    dims: Dict[str, int],
    fractions: Dict["str | Tier", float],
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
    row_fit: str = "minmax",
) -> TierAssignment:
    """Tiers by fractions of rows, per table: the highest-priority rows get the most precise
    tier named.  ``fractions`` (e.g. ``{"fp16": .1, "int8": .3, "int4": .6}``) must sum to 1;
    ties are broken by row id (lower first), so the result is deterministic.  ``row_fit``: how
    the rows will be stored (:attr:`TierAssignment.row_fit`)."""
    _check_priorities(priorities, dims)
    fr = {Tier.parse(k): float(v) for k, v in fractions.items()}
    if any(v < 0 for v in fr.values()) or not math.isclose(sum(fr.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"tier fractions must be >= 0 and sum to 1, got {fractions}")
    if fr.get(Tier.SHARED, 0) > 0:
        raise ValueError("assign_by_fractions: the SHARED tier needs centroids per table; use "
                         "shark_torchrec.quant.assign_tiers (or quantize_) with a RowwiseQuantConfig")
    order = [t for t in TIER_ORDER if fr.get(t, 0) > 0]
    tiers = {}
    for name, p in priorities.items():
        n = p.numel()
        # Stable sort by descending priority: ties keep ascending row ids.
        rank = torch.sort(-p.double(), stable=True).indices
        out = torch.empty(n, dtype=torch.int8)
        start, acc = 0, 0.0
        for i, t in enumerate(order):
            acc += fr[t]
            end = n if i == len(order) - 1 else min(n, int(round(acc * n)))
            out[rank[start:end]] = TIER_ORDER.index(t)
            start = end
        tiers[name] = out
    return TierAssignment(tiers, dict(dims), row_alignment,
                          method="fractions " + ", ".join(f"{t.value}={fr[t]:g}" for t in order),
                          row_fit=check_row_fit(row_fit))


def lowest_price(bytes_at: Callable[[float], float], budget: float, iterations: int = 60) -> float:
    """The (near-)lowest price per byte ``λ >= 0`` at which the Lagrangian choice
    ``bytes_at(λ)`` fits ``budget`` (bisection; bytes fall as the price rises).  The caller
    checks first that the budget can be met at all; where it did not and no price meets it,
    raises :class:`BudgetError` (the search's upper price grew past any float: it looped for
    ever)."""
    if bytes_at(0.0) <= budget:
        return 0.0
    lo, hi = 0.0, 1e-12
    while bytes_at(hi) > budget:
        hi *= 4.0
        if not math.isfinite(hi):
            raise BudgetError(f"no price per byte brings the bytes within the budget of {budget} bytes "
                              f"(at the highest: {bytes_at(sys.float_info.max)} bytes)")
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if bytes_at(mid) > budget:
            lo = mid
        else:
            hi = mid
    return hi


def assign_by_budget(
    priorities: Dict[str, torch.Tensor],
    weights: Dict[str, torch.Tensor],
    budget_bytes: int,
    tiers: Sequence["str | Tier"] = ("fp16", "int8", "int4", "int2", "drop"),
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
    drop_rows: str = "any",
    column_blocks: Optional[Dict[str, Sequence[int]]] = None,
    row_fit: str = "minmax",
) -> TierAssignment:
    """Tiers minimising the priority-weighted quantization error within ``budget_bytes``
    (all tables together), by the exact Lagrangian search of :mod:`~shark_torchrec.quant.budget`
    (the lowest price per byte that meets the budget; every row takes its least
    ``p·err + price·bytes`` tier).  Rows are read in chunks: no copy of a table is made.

    Args:
        priorities: ``{table: [rows]}`` priorities (or counts), >= 0.
        weights: ``{table: [rows, dim]}`` float weights (the errors are measured on them).
        budget_bytes: bytes for all tables' rows (per-row bytes; the cache-line padding of each
            sub-table, at most 127 bytes per sub-table, comes on top and is in the report).
        tiers: the tiers rows may take.
        drop_rows: which rows DROP may take: ``"any"``, or ``"unused"`` (only rows whose
            priority is 0: rows training never read, still at their initial values).  The
            priority-weighted squared error prices dropping a rarely used row low, yet zeroing
            it hurt AUC far more than storing it in INT2 (see ``attribute_quantization_loss``).
        column_blocks: ``{table: [widths]}`` for tables stored in column blocks (column-wise
            sharding): each block is quantized apart (its own scale and bias), so a row's error
            is the sum of its blocks' errors and its bytes those of every block.
        row_fit: how integer rows will be stored (:attr:`TierAssignment.row_fit`); their errors
            are measured so.
    """
    from shark_torchrec.quant import budget as B  # (budget.py builds on this module)

    check_row_fit(row_fit)
    if drop_rows not in ("any", "unused"):
        raise ValueError(f"drop_rows must be 'any' or 'unused', got {drop_rows!r}")
    dims = {name: int(w.shape[1]) for name, w in weights.items()}
    _check_priorities(priorities, dims)
    allowed = sorted({Tier.parse(t) for t in tiers}, key=TIER_ORDER.index)
    if not allowed:
        raise ValueError("no tiers allowed")
    if drop_rows == "unused" and allowed == [Tier.DROP]:
        raise ValueError("drop_rows='unused' closes DROP to rows in use, and tiers ['drop'] leave them no "
                         "other: allow another tier")
    if Tier.SHARED in allowed:
        raise ValueError("assign_by_budget: the SHARED tier needs centroids per table; use "
                         "shark_torchrec.quant.assign_tiers (or quantize_) with a RowwiseQuantConfig")
    blocks = {n: list((column_blocks or {}).get(n, [dims[n]])) for n in weights}
    for name, w in weights.items():
        if w.shape[0] != priorities[name].numel():
            raise ValueError(f"table {name!r}: {priorities[name].numel()} priorities for "
                             f"{w.shape[0]} rows")
        if sum(blocks[name]) != dims[name]:
            raise ValueError(f"table {name!r}: column blocks {blocks[name]} do not add up to dim {dims[name]}")
    scale = B.priority_scale(max([float(p.max()) for p in priorities.values() if p.numel()] or [0.0]))
    choices = {}
    for name, w in weights.items():
        sizes = B.tier_sizes(blocks[name], allowed, row_alignment)
        choices[name] = table_choices(name, w, priorities[name].double() * scale, allowed, sizes, blocks[name],
                                      drop_rows, row_fit)
    smallest = sum(B.smallest_bytes(c) for c in choices.values())
    if smallest > budget_bytes:
        raise BudgetError(f"budget {budget_bytes} bytes is below the smallest possible size "
                          f"{int(smallest)} with tiers {[t.value for t in allowed]}")
    price = B.price_for_budget(list(choices.values()), budget_bytes)
    out = {name: B.pick(c, price) for name, c in choices.items()}
    total = sum(int(B.tier_sizes(blocks[n], TIER_ORDER, row_alignment)[t.long()].sum()) for n, t in out.items())
    return TierAssignment(out, dims, row_alignment, method=f"budget {budget_bytes} bytes (drop {drop_rows} rows)",
                          details={"row_bytes": total, "lambda": B.price_value(price) / scale}, row_fit=row_fit)


def table_choices(name: str, weights: torch.Tensor, priorities: torch.Tensor, allowed: Sequence[Tier],
                  sizes: torch.Tensor, blocks: Sequence[int], drop_rows: str = "any", row_fit: str = "minmax"):
    """:class:`~shark_torchrec.quant.budget.RowChoices` of a table's rows, read in chunks;
    ``blocks``: the widths of its column blocks in ``weights`` (each measured apart, the later
    blocks' errors added to the first's); errors of integer rows stored with ``row_fit``.  A
    non-finite row is an error naming the table and the row."""
    from shark_torchrec.quant import budget as B

    parts = []
    n = weights.shape[0]
    edges = [0]
    for b in blocks:
        edges.append(edges[-1] + b)
    for r0 in range(0, max(n, 1), B.CHUNK_ROWS):
        r1 = min(n, r0 + B.CHUNK_ROWS)
        extra = None
        for c0, c1 in zip(edges[1:], edges[2:]):
            e = B.tier_errors(weights[r0:r1, c0:c1], allowed, row_fit=row_fit)
            extra = e if extra is None else extra.add_(e)
        choices, bad = B.measure_choices(weights[r0:r1, edges[0]:edges[1]], priorities[r0:r1], allowed, sizes,
                                         drop_rows, extra, row_fit=row_fit)
        if bad >= 0 or (extra is not None and bool(torch.isnan(extra).any())):
            row = r0 + (bad if bad >= 0 else int(torch.isnan(extra).any(1).nonzero()[0]))
            raise ValueError(f"table {name!r}: row {row} of the weights {B.unstorable_row(weights[row])}")
        parts.append(choices)
    return B.RowChoices.concat(parts)


def weighted_error(assignment: "TierAssignment", priorities: Dict[str, torch.Tensor],
                   weights: Dict[str, torch.Tensor]) -> float:
    """``Σ_v p[v] · err_tier(v)`` of an assignment (what :func:`assign_by_budget` minimises)."""
    total = 0.0
    for name, t in assignment.tiers.items():
        err = torch.stack([quantization_error(weights[name], tier, assignment.row_fit) if tier is not Tier.SHARED
                           else assignment.shared[name].error if name in assignment.shared
                           else torch.zeros(t.numel(), dtype=torch.float64) for tier in TIER_ORDER], 1)
        total += float((priorities[name].double() * err.gather(1, t.long().unsqueeze(1)).squeeze(1)).sum())
    return total
