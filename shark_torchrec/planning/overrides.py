"""One YAML file for per-table planner constraints and compression settings.

::

    # planner_overrides.yaml
    tables:
      "t_cat_*":                       # table names or glob patterns, applied in file order
        sharding_types: [table_wise, row_wise]
        compute_kernels: [fused]
        pooling_factors: [20.0]
        compression:
          tiers: {fp16: 0.1, int8: 0.3, int4: 0.6}
      t_cat_3:
        sharding_types: [row_wise]     # a later entry overrides what an earlier one set
        compression:
          never_prune: true
          pin: fp16                    # every row of the table in one tier
      t_cat_9:
        compression:
          exclude: true                # keep the table exact (FP32)
      t_cat_12:
        compression:
          budget_bytes: 2000000        # this table's own byte budget (id map included)

Planner keys are fields of TorchRec's ``ParameterConstraints``: ``sharding_types``,
``compute_kernels``, ``min_partition``, ``pooling_factors``, ``num_poolings``, ``batch_sizes``,
``enforce_hbm``, ``stochastic_rounding``.  Compression keys: ``never_prune`` (the table's
features are protected from field pruning), ``pin`` (a tier), ``exclude``, ``tiers`` (row
fractions per tier for this table) and ``budget_bytes`` (a byte budget for this table).  Errors name the file, the key path and the problem.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import yaml
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from shark_torchrec.errors import SharkInputError
from shark_torchrec.quant.config import RowwiseQuantConfig
from shark_torchrec.quant.tiers import Tier

_CONSTRAINT_KEYS = {
    "sharding_types": list, "compute_kernels": list, "min_partition": int,
    "pooling_factors": list, "num_poolings": list, "batch_sizes": list,
    "enforce_hbm": bool, "stochastic_rounding": bool,
}
_COMPRESSION_KEYS = {"never_prune", "pin", "exclude", "tiers", "budget_bytes"}
_EXCLUSIVE = ("pin", "exclude", "tiers", "budget_bytes")
_SHARDING_TYPES = {t.value for t in ShardingType}
_KERNELS = {k.value for k in EmbeddingComputeKernel}


class OverridesError(SharkInputError, ValueError):
    """A planner-overrides file that cannot be used; the message names file and key path."""


@dataclass
class PlannerOverrides:
    """What an overrides file says, resolved against a model's tables.

    Attributes:
        constraints: ``ParameterConstraints`` per table, for the planner.
        never_prune: tables whose features field pruning must keep.
        pins: ``{table: tier}`` or ``{table: "exclude"}`` (``RowwiseQuantConfig.table_overrides``).
        tier_fractions: ``{table: {tier: fraction}}`` row fractions per table.
        budgets: ``{table: bytes}`` a byte budget per table.
    """

    constraints: Dict[str, ParameterConstraints] = field(default_factory=dict)
    never_prune: List[str] = field(default_factory=list)
    pins: Dict[str, str] = field(default_factory=dict)
    tier_fractions: Dict[str, Dict[str, float]] = field(default_factory=dict)
    budgets: Dict[str, int] = field(default_factory=dict)

    def quant_config(self, base: "RowwiseQuantConfig") -> "RowwiseQuantConfig":
        """``base`` with this file's pins and per-table fractions added (the file wins)."""
        import dataclasses

        mine = set(self.pins) | set(self.tier_fractions) | set(self.budgets)
        return dataclasses.replace(
            base,
            table_overrides={**{k: v for k, v in base.table_overrides.items() if k not in mine}, **self.pins},
            table_fractions={**{k: v for k, v in base.table_fractions.items() if k not in mine},
                             **self.tier_fractions},
            table_budgets={**{k: v for k, v in base.table_budgets.items() if k not in mine}, **self.budgets})

    def protected_features(self, tables: Sequence[EmbeddingBagConfig]) -> List[str]:
        """The features of the ``never_prune`` tables."""
        keep = set(self.never_prune)
        return [f for t in tables if t.name in keep for f in t.feature_names]


