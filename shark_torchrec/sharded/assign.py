"""Row tiers of a sharded collection, assigned where its shards lie.

The same policy as :func:`~shark_torchrec.quant.assign_tiers` (a :class:`RowwiseQuantConfig`:
one byte budget or row fractions, per-table pins, fractions and budgets), decided by each row
group's leader (:mod:`.layout`) from the rows it holds, with:

* **one global byte budget**: each rank's breakpoints histograms are all-reduced, so the price
  per byte is the lowest that meets the budget over every rank
  (:func:`~shark_torchrec.quant.budget.price_for_budget`);
* **column-wise shards**: a row's blocks on other ranks send their errors (float64, a chunk of
  rows at a time) to the leader, which adds them in column order and decides one tier for
  the row; the tier goes back to every block;
* **row fractions**: each table's boundary priorities by exact selection over the ranks
  (:func:`~shark_torchrec.quant.budget.fraction_tiers`).

The byte accounting does not depend on the placement: per table, a bit-packed id map (the
bits its rows need, :mod:`~shark_torchrec.quant.id_map`, which each of its shards
keeps) and up to 128 bytes of padding per tier, once per column block, reserved before the
tiers are known; once they are, the padding they leave unused goes back to the rows
(``_Assigner._fill``: the budget is solved again while the tables, each tier's rows of a table
counted as one sub-table per column block, stay within it).  (A table split into ``S`` row
shards holds up to ``(128 · tiers + 3) · (S-1)`` bytes of padding more.)  So the tiers equal
those of one process holding the same tables, whatever the number of ranks (tested); a
column-wise sharded table is measured block by block, as it is stored.

Memory per rank: its own shards are read in place, in chunks; on top, per row it leads, a
priority (8 bytes) and its choices (``5 · K - 4`` bytes for ``K`` tiers).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from tqdm import tqdm

from shark_torchrec.quant import budget as B
from shark_torchrec.quant.config import EXCLUDE, RowwiseQuantConfig
from shark_torchrec.quant.id_map import table_map_bytes
from shark_torchrec.quant.shared_rows import K_CANDIDATES, SharedRows, assign_rows, cluster_rows
from shark_torchrec.quant.tiers import CENTROID_TIER, TIER_ORDER, BudgetError, Tier, row_bytes, sub_table_bytes
from shark_torchrec.sharded.comm import Comm
from shark_torchrec.sharded.layout import REPLICATED, RowGroup, ShardedLayout

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: ``priorities(table, row_offset, rows)`` → float64 [rows]: the priorities of rows this rank
#: leads.
PriorityFn = Callable[[str, int, int], torch.Tensor]

#: Bytes a table's sub-tables may pad per tier (a cache line), counted against budgets.
PADDING_PER_TIER = 128
#: Tiers counted for padding (six, SHARED aside: its rows have no sub-table).
PADDED_TIERS = 6
#: Rounds of choosing each table's centroid count at the budget's price (see ``_Assigner.budget``).
REFINE_ROUNDS = 3
#: Rounds of refitting the centroids to the rows the budget put in the SHARED tier, then solving
#: the budget again (see ``_Assigner.budget``).
RECLUSTER_ROUNDS = 2
#: The version of the tier policy, a key of the pipeline's quantize stage: raised whenever the same
#: settings give other tiers, so that a run started again re-quantizes rather than reusing
#: tiers of older code (2: budgets filled into the padding the tiers leave, ``_Assigner._fill``).
TIER_POLICY = 2
#: Rounds of raising the rows' budget into the unused padding reservation (``_Assigner._fill``),
#: while what fits and what does not are more than :data:`FILL_SLACK` of the budget apart;
#: taken only where the reservation is more than :data:`FILL_WORTH` of the budget (each round
#: is a pass over the rows' errors: on big tables, the synthetic Criteo-shaped ones included,
#: the reservation is 0.03-0.2%).
FILL_ROUNDS = 8
FILL_SLACK = 0.001
FILL_WORTH = 0.005


@dataclasses.dataclass
class ShardedTierAssignment:
    """Tiers of the rows of this rank's shards.

    Attributes:
        tiers: ``{shard name: int8 [rows]}`` indices into :data:`TIER_ORDER`.
        rows_per_tier: ``{table: [rows in each TIER_ORDER tier]}``, over all ranks.
        row_alignment: the row alignment bytes were computed with.
        method: the config, as JSON.
        details: budget bytes, rows budget, price (budgets only).
        shared: ``{shard name: SharedRows}``: the centroids of this rank's shards with SHARED
            rows (each shard its own), and each row's centroid.
        centroids: ``{table: centroids}`` over all ranks (every shard's together).
        row_fit: how integer rows are to be stored (:attr:`RowwiseQuantConfig.row_fit`).
    """

    tiers: Dict[str, torch.Tensor]
    rows_per_tier: Dict[str, List[int]]
    row_alignment: int
    method: str = ""
    details: Dict[str, float] = dataclasses.field(default_factory=dict)
    shared: Dict[str, SharedRows] = dataclasses.field(default_factory=dict)
    centroids: Dict[str, int] = dataclasses.field(default_factory=dict)
    row_fit: str = "minmax"


def table_overhead(rows: int, blocks: int) -> int:
    """Bytes a converted table holds besides its rows: the id map and sub-table padding, once
    per column block."""
    return blocks * (table_map_bytes(rows) + PADDING_PER_TIER * PADDED_TIERS)


class _Assigner:
    """One rank's part of :func:`assign_tiers_sharded` (see the module docstring)."""

    def __init__(self, layout: ShardedLayout, weights: Dict[str, torch.Tensor], config: RowwiseQuantConfig,
                 priorities: Optional[PriorityFn], comm: Comm) -> None:
        self.layout, self.weights, self.config, self.comm = layout, weights, config, comm
        self.rank = comm.rank
        self._priorities = priorities
        self._checked: Dict[Tuple[str, int], torch.Tensor] = {}  # (table, row_offset) -> priorities
        self.configs = {c.name: c for c in layout.configs()}
        self.order = [t["name"] for t in layout.tables]
        self.groups = {t: layout.row_groups(t) for t in self.order}
        self.groups_by_offset = {(t, g.row_offset): g for t in self.order for g in self.groups[t]}
        self.blocks = {t: layout.column_blocks(t) for t in self.order}
        self.decided: Dict[Tuple[str, int], torch.Tensor] = {}  # (table, row_offset) -> tiers
        # (table, row_offset) -> the centroids of a group led here (SHARED rows' reads)
        self.shared: Dict[Tuple[str, int], SharedRows] = {}
        self.seed = 0
        self._samples: Dict[Tuple[str, int], torch.Tensor] = {}  # (table, row_offset) -> sample_rows
        # (table, row_offset) of the groups whose tiers :meth:`solve` decides on their samples
        # for now (their :attr:`decided` then holds their sample rows' tiers: see :meth:`budget`)
        self.on_sample: set = set()
        self.last_price = -1  # (:meth:`refine`'s)
        # What :meth:`priority` scales priorities by within :meth:`budget` (a power of 2:
        # :meth:`priority_scale`)
        self.p_scale = 1.0

    def check_seen(self, tables: Sequence[str]) -> None:
        """Collective: refuse priorities that are zero in every one of ``tables`` (no training
        batch reached the tracker: every row would be priced as unused and dropped), and warn
        about single tables whose rows were never seen."""
        if self._priorities is None or not tables:
            return
        local = torch.tensor([sum(float(self.priority(g).sum()) for _, g in self.led(t)) for t in tables],
                             dtype=torch.float64)
        totals = self.comm.all_reduce(local)
        unseen = [t for t, x in zip(tables, totals.tolist()) if x == 0]
        if len(unseen) == len(tables):
            raise ValueError(
                f"row priorities are zero in every table ({list(tables)}): no training batch reached the "
                "row tracker, and every row would be dropped. RowPriority.attach(model) reads models "
                "called with a TorchRec Batch (DLRMTrain, or DMP wrapping it); with other models call "
                "tracker.update(kjt, labels) every step. priorities=None treats all rows alike.")
        if unseen:
            warnings.warn(f"row priorities are zero in tables {unseen}: none of their rows was seen in "
                          "training, so they are priced as unused (the cheapest tier)")

    # ------------------------------------------------------------------ helpers
    def led(self, table: str) -> List[Tuple[int, RowGroup]]:
        """(position, group) of the table's row groups this rank decides."""
        return [(i, g) for i, g in enumerate(self.groups[table]) if g.leader == self.rank]

    def priority(self, g: RowGroup) -> torch.Tensor:
        if self._priorities is None:
            return torch.ones(g.rows, dtype=torch.float64)
        key = (g.table, g.row_offset)
        p = self._checked.get(key)
        if p is None:  # (asked for and checked once: the rounds of the budget read them again and again)
            p = self._priorities(g.table, g.row_offset, g.rows)
            p = torch.as_tensor(p).double().reshape(-1)
            if p.numel() != g.rows:
                raise ValueError(f"table {g.table!r}: {p.numel()} priorities for rows "
                                 f"{g.row_offset}..{g.row_offset + g.rows}")
            bad = ~torch.isfinite(p) | (p < 0)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                raise ValueError(f"table {g.table!r}: priority of row {g.row_offset + row} is {float(p[row])} "
                                 f"(must be finite and >= 0)")
            self._checked[key] = p
        return p * self.p_scale if self.p_scale != 1.0 else p

    def priority_scale(self, tables: Sequence[str]) -> float:
        """Collective: :func:`~shark_torchrec.quant.budget.priority_scale` of the largest
        priority of ``tables`` over all ranks."""
        self.p_scale = 1.0
        local = max([float(self.priority(g).max()) for t in tables for _, g in self.led(t) if g.rows] or [0.0])
        return B.priority_scale(max(self.comm.all_gather_object(local)))

    def sizes(self, table: str, tiers: Sequence[Tier]) -> torch.Tensor:
        return B.tier_sizes(self.blocks[table], tiers, self.config.row_alignment)

    def decided_bytes(self, tables: Sequence[str]) -> int:
        """Bytes of the rows already decided in ``tables``, over all ranks."""
        local = 0
        for t in tables:
            all_sizes = self.sizes(t, TIER_ORDER)
            for i, g in self.led(t):
                local += int(all_sizes[self.decided[(t, g.row_offset)].long()].sum())
                if (t, g.row_offset) in self.shared:
                    local += self.centroid_bytes(t, self.shared[(t, g.row_offset)].k)
        return int(self.comm.all_reduce(torch.tensor([local], dtype=torch.long))[0])

    # ------------------------------------------------------------------ shared rows
    def centroid_bytes(self, table: str, k: int) -> int:
        """Bytes of one row group's ``k`` centroids (stored FP16)."""
        return k * row_bytes(CENTROID_TIER, self.configs[table].embedding_dim, self.config.row_alignment)

    def shares(self, table: str) -> bool:
        """Whether ``table``'s rows may take the SHARED tier: not where a row is split in column
        blocks (each block would need centroids of its own columns; not supported yet)."""
        return all(len(g.blocks) == 1 for g in self.groups[table])

    def k_candidates(self, table: str) -> List[int]:
        """The centroid counts a table may take (the same on every rank): up to a quarter of its
        smallest row group."""
        rows = min(g.rows for g in self.groups[table])
        return [k for k in K_CANDIDATES if k == 1 or k <= rows // 4] or [min(K_CANDIDATES)]

    def cluster(self, g: RowGroup, k: int, among: Optional[torch.Tensor] = None,
                priority: Optional[torch.Tensor] = None, sample: Optional[torch.Tensor] = None) -> SharedRows:
        """``k`` centroids of the group's rows (of the rows ``among`` marks, when given);
        ``priority``: the group's priorities, if already read; ``sample``: assign only those
        rows (:meth:`sample_rows`)."""
        try:
            p = self.priority(g) if priority is None else priority
            return cluster_rows(self.weights[g.blocks[0].name], p, k, self.seed, among, sample)
        except ValueError as e:
            raise ValueError(f"table {g.table!r}, rows from {g.row_offset}: {e}") from None

    def sample_rows(self, g: RowGroup) -> Optional[torch.Tensor]:
        """The rows on which the group's candidate ``K`` are measured: a seeded random
        ``config.shared_sample_rows`` of them (sorted; the same whatever the ranks), or None
        (all) where the group has no more."""
        n = self.config.shared_sample_rows
        if n is None or g.rows <= n:
            return None
        key = (g.table, g.row_offset)
        if key not in self._samples:
            gen = torch.Generator().manual_seed(self.seed)
            self._samples[key] = torch.randperm(g.rows, generator=gen)[:n].sort().values
        return self._samples[key]

    def complete(self, candidates: Dict[Tuple[str, int], Dict[int, SharedRows]], g: RowGroup, k: int) -> SharedRows:
        """The group's ``k`` candidate with every row assigned (assigned now, once, where only
        its sample was)."""
        by_k = candidates[(g.table, g.row_offset)]
        if by_k[k].rows is not None:
            try:
                by_k[k] = assign_rows(self.weights[g.blocks[0].name], by_k[k].centroids)
            except ValueError as e:
                raise ValueError(f"table {g.table!r}, rows from {g.row_offset}: {e}") from None
        return by_k[k]

    def share_decided(self, tables: Sequence[str]) -> None:
        """Centroids (the largest ``K``) for groups given SHARED rows by a pin or fractions."""
        shared = TIER_ORDER.index(Tier.SHARED)
        for t in tables:
            for _, g in self.led(t):
                key = (t, g.row_offset)
                mask = self.decided[key] == shared
                if key not in self.shared and bool(mask.any()):  # (fitted to the rows that read them)
                    self.shared[key] = self.cluster(g, self.k_candidates(t)[-1], among=mask)

    # ------------------------------------------------------------------ policies
    def pin(self, table: str, tier: Tier) -> None:
        for _, g in self.led(table):
            self.decided[(table, g.row_offset)] = torch.full((g.rows,), TIER_ORDER.index(tier), dtype=torch.int8)

    def fractions(self, table: str, fractions: Dict[str, float]) -> None:
        """Collective: every rank calls it for every table, in the same order."""
        order = [t for t in TIER_ORDER if fractions.get(t.value, 0) > 0]
        mine = self.led(table)
        parts = [self.priority(g) for _, g in mine]
        tiers = B.fraction_tiers(parts, [i for i, _ in mine], len(self.groups[table]),
                                 self.configs[table].num_embeddings, order,
                                 [fractions[t.value] for t in order], self.comm.all_reduce)
        for (_, g), t in zip(mine, tiers):
            self.decided[(table, g.row_offset)] = t

    def budget(self, tables: Sequence[str], rows_budget: int, label: str,
               fill: Optional[Tuple[Sequence[str], int]] = None) -> Dict[str, float]:
        """Collective: tiers of ``tables`` minimising the priority-weighted error within
        ``rows_budget`` bytes over all ranks; with ``fill = (counted tables, bytes)``, the rows'
        budget is then raised into what the padding reserved for those tables leaves unused
        (:meth:`_fill`).

        With the SHARED tier, every row group first gets centroids for each ``K`` its table may
        take; the budget is solved with the smallest (the centroids' bytes taken off it), then each
        table takes the ``K`` of least Lagrangian cost at that price
        (``Σ_rows min_tier(p·err + λ·bytes) + λ·centroid bytes``, over all ranks) and the budget
        is solved again with them, up to :data:`REFINE_ROUNDS` times while some ``K`` changes.
        The candidates are fitted to all of a group's rows; but only the rows the budget puts in
        the SHARED tier read the centroids (the least important), so then, up to
        :data:`RECLUSTER_ROUNDS` times, each group's centroids are fitted again to its SHARED
        rows alone (their priority-weighted k-means, kept where it lowers their weighted error)
        and the budget solved again with them: an alternating minimisation of the same objective
        (the priority-weighted error at the budget), which on ML-100K's dev split moved the
        93.5%-saved point from -0.0019 to -0.0011 ΔAUC and the 95.6% point from -0.0056 to
        -0.0039 (BENCHMARKS.md, "Value at the same bytes").

        A group of more than ``config.shared_sample_rows`` rows goes through these rounds on that
        many of its rows (:meth:`sample_rows`: its candidates, the ``K`` it takes, its refits and
        its share of the price are measured there, each sample row standing for its share of the
        group); then its final centroids are assigned to all its rows (:meth:`complete`) and the
        budget solved once more on every row, which sets the tiers and the exact price.  Each
        round on every row was an assignment of all the group's rows to its centroids (at
        ``K = 1,024``, ~15 s per GiB of rows on one core) and a pass over its errors."""
        self.p_scale = self.priority_scale(tables)
        try:
            return self._budget(tables, rows_budget, label, fill)
        finally:
            self.p_scale = 1.0

    def _budget(self, tables: Sequence[str], rows_budget: int, label: str,
                fill: Optional[Tuple[Sequence[str], int]]) -> Dict[str, float]:
        """:meth:`budget` with the priorities scaled (prices are reported unscaled)."""
        allowed = sorted({Tier.parse(t) for t in self.config.tiers}, key=TIER_ORDER.index)
        allowed_of = {t: allowed for t in tables}
        if Tier.SHARED in allowed:
            column_wise = [t for t in tables if not self.shares(t)]
            if column_wise:
                warnings.warn(f"tables {column_wise} are column-wise sharded: their rows do not take the "
                              "SHARED tier (not supported there yet)")
            for t in column_wise:
                allowed_of[t] = [x for x in allowed if x is not Tier.SHARED]
        k_of = {t: self.k_candidates(t)[0] for t in tables if Tier.SHARED in allowed_of[t]}
        candidates = self.candidates(list(k_of), label)
        large = {(t, g.row_offset) for t in k_of for _, g in self.led(t) if self.sample_rows(g) is not None}
        # (every rank alike: whether any rank leads a large group)
        exact = True  # (every row's tiers decided by refine's rounds: not on samples)
        if int(self.comm.all_reduce(torch.tensor([len(large)], dtype=torch.long))[0]):
            self.on_sample = large
            try:
                chosen = self.refine(tables, allowed_of, k_of, candidates, rows_budget, label)
                self.on_sample = set()
                price = self.solve(tables, allowed_of, chosen, candidates, rows_budget, label)
                k_of, exact = chosen, False
            except BudgetError:  # (the samples' estimate of the least bytes was off, near the
                # budget: every row decides, which is exact, and says whether it truly fails)
                logger.info("%s: the budget is near its least bytes: deciding on every row", label)
                self.on_sample = set()
                candidates = self.candidates(list(k_of), label)
                k_of = self.refine(tables, allowed_of, k_of, candidates, rows_budget, label)
                price = self.last_price
        else:
            k_of = self.refine(tables, allowed_of, k_of, candidates, rows_budget, label)
            price = self.last_price
        self._share(candidates, k_of)
        if fill is not None:
            price = self._fill(tables, allowed_of, k_of, candidates, rows_budget, price, fill, label,
                               recluster=exact)
        value = B.price_value(price) / self.p_scale  # (per byte, in the priorities' own units)
        logger.info("%s: price %.3g per byte; centroids per table %s", label, value, k_of)
        return {"price": value, **{f"centroids {t}": k for t, k in k_of.items()}}

    def _share(self, candidates: Dict[Tuple[str, int], Dict[int, SharedRows]], k_of: Dict[str, int]) -> None:
        """Each candidate group's centroids of ``k_of``, where :attr:`decided` gives it SHARED
        rows (none where it gives it none)."""
        shared = TIER_ORDER.index(Tier.SHARED)
        for (t, r0) in candidates:
            if bool((self.decided[(t, r0)] == shared).any()):
                self.shared[(t, r0)] = self.complete(candidates, self.groups_by_offset[(t, r0)], k_of[t])
            else:
                self.shared.pop((t, r0), None)

    def counted_bytes(self, tables: Sequence[str]) -> int:
        """Collective: the bytes ``tables`` hold at the tiers :attr:`decided` gives, counted as
        the budget counts them (whatever the placement): per column block, each tier's rows
        of the whole table in one cache-line-aligned sub-table (the FP16 one with the table's
        centroids) and the table's id map (:func:`table_overhead`'s map)."""
        counts = self.tier_counts(tables, centroids=True)
        total = 0
        for t in tables:
            rows = self.configs[t].num_embeddings
            for width in self.blocks[t]:
                total += table_map_bytes(rows) + sum(
                    sub_table_bytes(tier, n, width, self.config.row_alignment)
                    for tier, n in zip(TIER_ORDER, counts[t]))
        return total

    def _fill(self, tables: Sequence[str], allowed_of: Dict[str, List[Tier]], k_of: Dict[str, int],
              candidates: Dict[Tuple[str, int], Dict[int, SharedRows]], rows_budget: int, price: int,
              fill: Tuple[Sequence[str], int], label: str, recluster: bool) -> int:
        """Collective: solve ``tables`` again with the bytes the padding reservation
        (:func:`table_overhead`: 128 bytes per tier and block) leaves unused, while the
        ``fill`` tables' :meth:`counted_bytes` stay within its bytes; the price.

        The reservation is what a sub-table may pad; what the tiers chosen do pad is known
        once they are: on small tables the difference is a large share of the budget (on
        MovieLens-100K's eight tables 6,144 bytes reserved against ~870 padded, 8% of a 93%-saved
        budget left unused).  The rows' budget is raised by what is left and the tiers (their
        centroids refitted as :meth:`refine` ends) are taken if the fill tables still fit; where
        they do not (the rows take every byte given, so a few more bytes of padding are over),
        the extra is bisected between what fit and what did not, at most :data:`FILL_ROUNDS`
        times while the bracket is wider than :data:`FILL_SLACK` of the budget.  Each round is
        a pass over the rows' errors: none is taken where the reservation is at most
        :data:`FILL_WORTH` of the budget (big tables, where it would buy next to nothing)."""
        counted, budget = fill
        reserved = sum(PADDING_PER_TIER * PADDED_TIERS * len(self.blocks[t]) for t in counted)
        if reserved <= FILL_WORTH * budget:  # (big tables: not even the pass that counts them)
            return price
        # The extra bytes given to the rows: the whole spare first; after tiers that fit, what
        # they left; after tiers that were over, halfway between the most that fit (``lo``) and
        # the least known to be over (``over``, less the excess).
        slack = FILL_SLACK * budget
        lo, over = 0, None
        extra = budget - self.counted_bytes(counted)
        for _ in range(FILL_ROUNDS):
            if extra - lo <= slack:
                break
            before = ({(t, g.row_offset): self.decided[(t, g.row_offset)] for t in tables for _, g in self.led(t)},
                      dict(self.shared))
            trial = self.solve(tables, allowed_of, k_of, candidates, rows_budget + extra, label)
            if k_of and recluster:  # (as :meth:`refine` ends: the centroids fitted to the rows that
                # now share; not where groups were decided on samples, as their last solve is not)
                trial = self.recluster(tables, allowed_of, k_of, candidates, rows_budget + extra, trial, label)
            self._share(candidates, k_of)
            total = self.counted_bytes(counted)
            logger.info("%s: the rows' budget raised by %d bytes of unused padding: %d of %d bytes%s", label,
                        extra, total, budget, "" if total <= budget else " (over: taken back)")
            if total <= budget:
                lo, price = extra, trial
                extra += budget - total
            else:
                self.decided.update(before[0])
                self.shared = before[1]
                over = extra - (total - budget)
            if over is not None and extra >= over:
                extra = (lo + over) // 2
        return price

    def refine(self, tables: Sequence[str], allowed_of: Dict[str, List[Tier]], k_of: Dict[str, int],
               candidates: Dict[Tuple[str, int], Dict[int, SharedRows]], rows_budget: int, label: str
               ) -> Dict[str, int]:
        """Collective: :meth:`budget`'s rounds (solve; each table's ``K`` at the price; the
        centroids refitted to the SHARED rows): the ``K`` of each table (the centroids in
        ``candidates``), the last price in :attr:`last_price`.  Groups in :attr:`on_sample`
        are decided on their samples throughout."""
        price = self.solve(tables, allowed_of, k_of, candidates, rows_budget, label)
        for _ in range(REFINE_ROUNDS if any(len(self.k_candidates(t)) > 1 for t in k_of) else 0):
            best = self.best_k(k_of, candidates, allowed_of, B.price_value(price))
            if best == k_of:
                break
            try:
                price, k_of = self.solve(tables, allowed_of, best, candidates, rows_budget, label), best
            except BudgetError:  # the centroids chosen leave too little for the rows
                price = self.solve(tables, allowed_of, k_of, candidates, rows_budget, label)
                break
        self.last_price = self.recluster(tables, allowed_of, k_of, candidates, rows_budget, price, label)
        return k_of

    def recluster(self, tables: Sequence[str], allowed_of: Dict[str, List[Tier]], k_of: Dict[str, int],
                  candidates: Dict[Tuple[str, int], Dict[int, SharedRows]], rows_budget: int, price: int,
                  label: str) -> int:
        """Collective: up to :data:`RECLUSTER_ROUNDS` times, each group's centroids refitted to
        the rows :attr:`decided` makes SHARED (:meth:`refit_shared`) and the budget solved again
        with them; the last price (``price`` where nothing was refitted)."""
        for _ in range(RECLUSTER_ROUNDS):
            refit = self.refit_shared(k_of, candidates)
            # (the same on every rank: each solve is a collective)
            refit = int(self.comm.all_reduce(torch.tensor([refit], dtype=torch.long))[0])
            if refit == 0:
                break
            logger.info("%s: %d row groups' centroids refitted to their shared rows", label, refit)
            price = self.solve(tables, allowed_of, k_of, candidates, rows_budget, label)
        return price

    def candidates(self, tables: List[str], label: str) -> Dict[Tuple[str, int], Dict[int, SharedRows]]:
        """Centroids of every ``K`` each table may take, for each row group this rank leads,
        assigned to the group's :meth:`sample_rows` (all its rows where it has few; the ``K``
        it takes is assigned to all by :meth:`complete`).  A progress bar on rank 0: at scale
        this is the budget's longest step."""
        work = [(t, g, k) for t in tables for _, g in self.led(t) for k in self.k_candidates(t)]
        if work:
            logger.info("%s: k-means of %d candidate centroid sets (K in %s) for the SHARED tier", label,
                        len(work), sorted({k for _, _, k in work}))
        # (read once per group, here: not once per K, nor in the concurrent tasks)
        priorities = {(g.table, g.row_offset): self.priority(g) for _, g, _ in work}
        with tqdm(total=len(work), desc=f"{label}: shared-row centroids", disable=self.rank != 0 or not work,
                  dynamic_ncols=True) as bar:
            done = self._run_tasks([functools.partial(self.cluster, g, k, priority=priorities[(g.table, g.row_offset)],
                                                      sample=self.sample_rows(g))
                                    for _, g, k in work], bar)
        out: Dict[Tuple[str, int], Dict[int, SharedRows]] = {}
        for (t, g, k), fit in zip(work, done):
            out.setdefault((t, g.row_offset), {})[k] = fit
        return out

    def _run_tasks(self, tasks: List[Callable[[], T]], bar=None) -> List[T]:
        """The results of ``tasks`` (each a clustering, or a few), in order: as concurrent tasks
        where torch has more than one thread (:meth:`_run_concurrently`), else one after another."""
        threads = torch.get_num_threads()
        if threads > 1 and len(tasks) > 1:
            return self._run_concurrently(tasks, threads, bar)
        done = []
        for task in tasks:
            done.append(task())
            if bar is not None:
                bar.update()
        return done

    @staticmethod
    def _run_concurrently(tasks: List[Callable[[], T]], threads: int, bar=None) -> List[T]:
        """``tasks`` as ``threads`` concurrent tasks at a time, with one OpenMP/MKL thread each
        (torch's and faiss's thread counts are set to 1 for the while, and restored after).
        Each clustering is independent and seeded, so the results are those of one after
        another (tested); but much of each is serial (the k-means++ draws, one seed after the
        other) or small (a K = 4 Lloyd step), which more threads inside one speed little: on 2
        cores, four 262,144-row groups' six candidates took 21.6 s this way against 30.1 s one
        at a time on 2 threads.  Memory: each running task holds its training sample (at most 64
        rows per centroid) and a 4,096-row block of scores."""
        from concurrent.futures import ThreadPoolExecutor

        import faiss  # (the SHARED tier's k-means)

        # (process-wide settings, which the tasks' threads read; faiss may share torch's OpenMP
        # runtime or have its own copy)
        faiss_threads = faiss.omp_get_max_threads()
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(threads, len(tasks))) as pool:
                futures = [pool.submit(task) for task in tasks]
                done = []
                try:
                    for f in futures:  # (in order: the first error raised is the first group's)
                        done.append(f.result())
                        if bar is not None:
                            bar.update()
                except BaseException:
                    for f in futures:  # (those not started yet)
                        f.cancel()
                    raise
                return done
        finally:
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(faiss_threads)

    def refit_shared(self, k_of: Dict[str, int], candidates: Dict[Tuple[str, int], Dict[int, SharedRows]]) -> int:
        """Refit each led group's ``k_of`` centroids to the rows :attr:`decided` puts in the
        SHARED tier (its candidate replaced where that lowers their priority-weighted error);
        how many were replaced.  The groups' refits run as concurrent tasks where torch has
        more than one thread (:meth:`_run_tasks`), as the candidates' k-means do."""
        groups = [(g, k_of[t]) for t in k_of for _, g in self.led(t)]
        # (priorities are read on this thread, as for the candidates: the callable need not be
        # thread-safe; one at a time, inside each refit, where the refits run one at a time)
        concurrent = torch.get_num_threads() > 1 and len(groups) > 1
        fits = self._run_tasks([functools.partial(self._refit_group, g, k, candidates[(g.table, g.row_offset)][k],
                                                  self.priority(g) if concurrent else None)
                                for g, k in groups])
        for (g, k), fit in zip(groups, fits):
            if fit is not None:
                candidates[(g.table, g.row_offset)][k] = fit
        return sum(fit is not None for fit in fits)

    def _refit_group(self, g: RowGroup, k: int, current: SharedRows,
                     priority: Optional[torch.Tensor] = None) -> Optional[SharedRows]:
        """``k`` centroids fitted to the group's SHARED rows, where they lower those rows'
        priority-weighted error against ``current``; else None.  ``priority``: the group's
        priorities, if already read."""
        shared = self.decided[(g.table, g.row_offset)] == TIER_ORDER.index(Tier.SHARED)
        if not bool(shared.any()):
            return None
        priority = self.priority(g) if priority is None else priority
        if (g.table, g.row_offset) in self.on_sample:
            # (``shared`` marks its sample rows: the centroids are fitted to half of those, and
            # judged on the other half, which they did not see: judged on the rows they were
            # fitted to, few per centroid, they looked better than they were)
            sample = self.sample_rows(g)
            fitted = shared.clone()
            fitted[1::2] = False
            shared[0::2] = False
            if not bool(fitted.any()) or not bool(shared.any()):
                return None
            among = torch.zeros(g.rows, dtype=torch.bool)
            among[sample[fitted]] = True
            fit = self.cluster(g, k, among=among, priority=priority, sample=sample)
            p, before = priority[sample][shared], current.error if current.rows is not None else current.error[sample]
        else:
            fit = self.cluster(g, k, among=shared, priority=priority)
            p, before = priority[shared], current.error
        if not float(p.sum()) > 0:  # (as cluster_rows weighs them: alike)
            p = torch.ones_like(p)
        if float((p * fit.error[shared].double()).sum()) < float((p * before[shared].double()).sum()):
            return fit
        return None

    def solve(self, tables: Sequence[str], allowed_of: Dict[str, List[Tier]], k_of: Dict[str, int],
              candidates: Dict[Tuple[str, int], Dict[int, SharedRows]], rows_budget: int, label: str) -> int:
        """Collective: the exact price for ``rows_budget`` less the centroids of ``k_of``; every
        row group's tiers at that price go to :attr:`decided` (an estimate, and the tiers of
        their sample rows only, for groups in :attr:`on_sample`: :meth:`sample_choices`)."""
        choices: Dict[Tuple[str, int], List[B.RowChoices]] = {}
        for t in tables:
            sizes = self.sizes(t, allowed_of[t])
            for _, g in self.led(t):
                key = (t, g.row_offset)
                if key in self.on_sample:
                    choices[key] = [self.sample_choices(g, allowed_of[t], sizes, candidates[key][k_of[t]])]
                    continue
                shared = self.complete(candidates, g, k_of[t]) if t in k_of else None
                choices[key] = self.group_choices(g, allowed_of[t], sizes, shared)
        self.exchange_column_errors(tables, allowed_of, choices)
        centroids = sum(self.centroid_bytes(t, k) * len(self.groups[t]) for t, k in k_of.items())
        rows_budget -= centroids
        flat = [c for cs in choices.values() for c in cs]
        smallest = int(self.comm.all_reduce(torch.tensor([sum(B.smallest_bytes(c) for c in flat)],
                                                         dtype=torch.long))[0])
        if smallest > rows_budget:
            tiers = sorted({x.value for a in allowed_of.values() for x in a}, key=lambda v: TIER_ORDER.index(Tier(v)))
            raise BudgetError(f"{label}: budget {rows_budget} bytes for the rows (after {centroids} bytes of "
                              f"centroids) is below the smallest possible size {smallest} with tiers {tiers}")
        price = B.price_for_budget(flat, rows_budget, self.comm.all_reduce)
        for key, cs in choices.items():
            self.decided[key] = torch.cat([B.pick(c, price) for c in cs]) if cs else torch.zeros(0, dtype=torch.int8)
        return price

    def best_k(self, k_of: Dict[str, int], candidates: Dict[Tuple[str, int], Dict[int, SharedRows]],
               allowed_of: Dict[str, List[Tier]], price: float) -> Dict[str, int]:
        """Collective: each table's ``K`` of least Lagrangian cost at ``price`` per byte (each
        group's cost measured on its :meth:`sample_rows`, scaled to its rows)."""
        tables = list(k_of)
        width = len(K_CANDIDATES)
        cost = torch.zeros(len(tables), width, dtype=torch.float64)
        for i, t in enumerate(tables):
            ks = self.k_candidates(t)
            rest = [x for x in allowed_of[t] if x is not Tier.SHARED]
            for _, g in self.led(t):
                self._add_k_costs(cost[i], g, ks, rest, candidates[(t, g.row_offset)], price)
                for j, k in enumerate(ks):
                    cost[i, j] += price * self.centroid_bytes(t, k)
            cost[i, len(ks):] = math.inf
        cost = self.comm.all_reduce(cost)
        return {t: self.k_candidates(t)[int(torch.argmin(cost[i, :len(self.k_candidates(t))]))]
                for i, t in enumerate(tables)}

    def _add_k_costs(self, cost: torch.Tensor, g: RowGroup, ks: List[int], rest: List[Tier],
                     by_k: Dict[int, SharedRows], price: float) -> None:
        """Add to ``cost[j]`` the group's ``Σ_rows min(min_tier(p·err + λ·bytes), p·err_shared(K_j))``
        over its sample rows (all where it has no sample), scaled to its rows."""
        sizes = self.sizes(g.table, rest).double()
        drop = rest.index(Tier.DROP) if (Tier.DROP in rest and self.config.drop_rows == "unused") else -1
        weights, p = self.weights[g.blocks[0].name], self.priority(g)
        sample, scale = self.sample_rows(g), 1.0
        errors = [by_k[k].error for k in ks]
        if sample is not None:  # (every K on the same rows: the choice between them is paired)
            weights, p, scale = weights.index_select(0, sample), p[sample], g.rows / sample.numel()
            errors = [e if by_k[k].rows is not None else e[sample] for k, e in zip(ks, errors)]
        for r0 in range(0, p.numel(), B.CHUNK_ROWS):
            r1 = min(p.numel(), r0 + B.CHUNK_ROWS)
            err = B.tier_errors(weights[r0:r1], rest, row_fit=self.config.row_fit)
            c = p[r0:r1].unsqueeze(1) * err + price * sizes.unsqueeze(0)
            if drop >= 0:
                c[:, drop] = torch.where(p[r0:r1] > 0, math.inf, c[:, drop])
            best_rest = c.min(1).values if c.shape[1] else torch.full((r1 - r0,), math.inf, dtype=torch.float64)
            for j, e in enumerate(errors):
                cost[j] += scale * float(torch.minimum(best_rest, p[r0:r1] * e[r0:r1]).sum())

    def sample_choices(self, g: RowGroup, allowed: List[Tier], sizes: torch.Tensor, shared: SharedRows
                       ) -> B.RowChoices:
        """The choices of the group's :meth:`sample_rows` (a group of one block, SHARED allowed:
        ``shared``, its centroids, assigned to them at least), each standing for
        ``rows / samples`` of its rows: priority and bytes scaled by that, so its breakpoints are
        those of one row and its bytes the group's estimate."""
        sample = self.sample_rows(g)
        scale = g.rows / sample.numel()
        err = shared.error if shared.rows is not None else shared.error[sample]
        choices, bad = B.measure_choices(self.weights[g.blocks[0].name].index_select(0, sample),
                                         self.priority(g)[sample] * scale, allowed,
                                         (sizes.double() * scale).round().long(), self.config.drop_rows, None, err,
                                         self.config.row_fit)
        if bad >= 0:
            raise ValueError(f"table {g.table!r}: row {g.row_offset + int(sample[bad])} of the weights "
                             f"{B.unstorable_row(self.weights[g.blocks[0].name][int(sample[bad])])}")
        return choices

    def errors(self, block, r0: int, r1: int, tiers: List[Tier]) -> torch.Tensor:
        """Rows ``[r0, r1)`` of a column block held here: their errors in ``tiers``."""
        return B.tier_errors(self.weights[block.name][r0:r1], tiers, row_fit=self.config.row_fit)

    def group_choices(self, g: RowGroup, allowed: List[Tier], sizes: torch.Tensor,
                      shared: Optional[SharedRows] = None) -> List[B.RowChoices]:
        """Choices of a row group whose blocks are all here; [] when some lie elsewhere (they
        come from :meth:`exchange_column_errors`).  ``shared``: its centroids (SHARED allowed)."""
        if any(b.rank not in (self.rank, REPLICATED) for b in g.blocks):
            return []
        p = self.priority(g)
        out = []
        for r0 in range(0, g.rows, B.CHUNK_ROWS):
            r1 = min(g.rows, r0 + B.CHUNK_ROWS)
            extra = None
            for b in g.blocks[1:]:
                e = self.errors(b, r0, r1, allowed)
                extra = e if extra is None else extra.add_(e)
            out.append(self.checked_choices(g, r0, r1, extra, p[r0:r1], allowed, sizes,
                                            None if shared is None else shared.error[r0:r1]))
        return out

    def checked_choices(self, g: RowGroup, r0: int, r1: int, extra: Optional[torch.Tensor], p: torch.Tensor,
                        allowed: List[Tier], sizes: torch.Tensor, shared: Optional[torch.Tensor] = None
                        ) -> B.RowChoices:
        """The choices of rows ``[r0, r1)`` of a group, measured from its first block (held
        here) plus ``extra``, the errors of its other blocks in column order (``shared``: the
        rows' SHARED-tier errors)."""
        choices, bad = B.measure_choices(self.weights[g.blocks[0].name][r0:r1], p, allowed, sizes,
                                         self.config.drop_rows, extra, shared, self.config.row_fit)
        if bad < 0 and extra is not None and bool(torch.isnan(extra).any()):
            bad = int(torch.isnan(extra).any(1).nonzero()[0])
        if bad >= 0:
            why = "is not finite" if extra is not None and bool(torch.isnan(extra[bad]).any()) else \
                B.unstorable_row(self.weights[g.blocks[0].name][r0 + bad])
            raise ValueError(f"table {g.table!r}: row {g.row_offset + r0 + bad} of the weights {why}")
        return choices

    def exchange_column_errors(self, tables: Sequence[str], allowed_of: Dict[str, List[Tier]],
                               choices: Dict[Tuple[str, int], List[B.RowChoices]]) -> None:
        """Collective: row groups with blocks on other ranks than their leader, chunk by chunk
        in the same order on every rank: block holders send their errors, leaders add them in
        column order and make the choices."""
        for t in tables:
            allowed = allowed_of[t]
            K = len(allowed)
            sizes = self.sizes(t, allowed)
            for g in self.groups[t]:
                if all(b.rank in (g.leader, REPLICATED) for b in g.blocks):
                    continue
                lead = g.leader == self.rank
                p = self.priority(g) if lead else None
                for r0 in range(0, g.rows, B.CHUNK_ROWS):
                    r1 = min(g.rows, r0 + B.CHUNK_ROWS)
                    sends = [torch.zeros(0, dtype=torch.float64) for _ in range(self.comm.world)]
                    mine = [b for b in g.blocks if b.rank == self.rank and b.rank != g.leader]
                    if mine:
                        sends[g.leader] = torch.cat([self.errors(b, r0, r1, allowed).reshape(-1) for b in mine])
                    got = self.comm.exchange(sends)
                    if not lead:
                        continue
                    received = {r: list(torch.split(got[r], (r1 - r0) * K)) for r in range(self.comm.world)}
                    extra = None
                    for b in g.blocks[1:]:  # column order
                        e = (self.errors(b, r0, r1, allowed) if b.rank == self.rank
                             else received[b.rank].pop(0).view(r1 - r0, K))
                        extra = e.clone() if extra is None else extra.add_(e)
                    choices[(t, g.row_offset)].append(self.checked_choices(g, r0, r1, extra, p[r0:r1], allowed,
                                                                           sizes))

    # ------------------------------------------------------------------ result
    def tiers_of_shards(self) -> Dict[str, torch.Tensor]:
        """Collective: every shard's tiers on the rank holding it (leaders send theirs to the
        other blocks of their rows, and to every rank for replicated tables)."""
        sends: List[List[torch.Tensor]] = [[] for _ in range(self.comm.world)]
        expect: List[Tuple[int, RowGroup]] = []
        for t in self.order:
            for g in self.groups[t]:
                holders = sorted({r for b in g.blocks for r in (range(self.comm.world) if b.rank == REPLICATED
                                                               else [b.rank])} - {g.leader})
                for r in holders:
                    if self.rank == g.leader:
                        sends[r].append(self.decided[(t, g.row_offset)])
                    if self.rank == r:
                        expect.append((g.leader, g))
        got = self.comm.exchange([torch.cat(s) if s else torch.zeros(0, dtype=torch.int8) for s in sends])
        offsets = [0] * self.comm.world
        for src, g in expect:
            self.decided[(g.table, g.row_offset)] = got[src][offsets[src]:offsets[src] + g.rows]
            offsets[src] += g.rows
        return {b.name: self.decided[(t, g.row_offset)] for t in self.order for g in self.groups[t]
                for b in g.blocks if b.held_by(self.rank)}

    def shared_of_shards(self) -> Tuple[Dict[str, SharedRows], Dict[str, int]]:
        """Collective: the centroids of every shard held here that has SHARED rows (a replicated
        table's from its leader), and every table's centroids over all ranks."""
        replicated = {f"{t}@{r0}": (s.centroids, s.index, s.error) for (t, r0), s in self.shared.items()
                      if self.groups_by_offset[(t, r0)].blocks[0].rank == REPLICATED}
        got = {}
        if any(b.rank == REPLICATED for gs in self.groups.values() for g in gs for b in g.blocks):
            for part in self.comm.all_gather_object(replicated):
                got.update(part)
        out: Dict[str, SharedRows] = {}
        counts = torch.zeros(len(self.order), dtype=torch.long)
        for i, t in enumerate(self.order):
            for g in self.groups[t]:
                mine = self.shared.get((t, g.row_offset))
                if mine is not None:
                    counts[i] += mine.k
                elif f"{t}@{g.row_offset}" in got:
                    mine = SharedRows(*got[f"{t}@{g.row_offset}"])
                if mine is not None and g.blocks[0].held_by(self.rank):
                    out[g.blocks[0].name] = mine
        counts = self.comm.all_reduce(counts)
        return out, {t: int(counts[i]) for i, t in enumerate(self.order) if int(counts[i])}

    def tier_counts(self, tables: Sequence[str], centroids: bool = False) -> Dict[str, List[int]]:
        """Collective: ``{table: rows in each TIER_ORDER tier}`` over all ranks, at the tiers
        :attr:`decided` gives; with ``centroids``, each table's centroids counted among its
        FP16 rows (stored in their sub-table)."""
        counts = torch.zeros(len(tables), len(TIER_ORDER), dtype=torch.long)
        fp16 = TIER_ORDER.index(CENTROID_TIER)
        for i, t in enumerate(tables):
            for _, g in self.led(t):
                counts[i] += torch.bincount(self.decided[(t, g.row_offset)].long(), minlength=len(TIER_ORDER))
                if centroids and (t, g.row_offset) in self.shared:
                    counts[i, fp16] += self.shared[(t, g.row_offset)].k
        counts = self.comm.all_reduce(counts)
        return {t: counts[i].tolist() for i, t in enumerate(tables)}

    def rows_per_tier(self) -> Dict[str, List[int]]:
        return self.tier_counts(self.order)


def check_replicas(layout: ShardedLayout, weights: Dict[str, torch.Tensor], comm: Comm) -> None:
    """Collective: refuse a data-parallel table whose copies differ between ranks (a SHA-256 of
    each rank's bytes), naming it and the ranks.  Rank 0 decides such a table's tiers (and
    centroids) and the export keeps its copy, while each rank converted its own: the same ids
    read other rows on another rank, silently, and the reloaded export served rank 0's."""
    shards = [s for s in layout.local(comm.rank) if s.rank == REPLICATED]
    if comm.world == 1 or not shards:
        return
    mine = [hashlib.sha256(weights[s.name].detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()
            for s in shards]
    every = comm.all_gather_object(mine)
    for i, s in enumerate(shards):
        other = [r for r, digests in enumerate(every) if digests[i] != every[0][i]]
        if other:
            raise ValueError(f"table {s.table!r} is data-parallel, but its copy on rank(s) {other} differs "
                             "from rank 0's: the replicas must agree before compression (sync them, e.g. "
                             "broadcast rank 0's weights)")


def assign_tiers_sharded(layout: ShardedLayout, weights: Dict[str, torch.Tensor], config: RowwiseQuantConfig,
                         priorities: Optional[PriorityFn] = None, comm: Optional[Comm] = None
                         ) -> ShardedTierAssignment:
    """Tiers for every row of a sharded collection under ``config``, decided where the rows lie.

    A collective: every rank calls it with the same ``layout`` and ``config`` and its own
    ``weights`` (``{shard name: rows}``, e.g. from
    :func:`~shark_torchrec.sharded.layout.collection_layout`).

    Args:
        priorities: ``priorities(table, row_offset, rows)``: the priorities of rows this rank
            leads (default: all rows equal).
        comm: the process group (default: the world).
    """
    comm = comm or Comm()
    check_replicas(layout, weights, comm)
    a = _Assigner(layout, weights, config, priorities, comm)
    names = a.order
    unknown = sorted((set(config.table_overrides) | set(config.table_fractions) | set(config.table_budgets))
                     - set(names))
    if unknown:
        raise ValueError(f"table_overrides/table_fractions/table_budgets name unknown tables "
                         f"{unknown} (tables: {names})")
    pinned = {t: (Tier.FP32 if v == EXCLUDE else Tier.parse(v)) for t, v in config.table_overrides.items()}
    # (checked on every rank alike: the layout and config are the same everywhere)
    for t in names:
        fractions = config.table_fractions.get(t, config.fractions if t not in pinned else None) or {}
        if not a.shares(t) and (pinned.get(t) is Tier.SHARED or fractions.get(Tier.SHARED.value, 0) > 0):
            raise ValueError(f"table {t!r} is column-wise sharded: its rows cannot take the SHARED tier "
                             "(each column block would need centroids of its own columns; not supported yet)")
    a.check_seen([t for t in names if t not in pinned])
    for t in names:
        if t in pinned:
            a.pin(t, pinned[t])
        elif t in config.table_fractions:
            a.fractions(t, config.table_fractions[t])
    a.share_decided([t for t in names if t in pinned or t in config.table_fractions])
    details: Dict[str, float] = {}
    for t in names:
        if t in config.table_budgets:
            c = a.configs[t]
            rows_budget = config.table_budgets[t] - table_overhead(c.num_embeddings, len(a.blocks[t]))
            if rows_budget < 0:
                raise BudgetError(f"table {t!r}: budget {config.table_budgets[t]} bytes is below its id map "
                                  f"and padding ({table_overhead(c.num_embeddings, len(a.blocks[t]))} bytes)")
            a.budget([t], rows_budget, f"table {t!r}", fill=([t], config.table_budgets[t]))
    free = [t for t in names if t not in pinned and t not in config.table_fractions and t not in config.table_budgets]
    if free:
        if config.fractions is not None:
            for t in free:
                a.fractions(t, config.fractions)
            a.share_decided(free)
        else:
            fp32 = sum(row_bytes(Tier.FP32, c.embedding_dim, config.row_alignment) * c.num_embeddings
                       for c in a.configs.values())
            budget = config.budget_bytes if config.budget_bytes is not None else int(config.budget_fraction * fp32)
            fixed = a.decided_bytes([t for t in names if t not in free])
            overhead = sum(table_overhead(a.configs[t].num_embeddings, len(a.blocks[t])) for t in names)
            rows_budget = budget - fixed - overhead
            if rows_budget < 0:
                raise BudgetError(
                    f"budget of {budget} bytes is below what the quantized tables hold whatever "
                    f"the tiers: id map, padding and pinned tables ({fixed + overhead} "
                    f"bytes, a budget fraction of {(fixed + overhead) / fp32:.3f} of the "
                    f"fp32 tables); raise the budget (--quant_budget_fraction)")
            details = dict(a.budget(free, rows_budget, "the tables", fill=(names, budget)), budget_bytes=budget,
                           rows_budget_bytes=rows_budget)
    tiers = a.tiers_of_shards()
    shared, centroids = a.shared_of_shards()
    return ShardedTierAssignment(tiers, a.rows_per_tier(), config.row_alignment,
                                 method=json.dumps(config.to_dict()), details=details, shared=shared,
                                 centroids=centroids, row_fit=config.row_fit)
