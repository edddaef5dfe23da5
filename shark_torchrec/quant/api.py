"""``quantize_``: swap a model's ``EmbeddingBagCollection``s for row-wise mixed-precision ones,
in place, in the style of torchao (``quantize_(model, Config(...), filter_fn=...)``).

    from shark_torchrec.quant import RowwiseQuantConfig, quantize_
    priorities = row_priority.priorities()            # {table: [rows]}, or counts of your own
    quantize_(dlrm, RowwiseQuantConfig(fractions={"fp16": .1, "int8": .3, "int4": .6}),
              priorities=priorities)
    quantize_(dlrm, RowwiseQuantConfig(budget_fraction=0.25,
                                       table_overrides={"t_cat_3": "fp16", "t_cat_7": "exclude"}),
              priorities=priorities)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from shark_torchrec.quant.layout import ROW_ALIGNMENTS
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection
from shark_torchrec.quant.tiers import (  # noqa: F401 (BudgetError: part of this module's API)
    DEFAULT_ROW_ALIGNMENT,
    BudgetError,
    TIER_ORDER,
    Tier,
    TierAssignment,
    assign_by_budget,
    assign_by_fractions,
    row_bytes,
)

EXCLUDE = "exclude"


@dataclass
class RowwiseQuantConfig:
    """How to assign row tiers; exactly one of ``fractions``, ``budget_bytes`` or
    ``budget_fraction``.

    Attributes:
        fractions: ``{tier: fraction of rows}`` per table, summing to 1 (highest priorities get
            the most precise tier).
        budget_bytes: bytes for all converted tables together: rows in FBGEMM's layout, the
            4-byte-per-row id map and sub-table padding (pinned tables count against it).
        budget_fraction: the budget as a fraction of the converted tables' fp32 bytes.
        tiers: tiers a budget may use.
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
        drop_rows: which rows a budget may drop: ``"any"`` or ``"unused"`` (rows whose
            priority is 0 only; see :func:`~shark_torchrec.quant.tiers.assign_by_budget`).
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

    def __post_init__(self) -> None:
        if self.row_alignment not in ROW_ALIGNMENTS:
            raise ValueError(f"RowwiseQuantConfig.row_alignment must be one of {ROW_ALIGNMENTS}, "
                             f"got {self.row_alignment!r}")
        if self.drop_rows not in ("any", "unused"):
            raise ValueError(f"RowwiseQuantConfig.drop_rows must be 'any' or 'unused', got {self.drop_rows!r}")
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


