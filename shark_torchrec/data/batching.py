"""Pieces shared by every data source: building TorchRec ``Batch`` objects and splitting
global batches between ranks and data-loader workers.

Every source in this package produces the same stream for a given ``batch_size``:
global batch ``g`` holds ``batch_size * world_size`` consecutive examples, and rank ``r``
gets the ``r``-th contiguous slice of it.  So a run with one process and global batch
``G`` sees exactly the examples that a ``W``-process run with local batch ``G / W`` sees,
which is what makes single- and multi-process runs comparable step for step.  Inside a
rank, data-loader worker ``w`` of ``n`` produces the global batches with ``g % n == w``;
``torch.utils.data.DataLoader`` takes batches from its workers round-robin, so the order of
batches does not depend on the number of workers.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def worker_shard() -> Tuple[int, int]:
    """``(worker_id, num_workers)`` of the calling data-loader worker (``(0, 1)`` outside one)."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def check_id_dtype(id_dtype: torch.dtype, rows: Sequence[int], features: Sequence[str], who: str) -> None:
    """Refuse int32 ids for a feature whose ids reach past 2^31 - 1 (they would wrap to
    negative ids, silently)."""
    if id_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who}: id_dtype must be int64 or int32, got {id_dtype}")
    if id_dtype == torch.int32:
        for name, n in zip(features, rows):
            if n - 1 > torch.iinfo(torch.int32).max:
                raise ValueError(f"{who}: feature {name!r} has ids up to {n - 1}, past int32's "
                                 f"{torch.iinfo(torch.int32).max}: use int64 ids")


def local_slice(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Bounds ``[start, end)`` of rank ``rank``'s contiguous part of ``n`` examples.

    Parts differ in size by at most one (only a final partial batch is uneven).
    """
    return (rank * n) // world_size, ((rank + 1) * n) // world_size


def make_batch(
    dense: np.ndarray,
    labels: np.ndarray,
    keys: Sequence[str],
    lengths: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    id_dtype: torch.dtype = torch.int64,
) -> Batch:
    """Assemble a TorchRec ``Batch``.

    Args:
        dense: ``[B, num_dense]`` float array.
        labels: ``[B]`` array of 0/1.
        keys: sparse feature names.
        lengths: per feature, ``[B]`` ids per example.
        values: per feature, the concatenated ids of its ``B`` bags.
        id_dtype: ``torch.int64`` or ``torch.int32`` for ids, lengths and offsets.
    """
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    all_values = np.concatenate(values) if values else np.zeros(0, np.int64)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.from_numpy(np.ascontiguousarray(all_values)).to(id_dtype),
        lengths=torch.from_numpy(np.ascontiguousarray(all_lengths)).to(id_dtype),
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
    )


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def per_feature_sizes(
    num_embeddings: "int | Sequence[int] | dict", features: List[str], what: str
) -> List[int]:
    """Normalise ``num_embeddings`` (one int, a list in feature order, or a dict by name)."""
    if isinstance(num_embeddings, int):
        sizes = [num_embeddings] * len(features)
    elif isinstance(num_embeddings, dict):
        unknown = sorted(set(num_embeddings) - set(features))
        missing = [f for f in features if f not in num_embeddings]
        if unknown or missing:
            raise ValueError(
                f"{what}: num_embeddings per feature does not match the features: "
                f"unknown {unknown}, missing {missing}"
            )
        sizes = [int(num_embeddings[f]) for f in features]
    else:
        sizes = [int(n) for n in num_embeddings]
        if len(sizes) != len(features):
            raise ValueError(
                f"{what}: {len(sizes)} num_embeddings values for {len(features)} features "
                f"({features})"
            )
    bad = [(f, n) for f, n in zip(features, sizes) if n < 1]
    if bad:
        raise ValueError(f"{what}: num_embeddings must be >= 1, got {bad}")
    return sizes
