"""Choosing train/test data for a recipe from ``--data`` and its options.

``--data`` is one of :data:`DATASETS`: ``synthetic`` (generated), ``criteo`` and ``avazu``
(their preset layouts), ``csv`` (your own click logs, laid out by ``--schema FILE``, see
:mod:`shark_torchrec.data.schema_file`) and ``ml100k`` (MovieLens-100K converted by
:mod:`shark_torchrec.data.movielens`).  A :class:`DataSpec` says what a recipe trains and
tests on; :func:`require_rows` stops a recipe whose splits are empty before it trains or
evaluates.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.data import (
    AVAZU_SCHEMA,
    CRITEO_SCHEMA,
    ClickLogDataset,
    ClickLogSchema,
    SyntheticClickDataset,
    SyntheticConfig,
    make_dataloader,
)
from shark_torchrec.data.splits import LineSplit
from shark_torchrec.errors import InputFileNotFoundError, SharkInputError

DATASETS = ("synthetic", "synthetic_criteo", "criteo", "avazu", "csv", "ml100k")
SCHEMAS = {"criteo": CRITEO_SCHEMA, "avazu": AVAZU_SCHEMA}
_SPLIT_PATTERNS = {
    "train": ["train.*", "train", "day_[0-9]*"],
    "test": ["test.*", "test"],
    "dev": ["dev.*", "dev", "valid*", "val.*"],
}

#: Held-out synthetic batches are drawn from far-away batch index ranges.
SYNTHETIC_OFFSETS = {"train": 0, "test": 10_000_000, "dev": 20_000_000}


#: What a split file's name may end in (after its pattern's stem), ``.gz`` aside.
_SPLIT_EXTENSIONS = ("", ".tsv", ".txt", ".csv")


def _is_split_file(path: str) -> bool:
    """Whether ``path`` is a click-log file by its name (``.tsv``, ``.txt``, ``.csv`` or no
    extension, optionally ``.gz``): not a backup (``train.tsv.bak``, ``train.tsv~``) or other
    file a split's pattern also matches."""
    name = os.path.basename(path)
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.isfile(path) and os.path.splitext(name)[1] in _SPLIT_EXTENSIONS


