"""The id-to-tier step of a mixed collection, as FBGEMM ops: ids renumbered through the id map
and split by tier with ``block_bucketize_sparse_features`` into features ``"<name>@<tier>"``
(``<name>``: the output key, TorchRec's embedding name of the feature in its table)
of the sub-tables' TBE (``torchrec-cpu-facts.md`` section 6).

This is what a serving pipeline can run ahead of the lookup (data-loader workers:
:class:`MixedInputTransform`), what the collection runs inside its forward on CUDA and for a
sharded collection, and its CPU fallback when its fused kernel (``cpu_kernel``) is not
available.  Which features of an input a collection reads is decided here too
(:func:`select_features`): like TorchRec's collections, features no table serves are ignored,
unless ``strict``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.quant import id_map
from shark_torchrec.quant.layout import MixedLayout
from shark_torchrec.quant.tiers import Tier


# The functions below run in the collection's forward and in its fx leaf (mixed_ebc._fused_lookup),
# so they are written in TorchScript's subset (no sets, no !r, no generators): a traced model
# holding the collection scripts with torch.jit.script, as TorchRec's inference path does.


def check_features(keys: List[str], features: List[str], strict: bool) -> None:
    """Raise ``KeyError`` when ``keys`` (an input's) lack one of ``features`` (a collection's),
    or, with ``strict``, hold one it does not serve — naming them."""
    for i in range(len(keys)):
        if keys[i] in keys[:i]:  # (which copy a lookup would read is arbitrary)
            raise KeyError(f"input feature '{keys[i]}' appears more than once in the input's keys {keys}")
    missing: List[str] = []
    for f in features:
        if f not in keys:
            missing.append(f)
    unknown: List[str] = []
    for k in keys:
        if k not in features and k not in unknown:
            unknown.append(k)
    unknown.sort()
    if len(missing) > 0 or (strict and len(unknown) > 0):
        raise KeyError(f"input features do not match the collection: unknown {unknown}, "
                       f"missing {missing}")


def jagged_error(features: KeyedJaggedTensor, weighted: bool = False) -> Optional[str]:
    """What is wrong with the structure of ``features`` (the message), or None: ids that are
    not int32/int64, negative lengths, lengths that do not add up to the ids given, weights
    missing or not one per id (when ``weighted``).  TorchRec's lookups raise a raw kernel error on
    some of these and silently read past or around the ids on others; a collection checks
    them first.  One reduction over the lengths (the offsets, which the lookup needs anyway,
    give their total)."""
    keys = features.keys()
    if features.variable_stride_per_key():
        return f"a batch size per feature (a variable-batch input) is not supported (features {keys})"
    values, lengths = features.values(), features.lengths()
    if lengths.numel() != len(keys) * features.stride():
        return (f"{lengths.numel()} bag lengths for {len(keys)} features of batch size {features.stride()} "
                f"(features {keys})")
    if values.dtype != torch.int32 and values.dtype != torch.int64:
        return f"ids must be int32 or int64, got {values.dtype} (features {keys})"
    if lengths.dtype != torch.int32 and lengths.dtype != torch.int64:
        return f"lengths must be int32 or int64, got {lengths.dtype} (features {keys})"
    n = values.numel()
    if lengths.numel() > 0:
        B = features.stride()
        if int(lengths.min()) < 0:
            i = int((lengths < 0).nonzero()[0])
            key = keys[i // B] if B > 0 else "?"
            sample = i % B if B > 0 else i
            return f"feature '{key}': negative length {int(lengths[i])} at sample {sample}"
        offsets = features.offsets()
        if int(offsets[0]) != 0:  # (the fused lookup read the ids from there, TorchRec's raise)
            return f"offsets must start at 0, got {int(offsets[0])} (features {keys})"
        total = int(offsets[-1])
        if total != n:
            return f"lengths add up to {total} ids, but {n} ids were given (features {keys})"
    elif n > 0:
        return f"{n} ids given with no lengths (features {keys})"
    weights = features.weights_or_none()
    if weighted:
        if weights is None:
            return f"the collection is weighted, but the input has no per-id weights (features {keys})"
        if weights.numel() != n:
            return f"{weights.numel()} per-id weights for {n} ids (features {keys})"
    return None


def contiguous_jagged(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``features`` with contiguous ids, lengths, offsets and weights: the input itself where
    they are (the usual case: a few flag reads), else a copy.  The fused kernel and FBGEMM's
    ops read these tensors by their data pointer: a strided view (one column of a wider id
    tensor, a slice with a step) would be read as if it were packed — other ids, other weights,
    no error."""
    values, weights = features.values(), features.weights_or_none()
    lengths, offsets = features.lengths_or_none(), features.offsets_or_none()
    if (values.is_contiguous() and (weights is None or weights.is_contiguous())
            and (lengths is None or lengths.is_contiguous()) and (offsets is None or offsets.is_contiguous())):
        return features
    return KeyedJaggedTensor(keys=features.keys(), values=values.contiguous(),
                             weights=None if weights is None else weights.contiguous(),
                             lengths=features.lengths().contiguous(), stride=features.stride())


