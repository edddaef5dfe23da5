"""Streaming reader for delimited click logs (Criteo, Avazu, or any :class:`ClickLogSchema`).

Files are read line by line (plain or ``.gz``): memory is bounded by one global batch, never
by the file.  See :mod:`shark_torchrec.data.batching` for how global batches are split
between ranks and data-loader workers, and :mod:`shark_torchrec.data.schema` for how values
become embedding rows.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch

from shark_torchrec.data.batching import (
    check_id_dtype,
    check_rank,
    local_slice,
    make_batch,
    per_feature_sizes,
    worker_shard,
)
from shark_torchrec.data.schema import AVAZU_SCHEMA, CRITEO_SCHEMA, ClickLogSchema
from shark_torchrec.errors import SharkInputError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class MalformedLineError(SharkInputError, ValueError):
    """A line of a click log that does not fit its schema; the message names file and line."""


@dataclass
class MalformedLineStats:
    """Lines skipped because they were malformed (only with ``skip_malformed=True``)."""

    count: int = 0
    examples: List[str] = field(default_factory=list)  # the first few, "file:line: reason"

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


#: What reading a damaged file raises: a truncated ``.gz`` (``EOFError``), a file that is not
#: gzip at all (``gzip.BadGzipFile``, an ``OSError``), corrupt deflate data (``zlib.error``),
#: bytes that are not UTF-8 (``UnicodeDecodeError``).  None of them names the file.
_READ_ERRORS = (EOFError, OSError, zlib.error, UnicodeDecodeError)


def _unreadable(path: str, after_line: int, error: BaseException) -> MalformedLineError:
    what = {
        EOFError: "the compressed file is truncated",
        UnicodeDecodeError: "the bytes are not UTF-8 text",
    }.get(type(error), "the file cannot be read")
    last = f"after line {after_line} (the last line read)" if after_line else "before its first line"
    return MalformedLineError(f"{path}: {what}: reading stopped {last}: {type(error).__name__}: {error}")


def open_text(path: PathLike) -> io.TextIOBase:
    """Open a UTF-8 text file, transparently decompressing ``.gz``; a byte-order mark at its
    start (spreadsheet exports write one) is not part of the first column's name."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, "r", encoding="utf-8-sig", newline="")


def _hash_value(value: str) -> int:
    # BLAKE2b rather than hash(): stable across processes (PYTHONHASHSEED) and machines.
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")


class _FileLayout:
    """Column positions of one file (files with a header may order columns differently)."""

    def __init__(
        self, schema: ClickLogSchema, columns: Sequence[str], source: str, has_header: bool
    ) -> None:
        try:
            schema.check_columns(columns, f"{source}:1 (the header line)" if has_header else source)
        except ValueError as e:  # the file's header does not fit the schema: bad input
            raise MalformedLineError(str(e)) from None
        self.has_header = has_header
        pos = {c: i for i, c in enumerate(columns)}
        used = [schema.label, *schema.dense, *schema.categorical, *schema.multi_valued]
        twice = sorted({c for c in used if list(columns).count(c) > 1})
        if twice:  # (the last of them would be read, silently)
            raise MalformedLineError(f"{source}:1 (the header line): column {twice[0]!r} appears more than once")
        self.num_columns = len(columns)
        self.label = pos[schema.label]
        self.dense = [pos[c] for c in schema.dense]
        self.categorical = [pos[c] for c in schema.categorical]
        self.multi = [(pos[c], sep) for c, sep in schema.multi_valued.items()]


