"""Choosing train/test data for a recipe from ``--data`` and its options."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence

import torch
from torchrec.datasets.utils import Batch

from shark_torchrec.data import (
    AVAZU_SCHEMA,
    CRITEO_SCHEMA,
    ClickLogDataset,
    ClickLogSchema,
    SyntheticClickDataset,
    SyntheticConfig,
    make_dataloader,
)

DATASETS = ("synthetic", "criteo", "avazu")
SCHEMAS = {"criteo": CRITEO_SCHEMA, "avazu": AVAZU_SCHEMA}
_SPLIT_PATTERNS = {
    "train": ["train.*", "train", "day_[0-9]*"],
    "test": ["test.*", "test"],
    "dev": ["dev.*", "dev", "valid*", "val.*"],
}

#: Held-out synthetic batches are drawn from far-away batch index ranges.
SYNTHETIC_OFFSETS = {"train": 0, "test": 10_000_000, "dev": 20_000_000}


def find_split_files(data_path: str, split: str) -> List[str]:
    """Files of a split in ``data_path``: ``train.*``/``test.*`` (``.tsv``, ``.txt``,
    ``.csv``, optionally ``.gz``).  Criteo 1TB ``day_N`` files count as train files."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data_path {data_path}: not a directory")
    for pattern in _SPLIT_PATTERNS[split]:
        files = sorted(
            p for p in glob.glob(os.path.join(data_path, pattern)) if os.path.isfile(p)
        )
        if files:
            return files
    raise FileNotFoundError(
        f"--data_path {data_path}: no {split} files (looked for {_SPLIT_PATTERNS[split]}); "
        f"name them with --{split}_files"
    )


def expand_files(patterns: Sequence[str], flag: str) -> List[str]:
    files: List[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p))
        if not hits:
            raise FileNotFoundError(f"{flag}: {p!r} matches no file")
        files.extend(hits)
    return files


@dataclass
class DataSpec:
    """What a recipe trains and tests on.

    Attributes:
        kind: ``synthetic``, ``criteo`` or ``avazu``.
        feature_names: sparse feature names (one table each).
        num_embeddings_per_feature: rows per feature.
        num_dense: dense inputs the data provides (0 for Avazu).
        train_files, test_files: click-log files (empty for synthetic).
        dev_files: optional validation files (scoring references, tuning).
        synthetic: the generator's config (synthetic only).
        synthetic_train_batches, synthetic_test_batches: global batches per split.
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
    skip_malformed: bool = False
    id_dtype: torch.dtype = torch.int64

    @property
    def dense_in_features(self) -> int:
        # DLRM needs a dense input: data without one gets a constant 1.0 column.
        return max(1, self.num_dense)

    @property
    def schema(self) -> Optional[ClickLogSchema]:
        return SCHEMAS.get(self.kind)

    def dataset(
        self, split: str, batch_size: int, rank: int, world_size: int, start_batch: int = 0,
        max_batches: Optional[int] = None,
    ):
        """The ``IterableDataset`` of one split for this rank."""
        if split not in SYNTHETIC_OFFSETS:
            raise ValueError(f"unknown split {split!r}")
        if self.kind == "synthetic":
            n = self.synthetic_train_batches if split == "train" else self.synthetic_test_batches
            if max_batches is not None:
                n = min(n, max_batches)
            return SyntheticClickDataset(
                self.synthetic, batch_size, n, rank=rank, world_size=world_size,
                start_batch=start_batch,
                batch_offset=SYNTHETIC_OFFSETS[split],
                id_dtype=self.id_dtype,
            )
        files = {"train": self.train_files, "test": self.test_files, "dev": self.dev_files}[split]
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
        )

    def train_batches(self, global_batch_size: int, limit: Optional[int] = None) -> int:
        """Global batches in one pass over the train split (lines are counted, not parsed;
        a header line, where the schema always has one, is not a data line)."""
        if self.kind == "synthetic":
            n = self.synthetic_train_batches
        else:
            from shark_torchrec.data.click_log import open_text

            lines = 0
            for path in self.train_files:
                with open_text(path) as f:
                    lines += sum(1 for line in f if line.strip())
            if self.schema.has_header is True:
                lines -= len(self.train_files)
            n = lines // global_batch_size
        return min(n, limit) if limit else n

    def batches(self, dataset, num_workers: int = 0) -> Iterable[Batch]:
        """Iterate ``dataset`` through a ``DataLoader`` (adding the constant dense column
        where the data has none)."""
        loader = make_dataloader(dataset, num_workers=num_workers)
        return loader if self.num_dense > 0 else _ConstantDense(loader)


class _ConstantDense:
    def __init__(self, loader: Iterable[Batch]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        for b in self.loader:
            ones = torch.ones(b.labels.shape[0], 1)
            yield Batch(dense_features=ones, sparse_features=b.sparse_features, labels=b.labels)