def without_weights(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``features`` without per-id weights (the same ids and lengths, no copy)."""
    if features.weights_or_none() is None:
        return features
    return KeyedJaggedTensor(keys=features.keys(), values=features.values(), lengths=features.lengths(),
                             offsets=features.offsets_or_none(), stride=features.stride(),
                             length_per_key=features.length_per_key_or_none(),
                             offset_per_key=features.offset_per_key_or_none())


def select_features(features: KeyedJaggedTensor, order: List[str], strict: bool = False) -> KeyedJaggedTensor:
    """``features`` holding exactly ``order``, in that order (the input itself when it already
    does; else one permute, which also leaves out the features no table serves)."""
    keys = features.keys()
    if keys == order:
        return features
    check_features(keys, order, strict)
    return features.permute([keys.index(f) for f in order])


class RowwiseInputTransform(nn.Module):
    """The id-to-tier step of one table group: a ``KeyedJaggedTensor`` of the group's features
    becomes one with features ``"<name>@<tier>"`` (``<name>`` the output key: the feature, or
    ``"<feature>@<table>"`` for a feature several tables read; tier-major, only the buckets
    that have a sub-table; all of them when MEAN pooling needs the DROP lengths) holding local
    rows of each tier's sub-table.  It holds only the id map (bit-packed, the bits a table's
    rows need, :mod:`~shark_torchrec.quant.id_map`).

    Every id is renumbered with one gather (per feature on CPU, one over all features on CUDA),
    then split by tier with one ``block_bucketize_sparse_features`` call.  Ids outside their
    table raise an error naming the feature and the id, unless ``check_ids=False``; input
    features no table serves are ignored, unless ``strict=True`` (then a ``KeyError`` names
    them).  The whole collection's transform is :class:`MixedInputTransform`.

    On CUDA, :meth:`bucketize` (what the collection's forward uses) makes no host
    synchronisation with ``check_ids=False`` and exactly one with ``check_ids=True`` (to raise
    the error); :meth:`forward` adds one more when some buckets are left out (their ids must be
    cut from the values, whose new length the host must read).
    """

    def __init__(self, layout: MixedLayout, device: torch.device = torch.device("cpu"),
                 check_ids: bool = True, strict: bool = False) -> None:
        super().__init__()
        self.check_ids = check_ids
        self.strict = strict
        configs = layout.configs()
        tiers = [Tier.parse(t) for t in layout.tiers]
        slots = layout.slots()
        # One slot per (feature, table): the input feature it reads (a feature several tables
        # read appears once per table), its output name and its table.
        self.features = [f for _, f, _ in slots]
        self.slots = [e for e, _, _ in slots]
        self._slot_config = [c for _, _, c in slots]
        self.num_tiers = len(tiers)
        # Every bucket block_bucketize makes, [tier][slot] (what :meth:`bucketize` returns).
        self.bucket_keys = [f"{e}@{t.value}" for t in tiers for e in self.slots]
        # Buckets that never hold an id: a tier the slot's table has no rows in.
        self.empty_buckets = {f"{e}@{t.value}" for k, t in enumerate(tiers)
                              for e, c in zip(self.slots, self._slot_config) if layout.rows[c.name][k] == 0}
        has_rows = [not k.endswith(f"@{Tier.DROP.value}") and k not in self.empty_buckets
                    for k in self.bucket_keys]
        mean_with_drop = Tier.DROP in tiers and any(c.pooling == PoolingType.MEAN for c in configs)
        if mean_with_drop or all(has_rows):
            # MEAN needs every bag's full length, DROP ids included: keep every bucket.
            self.output_keys, self._keep = list(self.bucket_keys), None
        else:
            keep = [i for i, h in enumerate(has_rows) if h]
            # A prefix slice of the values is only valid if the dropped buckets hold no ids
            # before a kept one: true for DROP (last) and for buckets without rows.
            self.output_keys = [self.bucket_keys[i] for i in keep]
            self._keep = torch.tensor(keep, dtype=torch.long, device=device)
        # Renumbered row of every row of every table (tables concatenated, each from a byte
        # offset that is a multiple of 4), in entries of the table's width in bits.
        self.table_base, self.table_bits, base = {}, {}, 0
        self._table_rows = {c.name: c.num_embeddings for c in configs}
        for c in configs:
            self.table_base[c.name] = base
            self.table_bits[c.name] = layout.map_bits[c.name]
            base += id_map.map_bytes(c.num_embeddings, layout.map_bits[c.name])
        self.register_buffer("row_map", torch.zeros(base + id_map.TAIL_BYTES, dtype=torch.uint8, device=device))
        self._register_load_state_dict_pre_hook(_old_row_map, with_module=True)
        self.register_buffer("block_sizes", torch.tensor(
            [max(1, c.num_embeddings) for c in self._slot_config], device=device), persistent=False)
        self.register_buffer("feature_base", torch.tensor(
            [self.table_base[c.name] for c in self._slot_config], device=device), persistent=False)
        self.register_buffer("feature_bits", torch.tensor(
            [self.table_bits[c.name] for c in self._slot_config], device=device), persistent=False)
        self.register_buffer("feature_rows", torch.tensor(
            [c.num_embeddings for c in self._slot_config], device=device), persistent=False)
        self._bucket_pos = [torch.cumsum(torch.tensor([0] + layout.rows[c.name]), 0).to(device)
                            for c in self._slot_config]

    def _renumber_per_feature(self, values: torch.Tensor, per_key: List[int]) -> torch.Tensor:
        """CPU: per feature, a min/max check and one gather from the feature's table's slice of
        the id map (no per-id feature index is materialised)."""
        renumbered = torch.empty(values.shape, dtype=torch.int32, device=values.device)
        start = 0
        for s, (c, n) in enumerate(zip(self._slot_config, per_key)):
            if n == 0:
                continue
            ids = values[start : start + n]
            if self.check_ids:
                lo, hi = torch.aminmax(ids)
                if int(lo) < 0 or int(hi) >= c.num_embeddings:
                    self._raise_bad_id(s, ids)
            renumbered[start : start + n] = id_map.gather(self.row_map, self.table_base[c.name], ids,
                                                          self.table_bits[c.name])
            start += n
        return renumbered

    def table_map(self, table: str) -> torch.Tensor:
        """``table``'s id map: its slice of :attr:`row_map` (uint8, entries of
        ``table_bits[table]`` bits, :func:`~shark_torchrec.quant.id_map.entry_span` bytes)."""
        base = self.table_base[table]
        return self.row_map[base : base + id_map.entry_span(self._table_rows[table], self.table_bits[table])]

    def set_map_entries(self, table: str, rows: Optional[torch.Tensor], values: torch.Tensor) -> None:
        """Point ``rows`` (distinct; all when None) of ``table`` at renumbered rows ``values``."""
        if rows is None and values.numel() != self._table_rows[table]:
            raise ValueError(f"table {table!r}: {values.numel()} id-map entries for {self._table_rows[table]} rows")
        id_map.write(self.row_map, self.table_base[table], rows, values, self.table_bits[table])

    def _renumber_vectorised(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CUDA: one check and one gather over all features.  The feature of every id comes
        from the bag lengths on the device (no per-key lengths on the host), so the only host
        synchronisation is the id check's."""
        F = len(self.features)
        B = lengths.numel() // F
        bag_feature = torch.div(torch.arange(F * B, device=values.device), B, rounding_mode="floor")
        feature_of_id = torch.repeat_interleave(bag_feature, lengths, output_size=values.numel())
        if self.check_ids:
            bad = (values < 0) | (values >= self.feature_rows[feature_of_id])
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                self._raise_bad_id(int(feature_of_id[i]), values[i : i + 1])
        bits = self.feature_bits[feature_of_id]
        start = values.long() * bits + self.feature_base[feature_of_id] * 8
        return id_map.gather_bits(self.row_map, start, bits)

    def _raise_bad_id(self, slot: int, ids: torch.Tensor) -> None:
        """Raise naming the feature, the first id of ``ids`` outside the table of ``slot``, and
        that table."""
        f, c = self.features[slot], self._slot_config[slot]
        bad = ids[(ids < 0) | (ids >= c.num_embeddings)][0]
        raise ValueError(f"feature {f!r}: id {int(bad)} is outside table "
                         f"{c.name!r} ({c.num_embeddings} rows)")

    def raise_if_outside(self, feature: str, ids: torch.Tensor) -> None:
        """Raise (see :meth:`_raise_bad_id`) if one of ``ids`` of input ``feature`` is outside
        a table of this group that reads it."""
        for s, (f, c) in enumerate(zip(self.features, self._slot_config)):
            if f == feature and bool(((ids < 0) | (ids >= c.num_embeddings)).any()):
                self._raise_bad_id(s, ids)

    def bucketize(self, features: KeyedJaggedTensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
        """``(local rows, lengths, weights, batch size)`` of every bucket in
        :attr:`bucket_keys` order: the ids of bucket ``i`` are ``lengths[i*B:(i+1)*B]`` long and
        follow each other; DROP ids are last.  No ids are cut, so no host synchronisation."""
        features = contiguous_jagged(select_features(features, self.features, self.strict))
        values, lengths = features.values(), features.lengths()
        weights = features.weights_or_none()
        if weights is not None and weights.dtype != torch.float32:  # (the TBE reads float32, as the kernel)
            weights = weights.float()
        if values.is_cuda:
            renumbered = self._renumber_vectorised(values, lengths)
        else:
            renumbered = self._renumber_per_feature(values, features.length_per_key())
        renumbered = renumbered.to(values.dtype)
        new_lengths, local_ids, new_weights, _, _ = torch.ops.fbgemm.block_bucketize_sparse_features(
            lengths, renumbered, False, False, self.block_sizes.to(values.dtype), self.num_tiers,
            weights, None, -1, [p.to(values.dtype) for p in self._bucket_pos])
        return local_ids, new_lengths, new_weights, lengths.numel() // len(self.features)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        local_ids, new_lengths, new_weights, B = self.bucketize(features)
        if self._keep is not None and B > 0:
            # Only the buckets the quantized collection reads: DROP (always last) and tiers a
            # table does not use have no sub-table.  Their ids sit after the kept ones
            # (bucket-major order), so the values are a prefix.
            new_lengths = new_lengths.view(-1, B)[self._keep].reshape(-1)
            n = int(new_lengths.sum())
            local_ids = local_ids[:n]
            new_weights = None if new_weights is None else new_weights[:n]
        return KeyedJaggedTensor(keys=self.output_keys, values=local_ids, lengths=new_lengths,
                                 weights=new_weights, stride=B)


def _old_row_map(module: "RowwiseInputTransform", state_dict, prefix, *args) -> None:
    """Load hook: an id map saved as int32 (before entries had a width; its layout's entries are
    4 bytes) is the same bytes, less the tail; a uint8 map saved when the tail was 4 bytes is
    the same bytes, less 4 bytes of the tail (:data:`~shark_torchrec.quant.id_map.TAIL_BYTES`)."""
    old = state_dict.get(prefix + "row_map")
    if old is None:
        return
    if old.dtype == torch.int32:
        old = old.contiguous().view(torch.uint8)
    short = module.row_map.numel() - old.numel()
    if old.dtype == torch.uint8 and old.dim() == 1 and 0 < short <= id_map.TAIL_BYTES:
        tail = torch.zeros(short, dtype=torch.uint8, device=old.device)
        state_dict[prefix + "row_map"] = torch.cat([old, tail])


class MixedInputTransform(nn.Module):
    """The id-to-tier transform of a whole :class:`RowwiseMixedEmbeddingBagCollection`: the
    output of every table group's :class:`RowwiseInputTransform`, one after the other.  Run it
    where a serving pipeline prepares inputs (data-loader workers) and feed its output to the
    collection, which then only looks rows up."""

    def __init__(self, transforms: Sequence[RowwiseInputTransform], strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self.parts = nn.ModuleList(transforms)
        self.features = [f for t in transforms for f in t.features]
        self.output_keys = [k for t in transforms for k in t.output_keys]

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        parts = split_features(features, self.features, [len(t.features) for t in self.parts], self.strict)
        out = [t(p) for t, p in zip(self.parts, parts)]
        return out[0] if len(out) == 1 else KeyedJaggedTensor.concat(out)


def split_features(features: KeyedJaggedTensor, order: List[str], sizes: List[int],
                   strict: bool = False) -> List[KeyedJaggedTensor]:
    """``features`` in ``order`` (see :func:`select_features`), split into consecutive groups of
    ``sizes`` keys (views)."""
    features = select_features(features, order, strict)
    return [features] if len(sizes) == 1 else features.split(sizes)