class ClickLogDataset(IterableDataset):
    """Stream a delimited click log as TorchRec ``Batch`` objects.

    Args:
        paths: one file or several, read in order as one stream (plain or ``.gz``).
        schema: the file layout (:data:`CRITEO_SCHEMA`, :data:`AVAZU_SCHEMA`, or your own).
        num_embeddings: rows per sparse feature: one int for all, a list in feature order,
            or a dict by feature name.  Categorical values are mapped into ``[0, n)``.
        batch_size: examples per batch *per rank*; a global batch is
            ``batch_size * world_size`` consecutive lines.
        rank, world_size: this process's slice of every global batch.
        drop_last: drop a final global batch with fewer than ``batch_size * world_size``
            lines.  Without it, the final batch is split as evenly as possible between ranks;
            final lines fewer than the ranks are read with the batch before them (every line
            is read once: a data set of fewer lines than ranks alone is not read, with a warning).
        skip_malformed: skip (and count) malformed lines instead of raising
            :class:`MalformedLineError`.  Skipped lines leave their batch smaller.
        start_batch: skip the first global batches without parsing them (resuming).
        max_batches: stop after this many global batches (counted from 0, not from
            ``start_batch``).
        id_dtype: ``torch.int64`` or ``torch.int32`` for the ``KeyedJaggedTensor``.
        line_filter: keep only the data lines for which ``line_filter(path, line_number)`` is
            true (e.g. one part of a seeded split, :class:`~shark_torchrec.data.splits.LineSplit`);
            global batches are made of the kept lines.

    A file that cannot be read to its end (a truncated ``.gz``, bytes that are not UTF-8)
    raises :class:`MalformedLineError` naming the file and the last line read; with
    ``skip_malformed`` the rest of that file is skipped and counted as one malformed entry.

    After iterating in the main process (``num_workers=0``), :attr:`malformed` holds the
    count and first examples of skipped lines; in workers, each worker logs its own count.
    """

    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        schema: ClickLogSchema,
        num_embeddings: "int | Sequence[int] | Dict[str, int]",
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        skip_malformed: bool = False,
        start_batch: int = 0,
        max_batches: Optional[int] = None,
        id_dtype: torch.dtype = torch.int64,
        line_filter: Optional[Callable[[str, int], bool]] = None,
    ) -> None:
        super().__init__()
        self.paths = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [
            os.fspath(p) for p in paths
        ]
        if not self.paths:
            raise ValueError("ClickLogDataset: no input files given")
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"ClickLogDataset: no such file: {p}")
        if batch_size < 1:
            raise ValueError(f"ClickLogDataset: batch_size must be >= 1, got {batch_size}")
        check_rank(rank, world_size)
        self.schema = schema
        self.keys = schema.sparse_feature_names
        self.num_embeddings = per_feature_sizes(num_embeddings, self.keys, "ClickLogDataset")
        check_id_dtype(id_dtype, self.num_embeddings, self.keys, "ClickLogDataset")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.skip_malformed = skip_malformed
        self.start_batch = start_batch
        self.max_batches = max_batches
        self.id_dtype = id_dtype
        self.line_filter = line_filter
        self._kinds = [schema.encoding_of(c) for c in schema.sparse_columns]
        self._vocab: List[Optional[Dict[str, int]]] = [
            {v: i for i, v in enumerate(schema.vocabularies[c])} if c in schema.vocabularies else None
            for c in schema.sparse_columns
        ]
        for name, vocab, n in zip(self.keys, self._vocab, self.num_embeddings):
            if vocab is not None and n < len(vocab) + 1:
                raise ValueError(
                    f"ClickLogDataset: feature {name!r} has a vocabulary of {len(vocab)} values, "
                    f"so it needs num_embeddings >= {len(vocab) + 1} (one row for other values), got {n}"
                )
        self.malformed = MalformedLineStats()
        self._layouts: Dict[str, _FileLayout] = {}
        for p in self.paths:  # fail fast on a schema/header mismatch, before any worker starts
            self._layout(p)

    # ------------------------------------------------------------------ file layout
    def _layout(self, path: str) -> _FileLayout:
        if path not in self._layouts:
            has_header = self.schema.has_header
            columns = list(self.schema.column_names or [])
            if has_header:
                try:
                    with open_text(path) as f:
                        first = f.readline().rstrip("\r\n").split(self.schema.delimiter)
                except _READ_ERRORS as e:
                    raise _unreadable(path, 0, e) from e
                if has_header == "auto":
                    has_header = self.schema.label in first
                elif first == [""]:
                    raise MalformedLineError(f"{path}:1: empty file, expected a header line")
                if has_header:
                    columns = first
            self._layouts[path] = _FileLayout(self.schema, columns, path, bool(has_header))
        return self._layouts[path]

    def _lines(
        self, stats: Optional[MalformedLineStats] = None
    ) -> Iterator[Tuple[str, int, str, _FileLayout]]:
        """Every kept data line as ``(path, line_number, text, layout)``.

        A file that breaks off (see :data:`_READ_ERRORS`) raises :class:`MalformedLineError`,
        or, with ``skip_malformed``, is counted in ``stats`` and left for the next file.
        """
        keep = self.line_filter
        for path in self.paths:
            layout = self._layout(path)
            lineno = 0
            try:
                with open_text(path) as f:
                    if layout.has_header:
                        f.readline()
                        lineno = 1
                    for line in f:
                        lineno += 1
                        line = line.rstrip("\r\n")
                        if line and (keep is None or keep(path, lineno)):
                            yield path, lineno, line, layout
            except _READ_ERRORS as e:
                # Only complete lines were yielded: a line the damage cut short is never handed
                # out (the text layer raises before it has a line end).
                error = _unreadable(path, lineno, e)
                if not self.skip_malformed:
                    raise error from e
                logger.warning("%s; skipping the rest of the file", error)
                if stats is not None:
                    stats.add(str(error))

    def count_rows(self, limit: Optional[int] = None) -> int:
        """Data lines of all files (after ``line_filter``), counted without parsing them;
        with ``limit``, counting stops there (a cheap "are there at least ``limit``?")."""
        n = 0
        for _ in self._lines(MalformedLineStats()):
            n += 1
            if limit is not None and n >= limit:
                break
        return n

    # ------------------------------------------------------------------ parsing
    def _encode(self, value: str, feature: int, path: str, lineno: int) -> int:
        kind = self._kinds[feature]
        if kind == "hash":
            raw = _hash_value(value)
        elif kind == "vocab":
            vocab = self._vocab[feature]
            return vocab.get(value, len(vocab))  # one row for every value outside the vocabulary
        elif kind == "hex":
            try:
                raw = int(value, 16)
            except ValueError:
                raise MalformedLineError(
                    f"{path}:{lineno}: column {self.schema.sparse_columns[feature]!r} is not "
                    f"hexadecimal: {value!r}"
                ) from None
        else:  # "int"; int() alone would also take " 7", "+7" and "1_000"
            digits = value[1:] if value[:1] == "-" else value
            if not (digits.isascii() and digits.isdigit()):
                raise MalformedLineError(
                    f"{path}:{lineno}: column {self.schema.sparse_columns[feature]!r} is not "
                    f"a decimal integer: {value!r}"
                )
            if value[:1] == "-" and digits.strip("0"):
                # (-1 modulo n is n - 1: it would share the row of the real id n - 1)
                raise MalformedLineError(
                    f"{path}:{lineno}: column {self.schema.sparse_columns[feature]!r} holds a negative "
                    f"id {value!r}: the int encoding gives ids below num_embeddings rows of their own; "
                    f"use the hash encoding for a column with signed values"
                )
            raw = int(value)
        return raw % self.num_embeddings[feature]

    def _parse(self, path: str, lineno: int, line: str, layout: _FileLayout):
        schema = self.schema
        cols = line.split(schema.delimiter)
        if len(cols) != layout.num_columns:
            raise MalformedLineError(
                f"{path}:{lineno}: expected {layout.num_columns} columns "
                f"(delimiter {schema.delimiter!r}), got {len(cols)}"
            )
        label_text = cols[layout.label]
        if label_text not in ("0", "1"):
            raise MalformedLineError(
                f"{path}:{lineno}: label column {schema.label!r} must be 0 or 1, got {label_text!r}"
            )
        dense = []
        for name, i in zip(schema.dense, layout.dense):
            text = cols[i]
            if not text:
                dense.append(0.0)
                continue
            try:
                x = float(text)
            except ValueError:
                raise MalformedLineError(
                    f"{path}:{lineno}: dense column {name!r} is not numeric: {text!r}"
                ) from None
            if not math.isfinite(x):
                raise MalformedLineError(
                    f"{path}:{lineno}: dense column {name!r} is not finite: {text!r}"
                )
            dense.append(math.log1p(max(x, 0.0)) if schema.dense_transform == "log1p" else x)
        ids: List[List[int]] = []
        for f, i in enumerate(layout.categorical):
            text = cols[i]
            if not text and schema.missing_as_empty:
                ids.append([])
            else:
                ids.append([self._encode(text or "0", f, path, lineno)])
        offset = len(layout.categorical)
        for k, (i, sep) in enumerate(layout.multi):
            text = cols[i]
            # An empty multi-valued cell is an empty bag; empty items inside are skipped.
            ids.append([self._encode(v, offset + k, path, lineno) for v in text.split(sep) if v])
        return int(label_text), dense, ids

    def _to_batch(self, rows: List[tuple]) -> Batch:
        num_features = len(self.keys)
        labels = np.fromiter((r[0] for r in rows), dtype=np.float32, count=len(rows))
        dense = np.asarray([r[1] for r in rows], dtype=np.float32).reshape(
            len(rows), len(self.schema.dense)
        )
        lengths, values = [], []
        for f in range(num_features):
            bags = [r[2][f] for r in rows]
            lengths.append(np.fromiter((len(b) for b in bags), dtype=np.int64, count=len(bags)))
            values.append(np.fromiter(itertools.chain.from_iterable(bags), dtype=np.int64))
        return make_batch(dense, labels, self.keys, lengths, values, self.id_dtype)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = worker_shard()
        global_size = self.batch_size * self.world_size
        stats = MalformedLineStats()
        lines = self._lines(stats)
        g = 0
        chunk = list(itertools.islice(lines, global_size))
        while chunk and (self.max_batches is None or g < self.max_batches):
            following = list(itertools.islice(lines, global_size)) if len(chunk) == global_size else []
            if (not self.drop_last and 0 < len(following) < self.world_size
                    and (self.max_batches is None or g + 1 < self.max_batches)):
                # The last lines are fewer than the ranks: they ride with this batch (each rank
                # then gets at most one line more) rather than being dropped.
                chunk, following = chunk + following, []
            n = len(chunk)
            # Counted from start_batch: the DataLoader asks worker 0 first.
            mine = g >= self.start_batch and (g - self.start_batch) % num_workers == worker
            g += 1
            if n < global_size:
                if self.drop_last:
                    break
                if n < self.world_size:  # (only where every line read is fewer than the ranks)
                    logger.warning(
                        "not read: the only %d lines, fewer than the %d ranks", n, self.world_size
                    )
                    break
            if not mine:
                chunk = following
                continue
            start, end = local_slice(n, self.rank, self.world_size)
            rows = []
            for path, lineno, line, layout in chunk[start:end]:
                try:
                    rows.append(self._parse(path, lineno, line, layout))
                except MalformedLineError as e:
                    if not self.skip_malformed:
                        raise
                    stats.add(str(e))
            chunk = following
            if rows:
                yield self._to_batch(rows)
        if stats.count:
            logger.warning(
                "skipped %d malformed lines (rank %d, worker %d); first: %s",
                stats.count, self.rank, worker, "; ".join(stats.examples),
            )
        if worker_shard()[1] == 1:
            self.malformed = stats


def criteo_dataset(
    paths: Union[PathLike, Sequence[PathLike]],
    num_embeddings: "int | Sequence[int] | Dict[str, int]",
    batch_size: int,
    **kwargs,
) -> ClickLogDataset:
    """A :class:`ClickLogDataset` over Criteo Kaggle / Criteo 1TB files (plain or ``.gz``)."""
    return ClickLogDataset(paths, CRITEO_SCHEMA, num_embeddings, batch_size, **kwargs)


def avazu_dataset(
    paths: Union[PathLike, Sequence[PathLike]],
    num_embeddings: "int | Sequence[int] | Dict[str, int]",
    batch_size: int,
    **kwargs,
) -> ClickLogDataset:
    """A :class:`ClickLogDataset` over Avazu CSV files (with their header)."""
    return ClickLogDataset(paths, AVAZU_SCHEMA, num_embeddings, batch_size, **kwargs)
