"""Pruning plans: which feature fields (and so which tables) to drop, chosen from scores.

A plan is chosen by exactly one criterion:

* ``keep=k``: keep the ``k`` highest-scoring fields;
* ``drop_fraction=x``: drop ``floor(x · F)`` of the ``F`` fields, lowest scores first;
* ``byte_target=b``: drop tables with all their fields, lowest score first (a shared table's
  is its best field's), until the tables still needed take at most ``b`` bytes;
* ``score_share=s``: drop the tables that save the most bytes for their fields' scores: least
  score per byte saved first, each dropped with all its fields if the dropped fields' scores
  still add up to at most ``s`` of all fields' scores (a field whose score is 0, such as a
  constant field, is always dropped where its table can go).

The byte criteria drop only what frees bytes: a table serving a protected field stays, and so
do its other fields (dropping them would lose their information and free nothing); ``keep``
and ``drop_fraction`` count fields, whatever their tables.  ``drop_fraction`` asking for more
fields than are not protected is an error, as ``keep`` is.

Protected fields are never dropped.  A table is removed only when every feature it serves is
dropped (a shared table with one surviving feature stays whole).  Plans are JSON files and are
validated against the model they are applied to.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from shark_torchrec.errors import SharkInputError

PLAN_FORMAT = "shark-torchrec/pruning-plan/v1"


class PlanError(SharkInputError, ValueError):
    """A pruning plan, plan file or plan criterion that cannot be used (the message names the
    file, field or argument)."""


def table_bytes(table: EmbeddingBagConfig) -> int:
    """Bytes of a table's weights in its ``data_type`` (optimizer state not included)."""
    return table.num_embeddings * table.embedding_dim * DATA_TYPE_NUM_BITS[table.data_type] // 8


@dataclass
class PruningPlan:
    """Which fields of a model to drop.

    Attributes:
        tables: every table of the model, ``{table: [features]}``, in model order.
        table_bytes: bytes of every table.
        dropped_features: the fields to drop.
        scores: the scores the plan was chosen from.
        method: the scorer's name (``"shark-mean"``, ``"permutation"``, ...).
        criterion: ``{"keep": k}``, ``{"drop_fraction": x}`` or ``{"byte_target": b}``.
        protected: fields that were never candidates for dropping.
    """

    tables: Dict[str, List[str]]
    table_bytes: Dict[str, int]
    dropped_features: List[str]
    scores: Dict[str, float] = field(default_factory=dict)
    method: str = ""
    criterion: Dict[str, float] = field(default_factory=dict)
    protected: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        features = self.features
        if len(set(features)) != len(features):
            raise PlanError("PruningPlan: a feature is listed under two tables")
        unknown = sorted(set(self.dropped_features) - set(features))
        if unknown:
            raise PlanError(f"PruningPlan: dropped_features names unknown fields {unknown}")
        if not self.kept_features:
            raise PlanError("PruningPlan: every field would be dropped; at least one must remain")
        clash = sorted(set(self.protected) & set(self.dropped_features))
        if clash:
            raise PlanError(f"PruningPlan: protected fields are dropped: {clash}")

    # ------------------------------------------------------------------ views
    @property
    def features(self) -> List[str]:
        return [f for feats in self.tables.values() for f in feats]

    @property
    def kept_features(self) -> List[str]:
        dropped = set(self.dropped_features)
        return [f for f in self.features if f not in dropped]

    @property
    def dropped_tables(self) -> List[str]:
        dropped = set(self.dropped_features)
        return [t for t, feats in self.tables.items() if all(f in dropped for f in feats)]

    @property
    def kept_tables(self) -> List[str]:
        gone = set(self.dropped_tables)
        return [t for t in self.tables if t not in gone]

    @property
    def bytes_before(self) -> int:
        return sum(self.table_bytes.values())

    @property
    def bytes_after(self) -> int:
        return sum(self.table_bytes[t] for t in self.kept_tables)

    def summary(self) -> Dict[str, object]:
        return {
            "fields_before": len(self.features),
            "fields_after": len(self.kept_features),
            "tables_before": len(self.tables),
            "tables_after": len(self.kept_tables),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "dropped_features": list(self.dropped_features),
            "dropped_tables": self.dropped_tables,
        }

    # ------------------------------------------------------------------ inputs
    def filter_features(self, kjt):
        """``kjt`` (a ``KeyedJaggedTensor``) with only the kept features, in plan order: the
        batches of the unpruned model, ready for the pruned one.  See
        :mod:`shark_torchrec.pruning.inputs`."""
        from shark_torchrec.pruning.inputs import filter_features

        return filter_features(kjt, self.kept_features)

    def filter_batch(self, batch):
        """A TorchRec ``Batch`` with only the kept sparse features (dense and labels as they are)."""
        from shark_torchrec.pruning.inputs import filter_batch

        return filter_batch(batch, self.kept_features)

    # ------------------------------------------------------------------ validation
    def validate(self, tables: Sequence[EmbeddingBagConfig], source: str = "model") -> None:
        """Check that the plan was made for a model with exactly these tables and features."""
        theirs = {t.name: list(t.feature_names) for t in tables}
        if theirs == self.tables:
            for t in tables:  # (the bytes it reports and was chosen by are the model's)
                if int(self.table_bytes.get(t.name, -1)) != table_bytes(t):
                    raise PlanError(f"pruning plan does not match the {source}: table {t.name!r} holds "
                                    f"{table_bytes(t)} bytes, the plan's {self.table_bytes.get(t.name)} "
                                    f"(another size of it?)")
            return
        plan_feats, model_feats = set(self.features), {f for fs in theirs.values() for f in fs}
        problems = []
        if plan_feats - model_feats:
            problems.append(f"fields unknown to the {source}: {sorted(plan_feats - model_feats)}")
        if model_feats - plan_feats:
            problems.append(f"{source} fields missing from the plan: {sorted(model_feats - plan_feats)}")
        if set(theirs) != set(self.tables):
            problems.append(
                f"tables differ (plan {sorted(self.tables)}, {source} {sorted(theirs)})"
            )
        elif not problems:
            problems.append("tables serve different features")
        raise PlanError("pruning plan does not match the model: " + "; ".join(problems))

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=1)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @staticmethod
    def from_json(text: str, source: str = "plan") -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}: not a JSON pruning plan ({e})") from e
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: not a pruning plan (format must be {PLAN_FORMAT!r})")
        data.pop("format")
        required = {"tables", "table_bytes", "dropped_features"}
        missing = sorted(required - set(data))
        if missing:
            raise PlanError(f"{source}: pruning plan lacks {missing}")
        unknown = sorted(set(data) - set(PruningPlan.__dataclass_fields__))
        if unknown:
            raise PlanError(f"{source}: unknown keys in pruning plan: {unknown}")
        try:
            return PruningPlan(**data)
        except ValueError as e:
            raise PlanError(f"{source}: {e}") from e

    @staticmethod
    def load(path: str) -> "PruningPlan":
        with open(path) as f:
            return PruningPlan.from_json(f.read(), source=path)


