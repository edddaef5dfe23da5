"""Click-log schemas: which columns of a delimited file are the label, dense and sparse fields.

A :class:`ClickLogSchema` drives :class:`~shark_torchrec.data.click_log.ClickLogDataset`.
Two presets ship with the project: :data:`CRITEO_SCHEMA` (the Criteo Kaggle ``train.txt`` and
Criteo 1TB ``day_N`` layout) and :data:`AVAZU_SCHEMA` (the Avazu CTR CSV).

How a categorical value becomes an embedding row (``categorical_encoding``):

* ``"hex"``: the value is parsed as a hexadecimal integer and taken modulo the feature's
  ``num_embeddings``.  This is what TorchRec's Criteo preprocessing does
  (``torchrec.datasets.criteo``), so row ids agree with TorchRec's own pipeline.
* ``"hash"``: the value's bytes are hashed with BLAKE2b (8 bytes, keyed by nothing, so the
  mapping is stable across processes, machines and Python versions, unlike ``hash()``) and
  the hash is taken modulo ``num_embeddings``.
* ``"int"``: the value is a decimal integer (an id the data already carries), taken modulo
  ``num_embeddings``: ids below ``num_embeddings`` get a row of their own, without collisions.
* ``"vocab"``: the column has a vocabulary (``vocabularies[column]``, a list of values): value
  ``vocabulary[i]`` is row ``i`` and any other value the one row after them,
  ``len(vocabulary)`` (out of vocabulary), so ``num_embeddings`` must be at least
  ``len(vocabulary) + 1``.  A column with a vocabulary is always encoded this way.

``categorical_encoding`` is the default; ``encodings`` sets it per column.

A missing categorical value (empty string) becomes the row of the value ``"0"`` under the
encoding in use (row 0 for ``"hex"``), as in TorchRec's Criteo preprocessing; with
``missing_as_empty=True`` it becomes an empty bag instead (its pooled embedding is zero).
Missing dense values read as 0.  Dense values go through ``log(1 + max(x, 0))`` when
``dense_transform="log1p"`` (the DLRM convention for Criteo).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

_ENCODINGS = ("hex", "hash", "int", "vocab")
_DENSE_TRANSFORMS = ("log1p", "none")


@dataclass(frozen=True)
class ClickLogSchema:
    """Layout of a delimited click log.

    Attributes:
        label: name of the 0/1 label column.
        dense: names of the numeric columns, in model order.
        categorical: names of the single-valued categorical columns.
        multi_valued: multi-valued categorical columns, mapped to the separator between
            their values inside one cell (e.g. ``{"tags": "|"}``).
        delimiter: column separator.
        has_header: ``True`` if the first line of every file names the columns, ``False`` if
            none does, ``"auto"`` if a file has a header exactly when its first line holds
            the label column's name (files without one use ``column_names``).
        column_names: the columns, in file order, for files without a header.
        categorical_encoding: ``"hex"``, ``"hash"``, ``"int"`` or ``"vocab"`` for every sparse
            column without an entry in ``encodings`` (see the module docstring).
        dense_transform: ``"log1p"`` or ``"none"``.
        missing_as_empty: a missing categorical value is an empty bag instead of row 0.
        feature_names: optional names for the sparse features in the produced
            ``KeyedJaggedTensor``, one per categorical then multi-valued column (defaults to
            the column names).
        encodings: per sparse column, an encoding that replaces ``categorical_encoding``.
        vocabularies: per sparse column, its list of values (``"vocab"`` encoding).
    """

    label: str
    dense: Sequence[str]
    categorical: Sequence[str]
    multi_valued: Dict[str, str] = field(default_factory=dict)
    delimiter: str = ","
    has_header: Union[bool, str] = True
    column_names: Optional[Sequence[str]] = None
    categorical_encoding: str = "hash"
    dense_transform: str = "log1p"
    missing_as_empty: bool = False
    feature_names: Optional[Sequence[str]] = None
    encodings: Dict[str, str] = field(default_factory=dict)
    vocabularies: Dict[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.categorical_encoding not in _ENCODINGS:
            raise ValueError(
                f"ClickLogSchema.categorical_encoding must be one of {_ENCODINGS}, "
                f"got {self.categorical_encoding!r}"
            )
        if self.dense_transform not in _DENSE_TRANSFORMS:
            raise ValueError(
                f"ClickLogSchema.dense_transform must be one of {_DENSE_TRANSFORMS}, "
                f"got {self.dense_transform!r}"
            )
        if not self.delimiter:
            raise ValueError("ClickLogSchema.delimiter must not be empty")
        if self.has_header not in (True, False, "auto"):
            raise ValueError(
                f"ClickLogSchema.has_header must be True, False or 'auto', got {self.has_header!r}"
            )
        if self.has_header is not True and not self.column_names:
            raise ValueError("ClickLogSchema: files without a header need column_names")
        used = [self.label, *self.dense, *self.categorical, *self.multi_valued]
        dupes = sorted({c for c in used if used.count(c) > 1})
        if dupes:
            raise ValueError(f"ClickLogSchema: columns used twice: {dupes}")
        if not self.sparse_columns:
            raise ValueError("ClickLogSchema: at least one categorical column is needed")
        if self.feature_names is not None and len(self.feature_names) != len(self.sparse_columns):
            raise ValueError(
                f"ClickLogSchema.feature_names has {len(self.feature_names)} names for "
                f"{len(self.sparse_columns)} sparse columns"
            )
        for col, sep in self.multi_valued.items():
            if not sep or sep == self.delimiter:
                raise ValueError(
                    f"ClickLogSchema.multi_valued[{col!r}]: separator {sep!r} must be non-empty "
                    f"and differ from the delimiter"
                )
        for what, per_column in (("encodings", self.encodings), ("vocabularies", self.vocabularies)):
            unknown = sorted(set(per_column) - set(self.sparse_columns))
            if unknown:
                raise ValueError(
                    f"ClickLogSchema.{what}: {unknown} are not sparse columns "
                    f"(sparse columns: {self.sparse_columns})"
                )
        for col, enc in self.encodings.items():
            if enc not in _ENCODINGS:
                raise ValueError(
                    f"ClickLogSchema.encodings[{col!r}] must be one of {_ENCODINGS}, got {enc!r}"
                )
        for col, vocab in self.vocabularies.items():
            if isinstance(vocab, str) or not vocab or not all(isinstance(v, str) for v in vocab):
                raise ValueError(
                    f"ClickLogSchema.vocabularies[{col!r}] must be a non-empty list of strings"
                )
            if len(set(vocab)) < len(vocab):
                dupes = sorted({v for v in vocab if list(vocab).count(v) > 1})
                raise ValueError(f"ClickLogSchema.vocabularies[{col!r}]: values listed twice: {dupes}")
        for col in self.sparse_columns:
            if self.encoding_of(col) == "vocab" and col not in self.vocabularies:
                raise ValueError(f"ClickLogSchema: column {col!r} is encoded 'vocab' but has no vocabulary")
            if col in self.vocabularies and self.encodings.get(col, "vocab") != "vocab":
                raise ValueError(
                    f"ClickLogSchema: column {col!r} has a vocabulary but encodings[{col!r}] is "
                    f"{self.encodings[col]!r}"
                )
        if self.column_names is not None:
            self.check_columns(self.column_names, source="ClickLogSchema.column_names")

    def encoding_of(self, column: str) -> str:
        """How the values of sparse ``column`` become rows (see the module docstring)."""
        if column in self.vocabularies:
            return "vocab"
        return self.encodings.get(column, self.categorical_encoding)

    @property
    def sparse_columns(self) -> List[str]:
        """Categorical then multi-valued column names, in feature order."""
        return [*self.categorical, *self.multi_valued]

    @property
    def sparse_feature_names(self) -> List[str]:
        """Names of the ``KeyedJaggedTensor`` keys, in feature order."""
        return list(self.feature_names) if self.feature_names is not None else self.sparse_columns

    def check_columns(self, available: Sequence[str], source: str) -> None:
        """Raise ``ValueError`` naming every column of the schema missing from ``available``."""
        have = set(available)
        missing = [c for c in [self.label, *self.dense, *self.sparse_columns] if c not in have]
        if missing:
            raise ValueError(
                f"{source}: the schema names columns that are not there: {missing} "
                f"(available: {list(available)})"
            )

    def to_dict(self) -> dict:
        """A JSON-serialisable form (for configs and run metadata)."""
        return dataclasses.asdict(self)


CRITEO_DENSE = [f"int_{i}" for i in range(13)]
CRITEO_CATEGORICAL = [f"cat_{i}" for i in range(26)]

#: Criteo Kaggle ``train.txt`` / Criteo 1TB ``day_N``: tab-separated, no header, label,
#: 13 integer columns, 26 hexadecimal categorical columns.  Column names follow TorchRec's
#: ``torchrec.datasets.criteo`` (``int_0..int_12``, ``cat_0..cat_25``).
CRITEO_SCHEMA = ClickLogSchema(
    label="label",
    dense=CRITEO_DENSE,
    categorical=CRITEO_CATEGORICAL,
    delimiter="\t",
    has_header=False,
    column_names=["label", *CRITEO_DENSE, *CRITEO_CATEGORICAL],
    categorical_encoding="hex",
    dense_transform="log1p",
)

AVAZU_CATEGORICAL = [
    "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]

#: Avazu CTR CSV (``id,click,hour,C1,...,C21``, with or without the header line): 22
#: categorical fields, no dense ones (``id`` is a row identifier and is ignored).
AVAZU_SCHEMA = ClickLogSchema(
    label="click",
    dense=[],
    categorical=AVAZU_CATEGORICAL,
    delimiter=",",
    has_header="auto",
    column_names=["id", "click", *AVAZU_CATEGORICAL],
    categorical_encoding="hash",
)