def _by_number(path: str):
    """Sort key reading runs of digits as numbers: ``day_2`` before ``day_10`` (days in order)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path)]


def find_split_files(data_path: str, split: str) -> List[str]:
    """Files of a split in ``data_path``: ``train.*``/``test.*`` (``.tsv``, ``.txt``,
    ``.csv``, optionally ``.gz``).  Criteo 1TB ``day_N`` files count as train files (in the
    order of their days).  A file
    next to its ``.gz`` twin (``train.tsv`` and ``train.tsv.gz``) is an error: read both, every
    row would count twice."""
    if not os.path.isdir(data_path):
        raise InputFileNotFoundError(f"--data_path {data_path}: not a directory")
    for pattern in _SPLIT_PATTERNS[split]:
        files = sorted((p for p in glob.glob(os.path.join(data_path, pattern)) if _is_split_file(p)),
                       key=_by_number)
        twins = [p for p in files if p + ".gz" in files]
        if twins:
            raise SharkInputError(f"--data_path {data_path}: {os.path.basename(twins[0])} and "
                                  f"{os.path.basename(twins[0])}.gz are both {split} files (the same rows "
                                  f"twice?): remove one, or name the {split} files with --{split}_files")
        if files:
            return files
    raise InputFileNotFoundError(
        f"--data_path {data_path}: no {split} files (looked for {_SPLIT_PATTERNS[split]}); "
        f"name them with --{split}_files"
    )


def expand_files(patterns: Sequence[str], flag: str) -> List[str]:
    files: List[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p))
        if not hits:
            raise InputFileNotFoundError(f"{flag}: {p!r} matches no file")
        files.extend(hits)
    return files


@dataclass
class DataSpec:
    """What a recipe trains and tests on.

    Attributes:
        kind: one of :data:`DATASETS`.
        feature_names: sparse feature names (one table each).
        num_embeddings_per_feature: rows per feature.
        num_dense: dense inputs the data provides (0 for Avazu).
        train_files, test_files: click-log files (empty for synthetic).
        dev_files: optional validation files (scoring references, tuning).
        synthetic: the generator's config (synthetic only).
        synthetic_train_batches, synthetic_test_batches: global batches per split.
        synthetic_train_rows, synthetic_test_rows: rows per split instead (0: use the batch
            counts); the batches are as many as the global batch size needs to cover them.
        click_schema: the files' layout where ``kind`` has no preset in :data:`SCHEMAS`
            (``csv``, ``ml100k``).
        line_split: a seeded split of ``train_files`` into train/dev/test
            (``--valid_fraction``/``--test_fraction``); a split with a fraction of 0 keeps its
            own files.
        hashed_rows: the model's rows per feature when its tables are smaller than the data's
            ids (the hashing trick, ``--hash_rows_fraction``): :meth:`batches` takes each id
            modulo its table's rows.  ``None``: one row per id (:attr:`model_rows` is
            ``num_embeddings_per_feature``).
    """

    kind: str
    feature_names: List[str]
    num_embeddings_per_feature: List[int]
    num_dense: int
    train_files: List[str]
    test_files: List[str]
    synthetic: Optional[SyntheticConfig] = None
    dev_files: List[str] = field(default_factory=list)
    synthetic_train_batches: int = 0
    synthetic_test_batches: int = 0
    synthetic_train_rows: int = 0
    synthetic_test_rows: int = 0
    skip_malformed: bool = False
    id_dtype: torch.dtype = torch.int64
    click_schema: Optional[ClickLogSchema] = None
    line_split: Optional[LineSplit] = None
    hashed_rows: Optional[List[int]] = None

    @property
    def model_rows(self) -> List[int]:
        """Rows per feature of the model's tables (fewer than the data's ids when hashed)."""
        return list(self.hashed_rows or self.num_embeddings_per_feature)

    def hashed(self, fraction: float) -> "DataSpec":
        """This data for tables of ``fraction`` of the rows (at least 1 each), ids hashed
        into them by their remainder (the hashing trick: colliding ids share a row)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"hash fraction must be in (0, 1], got {fraction}")
        rows = [max(1, math.ceil(fraction * n)) for n in self.num_embeddings_per_feature]
        return dataclasses.replace(self, hashed_rows=rows)

    @property
    def dense_in_features(self) -> int:
        # DLRM needs a dense input: data without one gets a constant 1.0 column.
        return max(1, self.num_dense)

    @property
    def schema(self) -> Optional[ClickLogSchema]:
        return self.click_schema or SCHEMAS.get(self.kind)

    def files(self, split: str) -> List[str]:
        """The click-log files that ``split`` reads (a part of them under ``line_split``)."""
        if self._from_line_split(split):
            return self.train_files
        return {"train": self.train_files, "test": self.test_files, "dev": self.dev_files}[split]

    def _from_line_split(self, split: str) -> bool:
        s = self.line_split
        return s is not None and (split == "train" or
                                  (s.test_fraction if split == "test" else s.valid_fraction) > 0)

    def describe(self, split: str) -> str:
        """``split``'s files for messages (and which part of them, under ``line_split``)."""
        files = self.files(split)
        names = ", ".join(files) if len(files) <= 4 else f"{', '.join(files[:3])} and {len(files) - 3} more"
        if self._from_line_split(split):
            names += f" ({self.line_split.selector(split).describe()})"
        return names

    def dataset(
        self, split: str, batch_size: int, rank: int, world_size: int, start_batch: int = 0,
        max_batches: Optional[int] = None,
    ):
        """The ``IterableDataset`` of one split for this rank."""
        if split not in SYNTHETIC_OFFSETS:
            raise ValueError(f"unknown split {split!r}")
        if self.kind == "synthetic":
            n = self._synthetic_batches(split, batch_size * world_size)
            if max_batches is not None:
                n = min(n, max_batches)
            return SyntheticClickDataset(
                self.synthetic, batch_size, n, rank=rank, world_size=world_size,
                start_batch=start_batch,
                batch_offset=SYNTHETIC_OFFSETS[split],
                id_dtype=self.id_dtype,
            )
        files = self.files(split)
        if not files:
            raise ValueError(f"no {split} files for --data {self.kind}")
        return ClickLogDataset(
            files, self.schema, self.num_embeddings_per_feature, batch_size,
            rank=rank, world_size=world_size,
            # Training drops a final partial batch (whatever the world size, so that 1- and
            # N-process runs take the same steps); evaluation keeps every example.
            drop_last=split == "train",
            skip_malformed=self.skip_malformed, start_batch=start_batch,
            max_batches=max_batches, id_dtype=self.id_dtype,
            line_filter=self.line_split.selector(split) if self._from_line_split(split) else None,
        )

    def train_batches(self, global_batch_size: int, limit: Optional[int] = None) -> int:
        """Global batches in one pass over the train split (lines are counted, not parsed;
        header lines are not data lines)."""
        if self.kind == "synthetic":
            n = self._synthetic_batches("train", global_batch_size)
        else:
            n = self.dataset("train", 1, 0, 1).count_rows() // global_batch_size
        return min(n, limit) if limit is not None else n

    def _synthetic_batches(self, split: str, global_batch_size: int) -> int:
        rows = self.synthetic_train_rows if split == "train" else self.synthetic_test_rows
        if rows:
            return -(-rows // global_batch_size)  # enough batches to cover the rows
        return self.synthetic_train_batches if split == "train" else self.synthetic_test_batches

    def batches(self, dataset, num_workers: int = 0) -> Iterable[Batch]:
        """Iterate ``dataset`` through a ``DataLoader`` (adding the constant dense column
        where the data has none; hashing ids into :attr:`hashed_rows` when set)."""
        loader = make_dataloader(dataset, num_workers=num_workers)
        if self.hashed_rows is not None:
            loader = _HashedIds(loader, dict(zip(self.feature_names, self.hashed_rows)))
        return loader if self.num_dense > 0 else _ConstantDense(loader)


class _HashedIds:
    """Each feature's ids modulo its table's rows (ids stay non-negative)."""

    def __init__(self, loader: Iterable[Batch], rows: Dict[str, int]) -> None:
        self.loader = loader
        self.rows = rows

    def __iter__(self) -> Iterator[Batch]:
        for b in self.loader:
            kjt = b.sparse_features
            per_id = torch.repeat_interleave(
                torch.tensor([self.rows[k] for k in kjt.keys()], dtype=kjt.values().dtype),
                torch.tensor(kjt.length_per_key()), output_size=kjt.values().numel())
            hashed = KeyedJaggedTensor(keys=kjt.keys(), values=torch.remainder(kjt.values(), per_id),
                                       lengths=kjt.lengths(), weights=kjt.weights_or_none(),
                                       stride=kjt.stride())
            yield Batch(dense_features=b.dense_features, sparse_features=hashed, labels=b.labels)


class _ConstantDense:
    def __init__(self, loader: Iterable[Batch]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        for b in self.loader:
            ones = torch.ones(b.labels.shape[0], 1)
            yield Batch(dense_features=ones, sparse_features=b.sparse_features, labels=b.labels)


class NoRowsError(SharkInputError, ValueError):
    """A split with nothing to train or evaluate on; the message names its files."""


def require_rows(spec: DataSpec, batch_size: int, world_size: int, limit_train_batches: Optional[int] = None,
                 limit_test_batches: Optional[int] = None, train: bool = True, test: bool = True) -> None:
    """Raise :class:`NoRowsError` unless the train split gives at least one training step and
    the test split at least one example per process.

    Recipes call it before training and evaluating, so that an empty file, or a
    ``--limit_*_batches`` or split that leaves nothing, is an error naming the files, not a
    run of 0 steps that "succeeds" with an untrained model.  Reads at most one global batch
    of lines per split.

    Args:
        spec: the data.
        batch_size: per-rank training batch size (``--batch_size``).
        world_size: processes in the job.
        limit_train_batches, limit_test_batches: ``--limit_train_batches``,
            ``--limit_test_batches``.
        train, test: which splits to check.
    """
    if train:
        global_batch = batch_size * world_size
        per = f"--batch_size {batch_size} × {world_size} process(es)"
        if limit_train_batches is not None and limit_train_batches < 1:
            raise NoRowsError(f"no training rows were read: --limit_train_batches "
                              f"{limit_train_batches} leaves none")
        if spec.kind == "synthetic":
            if spec.synthetic_train_batches < 1:
                raise NoRowsError(f"no training rows: --synthetic_train_batches {spec.synthetic_train_batches}")
        else:
            n = spec.dataset("train", 1, 0, 1).count_rows(limit=global_batch)
            if n == 0:
                raise NoRowsError(f"no training rows were read from {spec.describe('train')}: "
                                  f"no data lines")
            if n < global_batch:
                raise NoRowsError(
                    f"no training rows were read from {spec.describe('train')}: {n} data line(s), "
                    f"fewer than one global batch of {global_batch} ({per}); training takes whole "
                    f"batches only, so it would take 0 steps")
    if test:
        if limit_test_batches is not None and limit_test_batches < 1:
            raise NoRowsError(f"no test rows to evaluate on: --limit_test_batches "
                              f"{limit_test_batches} leaves none")
        if spec.kind == "synthetic":
            if spec.synthetic_test_batches < 1:
                raise NoRowsError(f"no test rows: --synthetic_test_batches {spec.synthetic_test_batches}")
        else:
            n = spec.dataset("test", 1, 0, 1).count_rows(limit=world_size)
            if n == 0:
                raise NoRowsError(f"no test rows to evaluate on in {spec.describe('test')}: "
                                  f"no data lines")
            if n < world_size:
                raise NoRowsError(
                    f"too few test rows in {spec.describe('test')}: {n} data line(s) for "
                    f"{world_size} processes (each needs at least one)")
