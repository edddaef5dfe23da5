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
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from shark_torchrec.quant.config import EXCLUDE, RowwiseQuantConfig  # noqa: F401 (re-exported)
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection
from shark_torchrec.quant.tiers import BudgetError, TierAssignment  # noqa: F401 (BudgetError: API)


def assign_tiers(
    ebc: EmbeddingBagCollection,
    config: RowwiseQuantConfig,
    priorities: Optional[Dict[str, torch.Tensor]] = None,
) -> TierAssignment:
    """Per-row tiers for every table of ``ebc`` under ``config`` (priorities default to 1 for
    every row; a table missing from ``priorities`` is an error naming it).

    The policy is the sharded one (:func:`~shark_torchrec.sharded.assign_tiers_sharded`) run
    in this process alone, so a model assigned here and the same model sharded over any number
    of processes get the same tiers."""
    from shark_torchrec.sharded.assign import assign_tiers_sharded
    from shark_torchrec.sharded.comm import Comm
    from shark_torchrec.sharded.layout import collection_layout

    configs = ebc.embedding_bag_configs()
    names = [c.name for c in configs]
    unknown = sorted((set(config.table_overrides) | set(config.table_fractions)
                      | set(config.table_budgets)) - set(names))
    if unknown:
        raise ValueError(f"table_overrides/table_fractions/table_budgets name unknown tables "
                         f"{unknown} (tables: {names})")
    if priorities is not None:
        missing = [n for n in names if n not in priorities]
        if missing:
            raise ValueError(f"no priorities for tables {missing}")
        rows_of = {c.name: c.num_embeddings for c in configs}
        for n in names:  # (a longer tensor, of an older or unpruned table, would be cut silently)
            count = torch.as_tensor(priorities[n]).numel()
            if count != rows_of[n]:
                raise ValueError(f"table {n!r}: {count} priorities for its {rows_of[n]} rows")
    layout, weights = collection_layout(ebc, rank=0, world_size=1)
    weights = {k: v.detach() for k, v in weights.items()}
    on_meta = sorted(s.table for s in layout.shards if weights[s.name].device.type == "meta")
    # (a byte budget measures each row's error; SHARED rows cluster the rows' values)
    fractions = [config.fractions or {}, *config.table_fractions.values()]
    if on_meta and (config.fractions is None or config.table_budgets or any("shared" in f for f in fractions)):
        raise ValueError(f"tables {on_meta} are on the meta device: they hold no values to measure "
                         "quantization errors on, which a byte budget needs; convert them with fractions "
                         "(the structure only, as TorchRec converts a meta collection) or materialize them first")
    rows = None if priorities is None else (lambda t, r0, n: priorities[t][r0:r0 + n])
    a = assign_tiers_sharded(layout, weights, config, rows, Comm.local())
    tiers = {s.table: a.tiers[s.name] for s in layout.shards}
    shared = {s.table: a.shared[s.name] for s in layout.shards if s.name in a.shared}
    return TierAssignment(tiers, {c.name: c.embedding_dim for c in configs}, config.row_alignment,
                          method=a.method, details=a.details, shared=shared, row_fit=config.row_fit)


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
    # (every name a collection is reachable by: one used in two places, tied towers, is
    # converted once and swapped at each)
    targets = [(fqn, m) for fqn, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, EmbeddingBagCollection) and filter_fn(m, fqn)]
    if not targets:
        raise ValueError("quantize_: no EmbeddingBagCollection matched")
    distinct = list({id(m): m for _, m in targets}.values())
    if config.budget_bytes is not None and len(distinct) > 1:
        names = sorted({fqn for fqn, _ in targets})
        raise ValueError(f"quantize_: budget_bytes is one budget for the tables of one collection, and "
                         f"{len(distinct)} collections matched ({names}): convert them one at a time "
                         "(filter_fn), each with its own budget_bytes, or use budget_fraction")
    all_tables = {c.name for _, m in targets for c in m.embedding_bag_configs()}
    unknown = sorted((set(config.table_overrides) | set(config.table_fractions)
                      | set(config.table_budgets)) - all_tables)
    if unknown:  # checked before anything is swapped
        raise ValueError(f"table_overrides/table_fractions name unknown tables {unknown} "
                         f"(tables: {sorted(all_tables)})")
    converted: Dict[int, nn.Module] = {}
    for fqn, ebc in targets:
        if id(ebc) not in converted:  # (a collection reachable by two names: converted once)
            converted[id(ebc)] = _converted(ebc, config, priorities)
        mixed = converted[id(ebc)]
        if fqn == "":
            return mixed
        parent_name, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, mixed)
    return model


def _converted(ebc: EmbeddingBagCollection, config: RowwiseQuantConfig,
               priorities: Optional[Dict[str, torch.Tensor]]) -> nn.Module:
    """``ebc`` converted under the settings of ``config`` that name its tables."""
    table_names = {c.name for c in ebc.embedding_bag_configs()}
    own = None if priorities is None else {k: v for k, v in priorities.items() if k in table_names}
    local = dataclasses.replace(
        config,
        table_overrides={k: v for k, v in config.table_overrides.items() if k in table_names},
        table_fractions={k: v for k, v in config.table_fractions.items() if k in table_names},
        table_budgets={k: v for k, v in config.table_budgets.items() if k in table_names})
    assignment = assign_tiers(ebc, local, own)
    mixed = RowwiseMixedEmbeddingBagCollection.from_float(ebc, assignment, check_ids=config.check_ids,
                                                          output_dtype=config.output_dtype)
    mixed.assignment = assignment
    return mixed
