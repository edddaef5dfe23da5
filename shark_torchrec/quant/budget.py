"""Tier choices for byte budgets and row fractions, at memory speed and over any number of
processes.

**Byte budget.**  Minimise ``Σ_v p[v] · err_tier(v)`` subject to ``Σ_v bytes_tier(v) ≤ budget``
(:func:`~shark_torchrec.quant.tiers.assign_by_budget`).  For a price ``λ`` per byte each row
takes the tier minimising ``p · err + λ · bytes``; as ``λ`` rises a row moves to smaller tiers
at a few prices, the breakpoints of its lower convex hull of ``(bytes, cost)`` points.  So:

1. one pass over the rows measures every tier's error and each row's breakpoints
   (:func:`row_choices`, in chunks: memory bounded, no fp32 copy of a table);
2. the lowest price whose savings reach ``bytes at price 0 − budget`` is found exactly from
   histograms of the bytes saved at each breakpoint (:func:`price_for_budget`: the price's float32
   bits 16 at a time).  The histograms are integer byte counts summed by ``reduce``: the
   identity in one process, an all-reduce over ranks — so every process count finds the same
   price;
3. one pass reads each row's tier at that price (:func:`pick`).

This is the Lagrangian relaxation solved exactly (every breakpoint at or below the price is
taken), where bisecting the price needed a pass over all rows per step.

**Row fractions.**  ``{tier: fraction}`` per table: the highest-priority rows get the first tier
(ties by row id).  :func:`fraction_tiers` finds each boundary's priority by the same kind of
exact histogram selection, so rows need not be sorted, nor be in one process.

The per-row work runs in the C++ kernels of ``csrc/tier_choice.cpp`` (:mod:`.cpu_kernel`),
multi-threaded over rows; where they cannot be built, in plain torch (same results up to the
float rounding of the error sums).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.quant.tiers import TIER_ORDER, Tier, check_row_fit, quantization_error, row_bytes

#: Sums a tensor over the processes that share a budget (identity: one process).
Reduce = Callable[[torch.Tensor], torch.Tensor]
#: Rows per chunk of the per-row passes: 64k rows of dim 64 are 16 MiB of fp32.
CHUNK_ROWS = 65_536

_BITS = {Tier.FP32: 32, Tier.FP16: 16, Tier.INT8: 8, Tier.INT4: 4, Tier.INT2: 2, Tier.DROP: 0}  # (not SHARED)


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


# --------------------------------------------------------------------------------- errors
def tier_errors(weights: torch.Tensor, tiers: Sequence[Tier], shared: Optional[torch.Tensor] = None,
                row_fit: str = "minmax") -> torch.Tensor:
    """Squared L2 error of every row of ``weights`` [n, d] in each of ``tiers``: float64
    [n, len(tiers)] (FBGEMM's row format, integer rows with the row fit ``row_fit``; DROP: the
    squared norm; SHARED: ``shared`` [n], the rows' distances to their centroids,
    :class:`~shark_torchrec.quant.shared_rows.SharedRows`).  A row holding NaN or Inf gets NaN;
    a finite row gets +inf in a tier that cannot store it (values beyond FP16's range, ±65504:
    FP16 rows, or an integer row's fp16 scale or bias, overflow)."""
    tiers = list(tiers)
    if Tier.SHARED in tiers:
        if shared is None:
            raise ValueError("tier_errors: the SHARED tier needs the rows' distances to their centroids")
        i = tiers.index(Tier.SHARED)
        rest = tier_errors(weights, tiers[:i] + tiers[i + 1:], row_fit=row_fit)
        col = shared.double().reshape(-1, 1).clone()
        col[torch.isnan(rest).any(1) if rest.shape[1] else torch.zeros(col.shape[0], dtype=torch.bool)] = math.nan
        return torch.cat([rest[:, :i], col, rest[:, i:]], 1)
    w = weights.detach()
    if w.dtype != torch.float32 or w.device.type != "cpu" or (w.numel() and w.stride(-1) != 1):
        w = w.float().cpu().contiguous()
    if cpu_kernel_available():
        return torch.ops.shark_torchrec.row_tier_errors(w, [_BITS[t] for t in tiers], check_row_fit(row_fit) == "lsq")
    bad = ~torch.isfinite(w).all(1)
    # (rows holding NaN or Inf are fitted as zeros, then reported as NaN)
    finite = torch.where(bad.unsqueeze(1), 0.0, w) if bool(bad.any()) else w
    err = (torch.stack([quantization_error(finite, t, row_fit) for t in tiers], 1) if tiers
           else torch.zeros(w.shape[0], 0, dtype=torch.float64))
    err[~torch.isfinite(err)] = math.inf  # (a tier that cannot store the row: as the kernel says)
    err[bad] = math.nan
    return err


def tier_sizes(dims: Sequence[int], tiers: Sequence[Tier], row_alignment: int) -> torch.Tensor:
    """Bytes of a row in each tier: int64 [len(tiers)], summed over its column blocks
    (``dims``: one per block; a column-wise sharded row is stored once per block)."""
    return torch.tensor([sum(row_bytes(t, d, row_alignment) for d in dims) for t in tiers], dtype=torch.long)


# --------------------------------------------------------------------------------- choices
@dataclasses.dataclass
class RowChoices:
    """Each row's tier as the price per byte rises, for rows of one size table.

    Attributes:
        tiers: the tiers rows may take (positions in ``seq`` refer to them).
        sizes: int64 [K] bytes of a row in each tier.
        seq: int8 [n, K] the tiers a row takes from price 0 upwards (-1 after its last).
        breakpoints: float32 [n, K-1] the price at which it moves from ``seq[m]`` to
            ``seq[m+1]`` (+inf after its last move).
        top_bytes, bottom_bytes: the rows' bytes at price 0, and in their last tiers.
    """

    tiers: List[Tier]
    sizes: torch.Tensor
    seq: torch.Tensor
    breakpoints: torch.Tensor
    top_bytes: int = 0
    bottom_bytes: int = 0

    @property
    def rows(self) -> int:
        return int(self.seq.shape[0])

    @staticmethod
    def concat(parts: Sequence["RowChoices"]) -> "RowChoices":
        return RowChoices(parts[0].tiers, parts[0].sizes, torch.cat([p.seq for p in parts]),
                          torch.cat([p.breakpoints for p in parts]), sum(p.top_bytes for p in parts),
                          sum(p.bottom_bytes for p in parts))


def _hull_torch(err: torch.Tensor, p: torch.Tensor, sizes: torch.Tensor, drop_index: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_choices`' hull in plain torch (the kernel's fallback; same rules)."""
    n, K = err.shape
    cost = torch.where(torch.isfinite(err), p.unsqueeze(1) * err, math.inf)  # (not 0 * inf = NaN)
    if drop_index >= 0:
        cost[:, drop_index] = torch.where(p > 0, math.inf, cost[:, drop_index])
    seq = torch.full((n, K), -1, dtype=torch.int8)
    bp = torch.full((n, max(K - 1, 1)), math.inf, dtype=torch.float32)
    cur = torch.argmin(cost, 1)  # first index on ties
    seq[:, 0] = cur.to(torch.int8)
    last = torch.zeros(n, dtype=torch.float32)
    active = torch.ones(n, dtype=torch.bool)
    s = sizes.double()
    rows = torch.arange(n)
    for m in range(K - 1):
        c_cur, s_cur = cost[rows, cur], s[cur]
        ok = (s.unsqueeze(0) < s_cur.unsqueeze(1)) & torch.isfinite(cost)
        lam = (cost - c_cur.unsqueeze(1)) / (s_cur.unsqueeze(1) - s.unsqueeze(0))
        lam = torch.where(ok, lam, math.inf)
        best = lam.min(1).values
        # ties: the smallest tier; then its position (sizes are distinct among candidates)
        tie = ok & (lam == best.unsqueeze(1))
        nxt = torch.where(tie, s.unsqueeze(0), math.inf).argmin(1)
        move = active & ok.any(1)
        f = torch.maximum(best.clamp(min=0).float(), last)
        bp[:, m] = torch.where(move, f, bp[:, m])
        seq[:, m + 1] = torch.where(move, nxt.to(torch.int8), seq[:, m + 1])
        last = torch.where(move, f, last)
        cur = torch.where(move, nxt, cur)
        active = move
    return bp, seq


def row_choices(err: torch.Tensor, priority: torch.Tensor, tiers: Sequence[Tier], sizes: torch.Tensor,
                drop_rows: str = "any") -> RowChoices:
    """Each row's Lagrangian choices from its tier errors ``err`` [n, K] (:func:`tier_errors`,
    summed over column blocks) and priority [n]: cost ``p · err``; with ``drop_rows="unused"``
    DROP only for rows of priority 0."""
    tiers = list(tiers)
    drop_index = tiers.index(Tier.DROP) if (drop_rows == "unused" and Tier.DROP in tiers) else -1
    err = err.double().contiguous()
    p = priority.double().contiguous()
    if cpu_kernel_available():
        bp, seq, totals = torch.ops.shark_torchrec.tier_hull(err, p, sizes, drop_index >= 0, drop_index)
        return RowChoices(tiers, sizes, seq, bp, int(totals[0]), int(totals[1]))
    bp, seq = _hull_torch(err, p, sizes, drop_index)
    last = (seq >= 0).sum(1) - 1
    bottom = int(sizes[seq.gather(1, last.unsqueeze(1)).squeeze(1).long()].sum()) if seq.numel() else 0
    top = int(sizes[seq[:, 0].long()].sum()) if seq.numel() else 0
    return RowChoices(tiers, sizes, seq, bp, top, bottom)


def measure_choices(weights: torch.Tensor, priority: torch.Tensor, tiers: Sequence[Tier], sizes: torch.Tensor,
                    drop_rows: str = "any", extra_errors: Optional[torch.Tensor] = None,
                    shared: Optional[torch.Tensor] = None, row_fit: str = "minmax") -> Tuple[RowChoices, int]:
    """:func:`row_choices` of rows measured from their weights (a chunk [n, d], any row
    stride) in one fused pass, plus ``extra_errors`` [n, K] (their other column blocks'
    :func:`tier_errors`, added after these); and the first row holding NaN or Inf (-1: none).
    With SHARED among ``tiers``, ``shared`` [n] gives the rows' distances to their centroids
    (then the errors are measured apart from the choices).  Integer rows' errors are those of
    the row fit ``row_fit``.  A row no tier can store (:func:`tier_errors`' +inf in every tier
    open to it) is reported as the row holding NaN is (:func:`unstorable_row` says why)."""
    tiers = list(tiers)
    if Tier.SHARED in tiers:
        err = tier_errors(weights, tiers, shared, row_fit)
        if extra_errors is not None:
            err = err + extra_errors.double()
        return _choices_of_errors(err, priority, tiers, sizes, drop_rows)
    drop_index = tiers.index(Tier.DROP) if (drop_rows == "unused" and Tier.DROP in tiers) else -1
    w = weights.detach()
    if w.dtype != torch.float32 or w.device.type != "cpu" or (w.numel() and w.stride(-1) != 1):
        w = w.float().cpu().contiguous()
    p = priority.double().contiguous()
    extra = None if extra_errors is None else extra_errors.double().contiguous()
    if cpu_kernel_available():
        bp, seq, totals, bad = torch.ops.shark_torchrec.row_choices(
            w, [_BITS[t] for t in tiers], p, sizes, extra, drop_index >= 0, drop_index, check_row_fit(row_fit) == "lsq")
        return RowChoices(tiers, sizes, seq, bp, int(totals[0]), int(totals[1])), int(bad)
    err = tier_errors(w, tiers, row_fit=row_fit)
    if extra is not None:
        err = err + extra
    return _choices_of_errors(err, p, tiers, sizes, drop_rows)


def _choices_of_errors(err: torch.Tensor, priority: torch.Tensor, tiers: List[Tier], sizes: torch.Tensor,
                       drop_rows: str) -> Tuple[RowChoices, int]:
    """:func:`row_choices` of measured errors, and the first row that has none: one holding NaN
    or Inf (NaN errors), or one no tier can store (+inf in every tier open to it)."""
    nan = torch.isnan(err).any(1)
    open_ = torch.isfinite(err)
    if drop_rows == "unused" and Tier.DROP in tiers:
        open_[:, tiers.index(Tier.DROP)] &= priority.reshape(-1) == 0
    bad_rows = nan | ~open_.any(1)
    if Tier.DROP in tiers:  # a row in use that only DROP takes: dropped for want of a tier (named)
        storing = open_.clone()
        storing[:, tiers.index(Tier.DROP)] = False
        bad_rows |= (priority.reshape(-1) > 0) & ~storing.any(1)
    bad = int(bad_rows.nonzero()[0]) if bool(bad_rows.any()) else -1
    return row_choices(torch.nan_to_num(err, nan=0.0, posinf=math.inf), priority, tiers, sizes, drop_rows), bad


def unstorable_row(row: torch.Tensor) -> str:
    """Why :func:`measure_choices` found no tier for ``row`` (a row of weights): what its error
    message says after "row N of the weights"."""
    r = row.detach().float().reshape(-1)
    if not bool(torch.isfinite(r).all()):
        return "is not finite"
    if not float(r.abs().max()) > 65504:
        return ("has no tier open to it (one of its column blocks beyond FP16's range, +-65504, or "
                "drop_rows='unused' closing DROP to rows in use)")
    return (f"holds {float(r.abs().max()):g}, beyond FP16's range (+-65504): no tier allowed can store it "
            "(FP16 rows, and integer rows' fp16 scale and bias, overflow; a row in use is not dropped for want "
            "of a tier); allow the fp32 tier, or scale the table")


def priority_scale(top: float) -> float:
    """The power of 2 that brings ``top`` (the largest priority) into [0.5, 1) (1 for 0).  The
    breakpoints (``p · Δerr / Δbytes``) are float32: with every priority below ~1e-38 they lost
    their precision, then all became 0 (every row tied, all dropped with room to spare), and
    above ~1e38 all +inf.  Scaled by a power of 2 they are the same float32 numbers, scaled,
    wherever they were in range: the same tiers."""
    return math.ldexp(1.0, -math.frexp(top)[1]) if top > 0 else 1.0


def bytes_at_price_zero(choices: RowChoices) -> int:
    """Bytes of the rows in their least-cost tiers (what a budget with room for it takes)."""
    return choices.top_bytes


def smallest_bytes(choices: RowChoices) -> int:
    """Bytes of the rows in the last tier each may reach (the least a budget can buy)."""
    return choices.bottom_bytes


def _price_histogram(choices: RowChoices, prefix: int) -> torch.Tensor:
    """Bytes saved at each breakpoint, binned by 16 bits of the price (see the kernel)."""
    if choices.rows == 0:
        return torch.zeros(65536, dtype=torch.long)
    if cpu_kernel_available():
        return torch.ops.shark_torchrec.hull_histogram(choices.breakpoints, choices.seq, choices.sizes, prefix)
    K = choices.seq.shape[1]
    frm, to = choices.seq[:, :-1].long(), choices.seq[:, 1:].long()
    valid = to >= 0
    saved = choices.sizes[frm.clamp(min=0)] - choices.sizes[to.clamp(min=0)]
    bits = choices.breakpoints[:, : K - 1].contiguous().view(torch.int32).long()
    if prefix < 0:
        key = bits >> 16
    else:
        valid = valid & ((bits >> 16) == prefix)
        key = bits & 0xFFFF
    return torch.bincount(key[valid], weights=saved[valid].double(), minlength=65536).long()


def price_for_budget(choices: Sequence[RowChoices], budget: int, reduce: Reduce = no_reduce) -> int:
    """The lowest price (float32 bits; -1: price 0, nothing needs to move) at which the rows of
    ``choices`` — over every process that ``reduce`` sums — fit ``budget`` bytes.  Every
    process gets the same answer.  The caller checks first that the budget can be met."""
    total = reduce(torch.tensor([sum(bytes_at_price_zero(c) for c in choices)], dtype=torch.long))
    needed = int(total[0]) - int(budget)
    if needed <= 0:
        return -1
    price = 0
    for prefix in (-1, 0):  # high 16 bits of the price, then the low 16 within them
        hist = torch.zeros(65536, dtype=torch.long)
        for c in choices:
            hist += _price_histogram(c, -1 if prefix < 0 else price)
        cum = torch.cumsum(reduce(hist), 0)
        digit = int(torch.searchsorted(cum, torch.tensor([needed]))[0])  # first cum >= needed
        if digit >= 65536:  # the budget is below the smallest size (checked by the caller)
            raise RuntimeError("internal: no price meets the budget")
        needed -= int(cum[digit - 1]) if digit > 0 else 0
        price = digit if prefix < 0 else (price << 16) | digit
    return price


def pick(choices: RowChoices, price: int) -> torch.Tensor:
    """Each row's tier (an index into :data:`TIER_ORDER`, int8 [n]) at ``price`` (float32 bits
    from :func:`price_for_budget`)."""
    if choices.rows == 0:
        return torch.zeros(0, dtype=torch.int8)
    if cpu_kernel_available():
        pos, _ = torch.ops.shark_torchrec.hull_pick(choices.breakpoints, choices.seq, price)
    else:
        K = choices.seq.shape[1]
        moved = torch.zeros(choices.rows, dtype=torch.long)
        if price >= 0:
            bits = choices.breakpoints[:, : K - 1].contiguous().view(torch.int32).long()
            ok = (choices.seq[:, 1:] >= 0) & (bits <= price)
            moved = torch.cumprod(ok.long(), 1).sum(1)  # breakpoints never decrease along a row
        pos = choices.seq.gather(1, moved.unsqueeze(1)).squeeze(1)
    lut = torch.tensor([TIER_ORDER.index(t) for t in choices.tiers], dtype=torch.int8)
    return lut[pos.long()]


def price_value(price: int) -> float:
    """The price (per byte) a :func:`price_for_budget` answer stands for."""
    if price < 0:
        return 0.0
    return float(torch.tensor([price], dtype=torch.int32).view(torch.float32)[0])


# --------------------------------------------------------------------------------- fractions
def _select(keys: Sequence[torch.Tensor], target: int, reduce: Reduce, key_bits: int = 64) -> Tuple[int, int]:
    """The smallest key ``v`` with ``#(keys <= v) >= target``, and ``#(keys < v)``, over every
    process ``reduce`` sums (keys: int64, non-negative, below ``2^key_bits``)."""
    prefix, below = 0, 0
    for shift in range(key_bits - 16, -1, -16):
        hist = torch.zeros(65536, dtype=torch.long)
        for k in keys:
            sel = k if shift + 16 >= key_bits else k[(k >> (shift + 16)) == prefix]
            if sel.numel():
                hist += torch.bincount((sel >> shift) & 0xFFFF, minlength=65536)
        cum = torch.cumsum(reduce(hist), 0)
        digit = int(torch.searchsorted(cum, torch.tensor([target - below]))[0])
        if digit >= 65536:
            raise RuntimeError("internal: selection target beyond the rows")
        below += int(cum[digit - 1]) if digit > 0 else 0
        prefix = (prefix << 16) | digit
    return prefix, below


def _descending_key(p: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering priorities (finite, >= 0) from highest to lowest."""
    # (+ 0.0 turns -0.0, which passes the >= 0 checks, into +0.0: its sign bit would make the
    # key overflow and put the lowest priority first)
    return 0x7FEFFFFFFFFFFFFF - (p.double() + 0.0).contiguous().view(torch.int64)


def fraction_counts(rows: int, fractions: Sequence[float]) -> List[int]:
    """Cumulative row counts of the tiers of a table of ``rows`` rows: the boundary after tier
    ``i`` is ``round(rows · Σ_{j≤i} f_j)`` (the last is ``rows``)."""
    ends, acc = [], 0.0
    for i, f in enumerate(fractions):
        acc += f
        ends.append(rows if i == len(fractions) - 1 else min(rows, int(round(acc * rows))))
    return ends


def fraction_tiers(parts: Sequence[torch.Tensor], part_index: Sequence[int], num_parts: int, rows: int,
                   order: Sequence[Tier], fractions: Sequence[float], reduce: Reduce = no_reduce
                   ) -> List[torch.Tensor]:
    """Tiers by fractions of one table's rows, its priorities given in row-ordered parts over
    any number of processes: the highest-priority rows take ``order[0]``, ties by row id
    (lower first) — what a stable sort by descending priority gives.

    A row of global rank ``g`` (0-based, in that order) takes tier ``j`` where
    ``ends[j-1] <= g < ends[j]`` (:func:`fraction_counts`).  For each boundary ``e`` the key of
    the ``e``-th row is found by histogram selection; rows above it are inside, rows equal to
    it are inside while their rank among equal rows (counted over the parts in row order) is
    below what remains.

    Args:
        parts: priorities of this process's parts of the table (float64, finite, >= 0).
        part_index: each part's position in the table's row order (0..num_parts-1).
        num_parts: parts over all processes.
        rows: the table's rows.
        order, fractions: the tiers, most precise first, and their fractions of the rows.
    Returns each part's tiers (int8 indices into :data:`TIER_ORDER`)."""
    ends = fraction_counts(rows, fractions)
    keys = [_descending_key(p) for p in parts]
    cuts = {e: _select(keys, e, reduce) for e in sorted(set(ends[:-1])) if 0 < e < rows}
    cut_list = sorted(cuts)
    equal = torch.zeros(max(len(cut_list), 1), num_parts, dtype=torch.long)
    for k, i in zip(keys, part_index):
        for j, e in enumerate(cut_list):
            equal[j, i] = int((k == cuts[e][0]).sum())
    equal = reduce(equal)
    before = torch.cumsum(equal, 1) - equal  # rows equal to the cut key in earlier parts
    lut = torch.tensor([TIER_ORDER.index(t) for t in order], dtype=torch.int8)
    out = []
    for k, i in zip(keys, part_index):
        beyond = {e: torch.ones(k.numel(), dtype=torch.long) for e in ends[:-1] if e <= 0}
        for j, e in enumerate(cut_list):
            v, below = cuts[e]
            tie_rank = int(before[j, i]) + torch.cumsum((k == v).long(), 0) - 1
            inside = (k < v) | ((k == v) & (tie_rank < e - below))
            beyond[e] = (~inside).long()
        position = torch.zeros(k.numel(), dtype=torch.long)
        for e in ends[:-1]:  # a boundary counted once per tier it closes
            if e in beyond:
                position += beyond[e]
        out.append(lut[position])
    return out