def _check_scores(scores: Dict[str, float], features: List[str], protected: Sequence[str]) -> None:
    """Scores for exactly ``features``, all finite; ``protected`` among them."""
    unknown = sorted(set(scores) - set(features))
    missing = [f for f in features if f not in scores]
    if unknown or missing:
        raise PlanError(f"scores do not match the model's fields: unknown {unknown}, missing {missing}")
    bad = sorted(f for f, v in scores.items() if not math.isfinite(v))
    if bad:
        raise PlanError(f"scores are not finite for fields {bad}")
    unknown_protected = sorted(set(protected) - set(features))
    if unknown_protected:
        raise PlanError(f"protected names unknown fields {unknown_protected}")


def _freeable_tables(table_map: Dict[str, List[str]], candidates: List[str]) -> Dict[str, List[str]]:
    """The tables whose bytes dropping can free: those every field of which may be dropped (a
    table goes only with all the fields it serves; one serving a protected field stays)."""
    allowed = set(candidates)
    return {t: fs for t, fs in table_map.items() if fs and all(f in allowed for f in fs)}


def _to_byte_target(table_map: Dict[str, List[str]], sizes: Dict[str, int], scores: Dict[str, float],
                    candidates: List[str], byte_target: int) -> List[str]:
    """The ``byte_target`` criterion: tables dropped whole, with all their fields, lowest score
    first (a table's score is its best field's), until the tables still needed fit; at least one
    field is kept.  A field whose table stays (it serves a protected field) frees no bytes and is
    not dropped."""
    if byte_target < 0:
        raise PlanError(f"byte_target must be >= 0, got {byte_target}")
    F = sum(len(fs) for fs in table_map.values())
    dropped: List[str] = []

    def needed(drop: List[str]) -> int:
        gone = set(drop)
        return sum(sizes[t] for t, fs in table_map.items() if not all(f in gone for f in fs))

    units = sorted(_freeable_tables(table_map, candidates).values(),
                   key=lambda fs: (max(scores[f] for f in fs), min(fs)))
    for fs in units:
        if needed(dropped) <= byte_target:
            break
        if len(dropped) + len(fs) < F:
            dropped.extend(fs)
    if needed(dropped) > byte_target:
        raise PlanError(f"byte_target {byte_target} cannot be reached: {needed(dropped)} bytes remain "
                        f"after dropping every table that may go but one field (tables serving a "
                        f"protected field stay)")
    return dropped


