"""How to assign row tiers: :class:`RowwiseQuantConfig`, the policy :func:`~shark_torchrec.quant.quantize_`
and the sharded conversion follow (a validated dataclass that saves as JSON)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

from shark_torchrec.quant.layout import ROW_ALIGNMENTS, output_dtype_name
from shark_torchrec.quant.tiers import DEFAULT_ROW_ALIGNMENT, ROW_FITS, Tier

EXCLUDE = "exclude"
#: :attr:`RowwiseQuantConfig.shared_sample_rows`'s default.
SHARED_SAMPLE_ROWS = 131_072


@dataclass
class RowwiseQuantConfig:
    """How to assign row tiers; exactly one of ``fractions``, ``budget_bytes`` or
    ``budget_fraction``.

    Attributes:
        fractions: ``{tier: fraction of rows}`` per table, summing to 1 (highest priorities get
            the most precise tier).
        budget_bytes: bytes for all converted tables of a collection together: rows in FBGEMM's
            layout, the bit-packed id map and sub-table padding (pinned tables count against
            it); :func:`~shark_torchrec.quant.quantize_` refuses it when several collections
            match (convert them one at a time, or use ``budget_fraction``).
        budget_fraction: the budget as a fraction of the converted tables' fp32 bytes.
        tiers: tiers a budget may use (with ``"shared"``, rows may read as one of their table's
            centroids, whose count the budget chooses: :mod:`~shark_torchrec.quant.shared_rows`).
        table_overrides: ``{table: tier}`` pins every row of a table to one tier;
            ``{table: "exclude"}`` keeps a table exact (all rows FP32).
        table_fractions: ``{table: {tier: fraction}}``: these tables are assigned by their own
            row fractions (and count against a budget like pinned tables).
        table_budgets: ``{table: bytes}``: these tables are assigned by their own byte budget
            (id map and padding included), with the budget's tiers.
        check_ids: the converted collections check ids (see the module).
        row_alignment: bytes each stored row is padded to, in the converted collection and in
            its byte budget: 16 (default: what FBGEMM's CUDA kernels need and TorchRec's
            quantized collection uses everywhere) or 1 for a model served on CPU only (FBGEMM's
            CPU default; at dim 64 INT4 rows take 36 bytes instead of 48, INT2 20 instead of 32).
        drop_rows: which rows a budget may drop (with ``"drop"`` among the tiers): ``"any"`` or
            ``"unused"`` (rows whose priority is 0 only; see
            :func:`~shark_torchrec.quant.tiers.assign_by_budget`).
        output_dtype: the dtype of the pooled embeddings the converted collections return:
            ``"fp32"`` (default) or ``"fp16"`` (or ``torch.float32`` / ``torch.float16``), as
            TorchRec's quantized collection's ``output_dtype``; sums are taken in fp32 either way.
        row_fit: how each integer row's fp16 scale and bias are chosen: ``"minmax"`` (default:
            FBGEMM's quantizers, the row's range) or ``"lsq"`` (fitted to the row by least
            squares: the same layout and kernels, less error — on trained rows INT2's squared
            error halves; see :mod:`~shark_torchrec.quant.rows`).  A byte budget measures the
            errors of the fit it stores.
        shared_sample_rows: with the ``"shared"`` tier, the rows of a table (of a shard) on which
            the budget chooses its centroid count: a row group with more rows has every
            candidate ``K``'s errors measured on a seeded random sample of this many of its rows
            (the same sample for every ``K``, their sums scaled to the group), and only the
            ``K`` it takes is assigned to all its rows: one pass over the rows at the chosen
            ``K`` instead of one per candidate (six).  ``None``: every candidate on every row
            (exact; on a 64-dim table ~55-85 s per GiB of rows on one core).  Groups of at most
            this many rows are measured whole either way.
    """

    fractions: Optional[Dict[str, float]] = None
    budget_bytes: Optional[int] = None
    budget_fraction: Optional[float] = None
    tiers: Sequence[str] = ("fp16", "int8", "int4", "int2", "drop")
    table_overrides: Dict[str, str] = field(default_factory=dict)
    table_fractions: Dict[str, Dict[str, float]] = field(default_factory=dict)
    table_budgets: Dict[str, int] = field(default_factory=dict)
    check_ids: bool = True
    row_alignment: int = DEFAULT_ROW_ALIGNMENT
    drop_rows: str = "any"
    output_dtype: str = "fp32"
    row_fit: str = "minmax"
    shared_sample_rows: Optional[int] = SHARED_SAMPLE_ROWS

    def __post_init__(self) -> None:
        self.output_dtype = output_dtype_name(self.output_dtype)
        if self.row_fit not in ROW_FITS:
            raise ValueError(f"RowwiseQuantConfig.row_fit must be one of {ROW_FITS}, got {self.row_fit!r}")
        if self.row_alignment not in ROW_ALIGNMENTS:
            raise ValueError(f"RowwiseQuantConfig.row_alignment must be one of {ROW_ALIGNMENTS}, "
                             f"got {self.row_alignment!r}")
        if self.shared_sample_rows is not None and (isinstance(self.shared_sample_rows, bool) or
                                                    not isinstance(self.shared_sample_rows, int) or
                                                    self.shared_sample_rows < 1):
            raise ValueError(f"RowwiseQuantConfig.shared_sample_rows must be a row count >= 1 or None, "
                             f"got {self.shared_sample_rows!r}")
        if self.drop_rows not in ("any", "unused"):
            raise ValueError(f"RowwiseQuantConfig.drop_rows must be 'any' or 'unused', got {self.drop_rows!r}")
        if self.drop_rows == "unused" and {Tier.parse(t) for t in self.tiers} <= {Tier.DROP}:
            raise ValueError("RowwiseQuantConfig: drop_rows='unused' closes DROP to rows in use, and tiers "
                             f"{list(self.tiers)} leave them no other: allow another tier")
        chosen = [n for n in ("fractions", "budget_bytes", "budget_fraction") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"RowwiseQuantConfig: set exactly one of fractions, budget_bytes, "
                             f"budget_fraction (got {chosen or 'none'})")
        if self.fractions is not None:
            fr = {Tier.parse(k).value: float(v) for k, v in self.fractions.items()}
            if any(v < 0 for v in fr.values()) or not math.isclose(sum(fr.values()), 1.0, abs_tol=1e-6):
                raise ValueError(f"RowwiseQuantConfig.fractions must be >= 0 and sum to 1, got {self.fractions}")
            self.fractions = fr
        if self.budget_bytes is not None and self.budget_bytes < 0:
            raise ValueError("RowwiseQuantConfig.budget_bytes must be >= 0")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ValueError(f"RowwiseQuantConfig.budget_fraction must be in (0, 1], got {self.budget_fraction}")
        self.tiers = [Tier.parse(t).value for t in self.tiers]
        for table, tier in self.table_overrides.items():
            if tier != EXCLUDE:
                Tier.parse(tier)  # raises naming the tier
        for table, fr in self.table_fractions.items():
            parsed = {Tier.parse(k).value: float(v) for k, v in fr.items()}
            if any(v < 0 for v in parsed.values()) or not math.isclose(sum(parsed.values()), 1.0, abs_tol=1e-6):
                raise ValueError(f"RowwiseQuantConfig.table_fractions[{table!r}] must be >= 0 and sum to 1, got {fr}")
            self.table_fractions[table] = parsed
        for table, b in self.table_budgets.items():
            if not isinstance(b, int) or b < 0:
                raise ValueError(f"RowwiseQuantConfig.table_budgets[{table!r}] must be bytes >= 0, got {b!r}")
        sets = [set(self.table_overrides), set(self.table_fractions), set(self.table_budgets)]
        both = sorted((sets[0] & sets[1]) | (sets[0] & sets[2]) | (sets[1] & sets[2]))
        if both:
            raise ValueError(f"tables given more than one of pin, fractions and budget: {both}")

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_dict(d: Dict) -> "RowwiseQuantConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(RowwiseQuantConfig)})
        if unknown:
            raise ValueError(f"RowwiseQuantConfig: unknown keys {unknown}")
        return RowwiseQuantConfig(**d)
