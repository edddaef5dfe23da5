"""Lossless field pruning: a pruned field reads its mean pooled embedding instead of its table.

Removing a field from TorchRec's DLRM shrinks its interaction: every dot product (or, for
DCN, every cross term) with that field's vector disappears.  Even a field whose pooled
embedding never changes (no information at all) then moves the model's output, because the
over-arch had learned to use that constant vector's products with the other fields
(BENCHMARKS.md: dropping constant fields cost 0.001-0.005 AUC).  The ``mean`` Taylor score
measures something else: the loss change when a field's pooled embedding is replaced by its
mean over the data.  :class:`MeanFilledSparseArch` builds exactly that model:

* the pruned fields' tables are gone (the collection holds only the kept tables, so the
  bytes are saved and DMP shards only those);
* each pruned field reads one constant vector, its mean pooled embedding over the data
  (:func:`field_means`), a buffer of the model (``pruned_field_means``: ``D`` floats a field);
* the interaction and the over-arch keep their shape and their weights.

A field whose pooled embedding is constant is pruned with no change to any output; any other
field is pruned with the loss change its ``mean`` score estimated.  Only the products of the
constant with the kept fields' vectors stay in the interaction; the constant's products with
itself and with the dense vector could be folded into the over-arch's first layer, but the
products with the kept fields cannot (they vary with those fields), so the constant stays an
input of the interaction.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import Awaitable
from torchrec.models.dlrm import SparseArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class MeanFilledSparseArch(SparseArch):
    """TorchRec's ``SparseArch`` for a DLRM some of whose fields were pruned: the output is
    ``[B, F, D]`` over all ``feature_names`` (the interaction's fields, in its order), the
    kept ones from ``embedding_bag_collection`` (plain or sharded), the pruned ones (those no
    table of the collection serves) reading their row of the buffer ``pruned_field_means``.

    Args:
        embedding_bag_collection: the collection of the kept tables.
        feature_names: every field of the interaction, in order.
        means: each pruned field's constant (``D`` values); omitted ones start at zero (a
            model about to load a state dict).
        device: where the constants live: the dense layers' device (default: the
            collection's, or the CPU for a collection on the meta device).
    """

    def __init__(self, embedding_bag_collection: nn.Module, feature_names: Sequence[str],
                 means: Optional[Mapping[str, torch.Tensor]] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(embedding_bag_collection)
        kept = set(self._sparse_feature_names)
        names = list(feature_names)
        if len(set(names)) != len(names):
            raise ValueError(f"MeanFilledSparseArch: feature_names repeat a field: {names}")
        unknown = sorted(kept - set(names))
        if unknown:
            raise ValueError(f"MeanFilledSparseArch: the collection serves {unknown}, which are not "
                             f"among the interaction's fields {names}")
        self.pruned_features: List[str] = [f for f in names if f not in kept]
        means = dict(means or {})
        extra = sorted(set(means) - set(self.pruned_features))
        if extra:
            raise ValueError(f"MeanFilledSparseArch: means given for {extra}, which are not pruned fields "
                             f"(pruned: {self.pruned_features})")
        table = torch.zeros(len(self.pruned_features), self.D)
        for i, f in enumerate(self.pruned_features):
            if f in means:
                value = torch.as_tensor(means[f], dtype=torch.float32).reshape(-1)
                if value.numel() != self.D:
                    raise ValueError(f"MeanFilledSparseArch: the mean of field {f!r} has {value.numel()} "
                                     f"values, the interaction's dimension is {self.D}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"MeanFilledSparseArch: the mean of field {f!r} is not finite")
                table[i] = value
        if device is None:
            device = _device_of(embedding_bag_collection)
            device = device if device.type != "meta" else torch.device("cpu")
        self.register_buffer("pruned_field_means", table.to(device))
        self._sparse_feature_names = names
        self.F = len(names)
        pruned = {f: i for i, f in enumerate(self.pruned_features)}
        # Per interaction slot: the index of its constant, or -1 for a field with a table.
        self._slot_constant: List[int] = [pruned.get(f, -1) for f in names]

    def means(self) -> Dict[str, torch.Tensor]:
        """Each pruned field's constant."""
        return {f: self.pruned_field_means[i].clone() for i, f in enumerate(self.pruned_features)}

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled: KeyedTensor = self.embedding_bag_collection(features)
        sparse = pooled.to_dict()
        B = pooled.values().size(0)
        means = self.pruned_field_means.to(pooled.values().dtype)
        parts = [sparse[name] if c < 0 else means[c].unsqueeze(0).expand(B, self.D)
                 for name, c in zip(self._sparse_feature_names, self._slot_constant)]
        return torch.cat(parts, dim=1).reshape(-1, self.F, self.D)