def _by_score_per_byte(scores: Dict[str, float], tables: Sequence[EmbeddingBagConfig], candidates: List[str],
                       share: float) -> List[str]:
    """The ``score_share`` criterion: tables by least score per byte saved (a table's score is
    the sum of its fields', dropped whole with all of them: a field whose table stays frees no
    bytes), each dropped while the dropped scores stay within ``share`` of the total; at least
    one field is kept."""
    if not 0 <= share < 1:
        raise PlanError(f"score_share must be in [0, 1), got {share}")
    value = {f: max(scores[f], 0.0) for t in tables for f in t.feature_names}  # (a negative score: dropping helps)
    allowed = share * sum(value.values())
    sizes = {t.name: table_bytes(t) for t in tables}
    units = [(t, fs, sum(value[f] for f in fs))
             for t, fs in _freeable_tables({t.name: list(t.feature_names) for t in tables}, candidates).items()]
    units.sort(key=lambda u: (u[2] / max(sizes[u[0]], 1.0), u[2], min(u[1])))
    dropped: List[str] = []
    spent = 0.0
    for _, fs, v in units:
        if len(dropped) + len(fs) < len(value) and spent + v <= allowed:
            dropped.extend(fs)
            spent += v
    return dropped


def choose_plan(
    scores: Dict[str, float],
    tables: Sequence[EmbeddingBagConfig],
    keep: Optional[int] = None,
    drop_fraction: Optional[float] = None,
    byte_target: Optional[int] = None,
    protected: Sequence[str] = (),
    method: str = "",
    score_share: Optional[float] = None,
) -> PruningPlan:
    """Choose the fields to drop from ``scores`` (higher = more important).

    Args:
        scores: a score for every feature of ``tables`` (no others, no NaN).
        tables: the model's tables.
        keep, drop_fraction, byte_target, score_share: exactly one criterion (see the module
            docstring).
        protected: fields never dropped.
        method: the scorer's name, recorded in the plan.
    """
    criteria = {k: v for k, v in
                {"keep": keep, "drop_fraction": drop_fraction, "byte_target": byte_target,
                 "score_share": score_share}.items()
                if v is not None}
    if len(criteria) != 1:
        raise PlanError(f"choose exactly one of keep, drop_fraction, byte_target, score_share (got {criteria})")
    table_map = {t.name: list(t.feature_names) for t in tables}
    features = [f for fs in table_map.values() for f in fs]
    _check_scores(scores, features, protected)
    candidates = sorted((f for f in features if f not in set(protected)),
                        key=lambda f: (scores[f], f))  # lowest first
    sizes = {t.name: table_bytes(t) for t in tables}
    F = len(features)
    if keep is not None:
        if not 1 <= keep <= F:
            raise PlanError(f"keep must be in [1, {F}], got {keep}")
        n_drop = F - keep
        if n_drop > len(candidates):
            raise PlanError(
                f"keep={keep} needs dropping {n_drop} fields but only {len(candidates)} are not "
                f"protected"
            )
        dropped = candidates[:n_drop]
    elif drop_fraction is not None:
        if not 0 <= drop_fraction < 1:
            raise PlanError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        # (floor of x·F taken exactly: 0.58 * 50 is 28.999999999999996 in floating point)
        n_drop = math.floor(Fraction(drop_fraction) * F + Fraction(1, 10**9))
        if n_drop > len(candidates):
            raise PlanError(f"drop_fraction={drop_fraction} needs dropping {n_drop} of {F} fields but only "
                            f"{len(candidates)} are not protected")
        dropped = candidates[:n_drop]
    elif score_share is not None:
        dropped = _by_score_per_byte(scores, tables, candidates, score_share)
    else:
        dropped = _to_byte_target(table_map, sizes, scores, candidates, byte_target)
    return PruningPlan(
        tables=table_map,
        table_bytes=sizes,
        dropped_features=sorted(dropped, key=features.index),
        scores=dict(scores),
        method=method,
        criterion=criteria,
        protected=list(protected),
    )
