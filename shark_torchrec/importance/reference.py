"""Reference scorers to measure SHARK against: exact permutation importance, and random.

Exact permutation importance of field ``f`` is the increase of the loss when ``f``'s bags are
shuffled across the samples of a batch, averaged over an evaluation set.  It costs ``F + 1``
forward passes per batch (and ``repeats`` shuffles), against SHARK's zero extra passes.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.importance.base import FieldImportance


def shuffle_feature(kjt: KeyedJaggedTensor, feature: str, perm: torch.Tensor) -> KeyedJaggedTensor:
    """A copy of ``kjt`` whose bags of ``feature`` are reordered: sample ``n`` gets the bag
    (and per-id weights) of sample ``perm[n]``; every other feature is unchanged."""
    keys = kjt.keys()
    if feature not in keys:
        raise KeyError(f"feature {feature!r} is not in the batch (features: {keys})")
    B = kjt.stride()
    lengths = kjt.lengths()
    values = kjt.values()
    weights = kjt.weights_or_none()
    f = keys.index(feature)
    per_key = kjt.length_per_key()
    start = sum(per_key[:f])
    lens = lengths[f * B : (f + 1) * B]
    offs = torch.cumsum(lens, 0) - lens  # exclusive, within the feature
    new_lens = lens[perm]
    new_starts = torch.cumsum(new_lens, 0) - new_lens
    total = int(new_lens.sum())
    idx = (
        torch.arange(total, device=values.device)
        - torch.repeat_interleave(new_starts, new_lens)
        + torch.repeat_interleave(offs[perm], new_lens)
    ) + start
    seg = slice(start, start + per_key[f])
    new_values = values.clone()
    new_values[seg] = values[idx]
    new_lengths = lengths.clone()
    new_lengths[f * B : (f + 1) * B] = new_lens
    new_weights = None
    if weights is not None:
        new_weights = weights.clone()
        new_weights[seg] = weights[idx]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=new_values, lengths=new_lengths, weights=new_weights
    )


def dlrm_per_sample_loss(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    """Per-sample BCE loss of a ``DLRMTrain`` (plain or DMP-wrapped) on a batch."""

    def fn(batch: Batch) -> torch.Tensor:
        _, (_, logits, labels) = model(batch)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")

    return fn


class PermutationImportance(FieldImportance):
    """Exact permutation importance over an evaluation set.

    Args:
        loss_fn: per-sample losses of a batch (e.g. :func:`dlrm_per_sample_loss`).  Called in
            ``torch.no_grad()``; put the model in eval mode first.
        features: the fields to score.
        repeats: shuffles per field and batch.
        seed: seeds the shuffles.

    Under ``torch.distributed`` every rank shuffles within its local batch and
    :meth:`scores` averages over all ranks' samples.
    """

    name = "permutation"

    def __init__(
        self,
        loss_fn: Callable[[Batch], torch.Tensor],
        features: Sequence[str],
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        self.loss_fn = loss_fn
        self.features = list(features)
        self.repeats = repeats
        self.seed = seed
        self._sum = torch.zeros(len(self.features), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)
        self._batches = 0

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> "PermutationImportance":
        """Add the loss increases over ``batches`` to the scores."""
        for batch in batches:
            base = self.loss_fn(batch).double()
            B = base.numel()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._batches)
            for i, f in enumerate(self.features):
                for _ in range(self.repeats):
                    perm = torch.randperm(B, generator=gen).to(batch.labels.device)
                    shuffled = Batch(
                        dense_features=batch.dense_features,
                        sparse_features=shuffle_feature(batch.sparse_features, f, perm),
                        labels=batch.labels,
                    )
                    self._sum[i] += (self.loss_fn(shuffled).double() - base).sum().cpu() / self.repeats
            self._count += B
            self._batches += 1
        return self

    def scores(self) -> Dict[str, float]:
        packed = torch.cat([self._sum, self._count.reshape(1)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        if packed[-1] == 0:
            raise RuntimeError("PermutationImportance: evaluate() has seen no samples")
        return {f: float(packed[i] / packed[-1]) for i, f in enumerate(self.features)}


class RandomImportance(FieldImportance):
    """Uniformly random scores: the floor any real importance must beat."""

    name = "random"

    def __init__(self, features: Sequence[str], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        values = torch.rand(len(features), generator=gen, dtype=torch.float64)
        self._scores = {f: float(v) for f, v in zip(features, values)}

    def scores(self) -> Dict[str, float]:
        return dict(self._scores)