def assign_tiers(
    ebc: EmbeddingBagCollection,
    config: RowwiseQuantConfig,
    priorities: Optional[Dict[str, torch.Tensor]] = None,
) -> TierAssignment:
    """Per-row tiers for every table of ``ebc`` under ``config`` (priorities default to 1 for
    every row; a table missing from ``priorities`` is an error naming it)."""
    configs = ebc.embedding_bag_configs()
    names = [c.name for c in configs]
    unknown = sorted((set(config.table_overrides) | set(config.table_fractions)
                      | set(config.table_budgets)) - set(names))
    if unknown:
        raise ValueError(f"table_overrides/table_fractions/table_budgets name unknown tables "
                         f"{unknown} (tables: {names})")
    if priorities is None:
        priorities = {c.name: torch.ones(c.num_embeddings) for c in configs}
    missing = [n for n in names if n not in priorities]
    if missing:
        raise ValueError(f"no priorities for tables {missing}")
    dims = {c.name: c.embedding_dim for c in configs}
    pinned: Dict[str, Tier] = {}
    for name, tier in config.table_overrides.items():
        pinned[name] = Tier.FP32 if tier == EXCLUDE else Tier.parse(tier)
    own = {c.name: c for c in configs if c.name in config.table_fractions}
    own_budget = {c.name: c for c in configs if c.name in config.table_budgets}
    free = [c for c in configs if c.name not in pinned and c.name not in own and c.name not in own_budget]
    tiers: Dict[str, torch.Tensor] = {}
    for name, tier in pinned.items():
        rows = next(c.num_embeddings for c in configs if c.name == name)
        tiers[name] = torch.full((rows,), TIER_ORDER.index(tier), dtype=torch.int8)
    for name, c in own.items():
        tiers.update(assign_by_fractions({name: priorities[name]}, {name: c.embedding_dim},
                                         config.table_fractions[name], config.row_alignment).tiers)
    for name, c in own_budget.items():
        rows_budget = config.table_budgets[name] - 4 * c.num_embeddings - 128 * len(TIER_ORDER)
        if rows_budget < 0:
            raise BudgetError(f"table {name!r}: budget {config.table_budgets[name]} bytes is below "
                              f"its id map and padding "
                              f"({4 * c.num_embeddings + 128 * len(TIER_ORDER)} bytes)")
        tiers.update(assign_by_budget({name: priorities[name]}, {name: ebc.embedding_bags[name].weight.detach()},
                                      rows_budget, tiers=config.tiers, row_alignment=config.row_alignment,
                                      drop_rows=config.drop_rows).tiers)
    details: Dict[str, float] = {}
    if free:
        if config.fractions is not None:
            a = assign_by_fractions({c.name: priorities[c.name] for c in free},
                                    {c.name: c.embedding_dim for c in free}, config.fractions,
                                    config.row_alignment)
        else:
            # Pinned tables and tables with their own fractions count against the budget.
            pinned_bytes = sum(row_bytes(TIER_ORDER[int(i)], dims[n], config.row_alignment)
                               for n in tiers for i in tiers[n])
            fp32 = sum(row_bytes(Tier.FP32, c.embedding_dim, config.row_alignment) * c.num_embeddings
                       for c in configs)
            if config.budget_bytes is not None:
                budget = config.budget_bytes
            else:
                budget = int(config.budget_fraction * fp32)
            # The budget covers everything the converted collection holds: the id map (4 bytes
            # per row) and each sub-table's cache-line padding (< 128 bytes) come off first.
            overhead = sum(4 * c.num_embeddings + 128 * len(TIER_ORDER) for c in configs)
            rows_budget = budget - pinned_bytes - overhead
            if rows_budget < 0:
                raise BudgetError(
                    f"budget of {budget} bytes is below what the quantized tables hold whatever "
                    f"the tiers: id map, padding and pinned tables ({pinned_bytes + overhead} "
                    f"bytes, a budget fraction of {(pinned_bytes + overhead) / fp32:.3f} of the "
                    f"fp32 tables); raise the budget (--quant_budget_fraction)")
            a = assign_by_budget({c.name: priorities[c.name] for c in free},
                                 {c.name: ebc.embedding_bags[c.name].weight.detach() for c in free},
                                 rows_budget, tiers=config.tiers, row_alignment=config.row_alignment,
                                 drop_rows=config.drop_rows)
            details = dict(a.details, budget_bytes=budget, rows_budget_bytes=rows_budget)
        tiers.update(a.tiers)
    return TierAssignment(tiers, dims, config.row_alignment, method=json.dumps(config.to_dict()),
                          details=details)


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, EmbeddingBagCollection)


def quantize_(
    model: nn.Module,
    config: RowwiseQuantConfig,
    priorities: Optional[Dict[str, torch.Tensor]] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> nn.Module:
    """Swap, in place, every ``EmbeddingBagCollection`` of ``model`` that ``filter_fn(module,
    fqn)`` accepts for a :class:`RowwiseMixedEmbeddingBagCollection`.

    Args:
        model: any model (a TorchRec ``DLRM`` included); if it *is* a collection, the converted
            collection is returned (a module cannot replace itself).
        config: the tier policy.
        priorities: ``{table: [rows]}`` row priorities (e.g. ``RowPriority.priorities()``) or
            counts; default: all rows equal.
        filter_fn: which collections to convert (default: every ``EmbeddingBagCollection``).

    Returns ``model`` (or the converted collection).  Each converted collection keeps its
    :class:`TierAssignment` as ``.assignment``.
    """
    filter_fn = filter_fn or _default_filter
    targets = [(fqn, m) for fqn, m in model.named_modules()
               if isinstance(m, EmbeddingBagCollection) and filter_fn(m, fqn)]
    if not targets:
        raise ValueError("quantize_: no EmbeddingBagCollection matched")
    all_tables = {c.name for _, m in targets for c in m.embedding_bag_configs()}
    unknown = sorted((set(config.table_overrides) | set(config.table_fractions)
                      | set(config.table_budgets)) - all_tables)
    if unknown:  # checked before anything is swapped
        raise ValueError(f"table_overrides/table_fractions name unknown tables {unknown} "
                         f"(tables: {sorted(all_tables)})")
    for fqn, ebc in targets:
        table_names = {c.name for c in ebc.embedding_bag_configs()}
        own = None if priorities is None else {k: v for k, v in priorities.items() if k in table_names}
        local = dataclasses.replace(
            config,
            table_overrides={k: v for k, v in config.table_overrides.items() if k in table_names},
            table_fractions={k: v for k, v in config.table_fractions.items() if k in table_names},
            table_budgets={k: v for k, v in config.table_budgets.items() if k in table_names})
        assignment = assign_tiers(ebc, local, own)
        mixed = RowwiseMixedEmbeddingBagCollection.from_float(ebc, assignment, check_ids=config.check_ids)
        mixed.assignment = assignment
        if fqn == "":
            return mixed
        parent_name, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, mixed)
    return model