def load_overrides(path: str, tables: Sequence[EmbeddingBagConfig]) -> PlannerOverrides:
    """Read and validate ``path`` against ``tables``."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise OverridesError(f"{path}: cannot read ({e})") from e
    except yaml.YAMLError as e:
        raise OverridesError(f"{path}: not valid YAML ({e})") from e
    return parse_overrides(doc, tables, source=path)


def sharding_digest(path: str) -> str:
    """A SHA-256 of what ``path`` tells the planner (every table's constraints, not its
    ``compression`` settings): how a model is sharded while it trains (a data-parallel table
    trains with the dense optimizer), which keys the pipeline's train stage; the compression
    settings key the stages that read them.  A file that does not parse counts by its bytes
    (reading it later names the problem)."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
        entries = doc["tables"]
        planner = {str(k): {c: v for c, v in settings.items() if c != "compression"} for k, settings in entries.items()}
        planner = {k: v for k, v in planner.items() if v}  # (a table with compression settings only)
        text = json.dumps(planner, sort_keys=True, default=str)
    except Exception:  # (any malformed document: load_overrides says what is wrong)
        from shark_torchrec.stages import file_digest

        return file_digest(path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fail(source: str, where: str, problem: str) -> None:
    raise OverridesError(f"{source}: {where}: {problem}")


def parse_overrides(doc: Any, tables: Sequence[EmbeddingBagConfig], source: str = "overrides") -> PlannerOverrides:
    """Validate an already parsed document (see :func:`load_overrides`)."""
    if doc is None:
        return PlannerOverrides()
    if not isinstance(doc, dict) or set(doc) - {"tables"}:
        _fail(source, "top level", "expected a mapping with one key, 'tables'")
    entries = doc.get("tables") or {}
    if not isinstance(entries, dict):
        _fail(source, "tables", "expected a mapping of table names or patterns")
    names = [t.name for t in tables]
    per_table: Dict[str, Dict[str, Any]] = {}
    compression: Dict[str, Dict[str, Any]] = {}
    features = {t.name: len(t.feature_names) for t in tables}
    for pattern, settings in entries.items():
        where = f"tables.{pattern}"
        # (a table's own name is itself, even where it holds glob characters: "user[1]")
        matched = [str(pattern)] if str(pattern) in names else [n for n in names if fnmatch.fnmatchcase(n, str(pattern))]
        if not matched:
            _fail(source, where, f"matches no table (tables: {names})")
        if not isinstance(settings, dict):
            _fail(source, where, "expected a mapping of settings")
        unknown = sorted(set(settings) - set(_CONSTRAINT_KEYS) - {"compression"})
        if unknown:
            _fail(source, where, f"unknown keys {unknown} (known: {sorted(_CONSTRAINT_KEYS)} and 'compression')")
        planner = {k: _check_constraint(source, f"{where}.{k}", k, v) for k, v in settings.items() if k != "compression"}
        comp = _check_compression(source, f"{where}.compression", settings.get("compression"))
        for n in matched:
            per_table.setdefault(n, {}).update(_per_feature(source, where, n, features[n], planner))
            acc = compression.setdefault(n, {})
            # (exclude: false sets nothing, so it does not clear an earlier pin, tiers or budget)
            if set(_EXCLUSIVE) & {k for k in comp if k != "exclude" or comp[k]}:
                # pin, exclude, tiers and budget_bytes exclude each other: a later one replaces
                # an earlier one
                for k in _EXCLUSIVE:
                    acc.pop(k, None)
            acc.update(comp)
    out = PlannerOverrides()
    for n, kw in per_table.items():
        if kw:
            out.constraints[n] = ParameterConstraints(**kw)
    for n, comp in compression.items():
        if comp.get("never_prune"):
            out.never_prune.append(n)
        if comp.get("exclude"):
            out.pins[n] = "exclude"
        elif "pin" in comp:
            out.pins[n] = comp["pin"]
        if "tiers" in comp:
            out.tier_fractions[n] = comp["tiers"]
        if "budget_bytes" in comp:
            out.budgets[n] = comp["budget_bytes"]
    return out


#: Planner settings TorchRec reads as one value per feature of the table (zipped with them).
_PER_FEATURE = ("pooling_factors", "num_poolings", "batch_sizes")


def _per_feature(source: str, where: str, table: str, n_features: int, planner: Dict[str, Any]) -> Dict[str, Any]:
    """``planner`` with its per-feature lists fitted to a table of ``n_features`` features: one
    value is every feature's; any other length than the features' is an error naming the table
    (TorchRec would zip the list with the features and estimate from a wrong or partial list)."""
    out = dict(planner)
    for key in _PER_FEATURE:
        if key in out:
            value = out[key]
            if len(value) == 1:
                out[key] = value * n_features
            elif len(value) != n_features:
                _fail(source, f"{where}.{key}", f"{len(value)} values for table {table!r}, which has "
                      f"{n_features} feature(s): give one value, or one per feature")
    return out


def _check_constraint(source: str, where: str, key: str, value: Any) -> Any:
    kind = _CONSTRAINT_KEYS[key]
    if kind is list and not isinstance(value, list):
        _fail(source, where, f"expected a list, got {value!r}")
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        _fail(source, where, f"expected a positive integer, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        _fail(source, where, f"expected true or false, got {value!r}")
    if key == "sharding_types":
        bad = [v for v in value if v not in _SHARDING_TYPES]
        if bad:
            _fail(source, where, f"unknown sharding types {bad} (known: {sorted(_SHARDING_TYPES)})")
    if key == "compute_kernels":
        bad = [v for v in value if v not in _KERNELS]
        if bad:
            _fail(source, where, f"unknown compute kernels {bad} (known: {sorted(_KERNELS)})")
    if key in ("pooling_factors", "num_poolings"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
            _fail(source, where, f"expected positive numbers, got {value!r}")
        value = [float(v) for v in value]
    if key == "batch_sizes" and not all(isinstance(v, int) and v > 0 for v in value):
        _fail(source, where, f"expected positive integers, got {value!r}")
    return value


def _check_compression(source: str, where: str, comp: Any) -> Dict[str, Any]:
    if comp is None:
        return {}
    if not isinstance(comp, dict):
        _fail(source, where, "expected a mapping")
    unknown = sorted(set(comp) - _COMPRESSION_KEYS)
    if unknown:
        _fail(source, where, f"unknown keys {unknown} (known: {sorted(_COMPRESSION_KEYS)})")
    out: Dict[str, Any] = {}
    for key in ("never_prune", "exclude"):
        if key in comp:
            if not isinstance(comp[key], bool):
                _fail(source, f"{where}.{key}", f"expected true or false, got {comp[key]!r}")
            out[key] = comp[key]
    if "pin" in comp:
        try:
            out["pin"] = Tier.parse(str(comp["pin"])).value
        except ValueError as e:
            _fail(source, f"{where}.pin", str(e))
    if sum(k in comp for k in ("pin", "tiers", "budget_bytes")) + bool(comp.get("exclude")) > 1:
        _fail(source, where, "set at most one of pin, exclude, tiers and budget_bytes")
    if "budget_bytes" in comp:
        b = comp["budget_bytes"]
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            _fail(source, f"{where}.budget_bytes", f"expected a positive number of bytes, got {b!r}")
        out["budget_bytes"] = b
    if "tiers" in comp:
        tiers = comp["tiers"]
        if not isinstance(tiers, dict) or not tiers:
            _fail(source, f"{where}.tiers", "expected a mapping of tier: fraction")
        fractions = {}
        for name, frac in tiers.items():
            try:
                tier = Tier.parse(str(name)).value
            except ValueError as e:
                _fail(source, f"{where}.tiers.{name}", str(e))
            if not isinstance(frac, (int, float)) or isinstance(frac, bool) or frac < 0:
                _fail(source, f"{where}.tiers.{name}", f"expected a fraction >= 0, got {frac!r}")
            fractions[tier] = float(frac)
        if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
            _fail(source, f"{where}.tiers", f"fractions sum to {sum(fractions.values()):g}, not 1")
        out["tiers"] = fractions
    return out
