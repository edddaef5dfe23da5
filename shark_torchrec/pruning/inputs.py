"""Feeding a pruned model the batches users already have.

A pruned model serves fewer features than the data carries.  TorchRec's float
``EmbeddingBagCollection`` ignores extra features in its input; other consumers (the row-wise
mixed collection with ``strict=True``, a model exported for serving, a custom module) may not.
:func:`filter_features` and :func:`filter_batch` keep exactly the features a
:class:`~shark_torchrec.pruning.plan.PruningPlan` keeps, in the plan's order, and
:class:`PrunedFeatureFilter` does the same as a picklable module (a data-loader worker's
transform, or the first stage of a serving model).
"""

from __future__ import annotations

from typing import List, Sequence

from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.errors import SharkInputError


class MissingFeatureError(SharkInputError, KeyError):
    """A batch lacks a feature the pruned model needs."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def filter_features(kjt: KeyedJaggedTensor, keep: Sequence[str]) -> KeyedJaggedTensor:
    """``kjt`` with only the features in ``keep``, in that order (values, weights and lengths
    carried by TorchRec's ``permute``).  A kept feature missing from ``kjt`` is an error naming
    it; every other feature of ``kjt`` is dropped."""
    keys = kjt.keys()
    if list(keys) == list(keep):
        return kjt
    index = {k: i for i, k in enumerate(keys)}
    missing = [f for f in keep if f not in index]
    if missing:
        raise MissingFeatureError(
            f"the batch lacks features the pruned model needs: {missing} (batch features: {list(keys)})"
        )
    return kjt.permute([index[f] for f in keep])


def filter_batch(batch: Batch, keep: Sequence[str]) -> Batch:
    """A TorchRec ``Batch`` with its sparse features filtered by :func:`filter_features`."""
    return Batch(dense_features=batch.dense_features, labels=batch.labels,
                 sparse_features=filter_features(batch.sparse_features, keep))


class PrunedFeatureFilter(nn.Module):
    """Keeps the features a pruning plan keeps (a ``KeyedJaggedTensor`` or a ``Batch`` in, the
    same type out).  Holds only the feature names, so it pickles into data-loader workers::

        keep = PrunedFeatureFilter(plan)            # or PrunedFeatureFilter(["cat_0", ...])
        loader = DataLoader(dataset.map(keep) ...)  # or: model(keep(batch))
    """

    def __init__(self, plan_or_features) -> None:
        super().__init__()
        features = getattr(plan_or_features, "kept_features", plan_or_features)
        self.features: List[str] = list(features)
        if not self.features:
            raise ValueError("PrunedFeatureFilter: no features to keep")

    def forward(self, inputs):
        if isinstance(inputs, KeyedJaggedTensor):
            return filter_features(inputs, self.features)
        if isinstance(inputs, Batch):
            return filter_batch(inputs, self.features)
        raise TypeError(f"PrunedFeatureFilter: expected a KeyedJaggedTensor or Batch, got {type(inputs)}")