def stand_in_collection(features: Sequence[str], dim: int) -> EmbeddingBagCollection:
    """A collection on the meta device serving each of ``features`` (one row each, no memory):
    what a DLRM is built over to size its interaction for ``features`` before its
    ``sparse_arch`` is replaced by a :class:`MeanFilledSparseArch`."""
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=1, feature_names=[f])
        for f in features], device=torch.device("meta"))


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def field_means(collection: nn.Module, batches: Iterable[KeyedJaggedTensor], features: Sequence[str],
                max_batches: Optional[int] = None, process_group: Optional[dist.ProcessGroup] = None,
                reduce: bool = True) -> Dict[str, torch.Tensor]:
    """Mean pooled embedding of each of ``features`` over ``batches`` (float32, on the CPU).

    ``collection`` is a plain or sharded ``EmbeddingBagCollection`` reading those features;
    ``batches`` its inputs.  Under ``torch.distributed`` this is a collective: every rank
    passes its own batches (the same number on every rank, as in training) and gets the mean
    over all ranks' samples (``reduce=False``: over this process's batches only, no
    collective; for a plain collection).  The sums are kept in float64.
    """
    features = list(features)
    if not features:
        return {}
    if max_batches is not None:  # (never draws a batch past the last one used)
        batches = itertools.islice(batches, max_batches)
    sums: Optional[torch.Tensor] = None
    count = 0
    device = torch.device("cpu")
    for kjt in batches:
        out = collection(kjt)
        kt = out.wait() if isinstance(out, Awaitable) else out
        pooled = kt.to_dict()
        missing = [f for f in features if f not in pooled]
        if missing:
            raise KeyError(f"field_means: the collection does not output {missing} "
                           f"(it outputs {kt.keys()})")
        batch = torch.stack([pooled[f].double().sum(0) for f in features])
        device = batch.device
        sums = batch if sums is None else sums + batch
        count += pooled[features[0]].shape[0]
    D = sums.shape[1] if sums is not None else 0
    packed = torch.cat([sums.reshape(-1) if sums is not None else torch.zeros(0, dtype=torch.float64, device=device),
                        torch.tensor([float(count)], dtype=torch.float64, device=device)])
    if reduce and dist.is_initialized():
        # Every rank must take part with the same shape: a rank without batches sends its
        # shape first.
        sizes = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(sizes, packed.numel(), group=process_group)
        if len(set(sizes)) != 1:
            raise RuntimeError(f"field_means: ranks saw different batch counts or dims ({sizes} values)")
        dist.all_reduce(packed, group=process_group)
        D = (packed.numel() - 1) // max(len(features), 1)
    total = float(packed[-1])
    if total == 0:
        raise ValueError(f"field_means: no samples to average {features} over")
    means = (packed[:-1].reshape(len(features), D) / total).float().cpu()
    if not bool(torch.isfinite(means).all()):
        bad = [f for f, m in zip(features, means) if not bool(torch.isfinite(m).all())]
        raise ValueError(f"field_means: the mean pooled embedding of {bad} is not finite")
    return dict(zip(features, means))
