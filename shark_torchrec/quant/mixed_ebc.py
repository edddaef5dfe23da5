"""A row-wise mixed-precision ``EmbeddingBagCollection`` on TorchRec's quantized collection.

Each logical table is stored as one physical TorchRec table per tier it uses
(``"<table>@<tier>"``, with that tier's ``data_type``) inside a TorchRec quantized
``EmbeddingBagCollection`` — one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen`` reads all
tiers in one call.  Rows are renumbered so that each tier's rows are contiguous
(``perm = argsort(tier, stable)``); a forward

1. maps every id to its renumbered row (one gather per feature) and splits the ids of every
   feature by tier with one ``torch.ops.fbgemm.block_bucketize_sparse_features`` call
   (``torchrec-cpu-facts.md`` section 6), local row = renumbered row − tier start — the
   collection's ``input_transform``, which can also run in data-loader workers;
2. looks the buckets up as features ``"<feature>@<tier>"`` of the quantized collection's TBE,
   calling FBGEMM's lookup op directly with offsets into the bucketized ids (so DROP ids are
   skipped without cutting the values: no host sync on CUDA); on CUDA INT2 sub-tables are read
   in a second call with fp16 output (FBGEMM's fp32-output INT2 store is wrong, see
   ``_MixedGroup._lookups``);
3. adds each feature's tier outputs back together (MEAN: divided by the bag's full length).

Tables are split into groups, one quantized collection (one TBE) each, run in parallel threads
on CPU.  Sharded by TorchRec for inference (``shark_torchrec.planning.shard_for_inference``), a
group's quantized collection is called through its KJT forward instead.

DROP rows have no physical row: their ids fall in a bucket that is never looked up, so they
read as zeros (and a MEAN bag still counts them).  The output is the ``KeyedTensor`` a float
``EmbeddingBagCollection`` with the same tables returns: same keys, dims and order.
"""

from __future__ import annotations

import dataclasses
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, PoolingMode
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor

from shark_torchrec.quant.tiers import TIER_ORDER, Tier, TierAssignment, sub_table_bytes

_DATA_TYPE = {Tier.FP32: DataType.FP32, Tier.FP16: DataType.FP16, Tier.INT8: DataType.INT8,
              Tier.INT4: DataType.INT4, Tier.INT2: DataType.INT2}
_BITS = {Tier.INT8: 8, Tier.INT4: 4, Tier.INT2: 2}
LAYOUT_FORMAT = "shark-torchrec/rowwise-mixed-ebc/v1"


def quantize_rows(w: torch.Tensor, tier: Tier) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Float rows → FBGEMM's stored form: ``(uint8 rows, uint8 [rows, 4] scale/bias or None)``."""
    w = w.detach().float().contiguous()
    if tier is Tier.FP32:
        return w.view(torch.uint8), None
    if tier is Tier.FP16:
        return w.half().contiguous().view(torch.uint8), None
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, _BITS[tier])
    # The op puts the fp16 scale and bias last; the TBE keeps them in a separate view.
    return q[:, :-4].contiguous(), q[:, -4:].contiguous()


def dequantize_rows(w: torch.Tensor, tier: Tier, device_type: str = "cpu") -> torch.Tensor:
    """What a row reads as after storage in ``tier`` (DROP: zeros), in FBGEMM's lookup on
    ``device_type``.

    The integer tiers store ``q`` with an fp16 ``scale`` and ``bias`` per row.  FBGEMM's CPU
    kernels read ``float(q) * scale + bias`` in fp32; its CUDA kernels compute the same with one
    fp16 fused multiply-add (``hfma2``), i.e. ``fp16(q * scale + bias)`` rounded once — so a row
    reads slightly differently on the two devices, and this returns exactly what each reads.
    """
    w = w.detach().float().contiguous().cpu()
    if tier is Tier.DROP:
        return torch.zeros_like(w)
    if tier in (Tier.FP32, Tier.FP16):
        return w if tier is Tier.FP32 else w.half().float()
    bits = _BITS[tier]
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    if device_type == "cpu":
        return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits)
    if device_type != "cuda":
        raise ValueError(f"device_type must be 'cpu' or 'cuda', not {device_type!r}")
    q = unpack_rows(fused[:, :-4], bits, w.shape[1]).double()
    scale_bias = fused[:, -4:].contiguous().view(torch.float16).double()
    exact = q * scale_bias[:, :1] + scale_bias[:, 1:]  # exact in float64 (fp16 operands)
    # numpy rounds float64 -> float16 once (round to nearest even), as the fused op does.
    return torch.from_numpy(exact.numpy().astype(np.float16)).float()


def unpack_rows(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """FBGEMM's packed ``bits``-bit row data → integers ``[rows, dim]`` (element ``j`` sits in
    byte ``j * bits // 8`` at bit ``(j * bits) % 8``)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0], -1)[:, :dim]


@dataclasses.dataclass
class MixedLayout:
    """What a mixed collection holds, without weights (serialisable; enough to rebuild it).

    Attributes:
        tables: the logical tables (name, rows, dim, features, pooling).
        tiers: the tiers in use, most precise first (DROP last if used).
        rows: ``{table: [rows per tier in tiers order]}``.
        is_weighted: whether inputs carry per-id weights.
        groups: tables split into groups, each its own TBE run in its own thread.
    """

    tables: List[Dict]
    tiers: List[str]
    rows: Dict[str, List[int]]
    is_weighted: bool = False
    groups: List[List[str]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.groups:  # one group of every table
            self.groups = [[t["name"] for t in self.tables]]

    def to_dict(self) -> Dict:
        return {"format": LAYOUT_FORMAT, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: Dict) -> "MixedLayout":
        if not isinstance(d, dict) or d.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"not a row-wise mixed collection layout (format {LAYOUT_FORMAT!r})")
        return MixedLayout(tables=d["tables"], tiers=d["tiers"], rows=d["rows"],
                           is_weighted=d["is_weighted"], groups=d.get("groups") or [])

    def configs(self) -> List[EmbeddingBagConfig]:
        return [EmbeddingBagConfig(name=t["name"], num_embeddings=t["rows"], embedding_dim=t["dim"],
                                   feature_names=list(t["features"]),
                                   pooling=PoolingType(t["pooling"])) for t in self.tables]


class RowwiseInputTransform(nn.Module):
    """The id-to-tier step of one table group: a ``KeyedJaggedTensor`` of the group's features
    becomes one with features ``"<feature>@<tier>"`` (tier-major, only the buckets that have a
    sub-table; all of them when MEAN pooling needs the DROP lengths) holding local rows of each
    tier's sub-table.  It holds only the id map (4 bytes per row).

    Every id is renumbered with one gather (per feature on CPU, one over all features on CUDA),
    then split by tier with one ``block_bucketize_sparse_features`` call.  Ids outside their
    table raise an error naming the feature and the id, unless ``check_ids=False``.  The whole
    collection's transform is :class:`MixedInputTransform`.

    On CUDA, :meth:`bucketize` (what the collection's forward uses) makes no host
    synchronisation with ``check_ids=False`` and exactly one with ``check_ids=True`` (to raise
    the error); :meth:`forward` adds one more when some buckets are left out (their ids must be
    cut from the values, whose new length the host must read).
    """

    def __init__(self, layout: MixedLayout, device: torch.device = torch.device("cpu"),
                 check_ids: bool = True) -> None:
        super().__init__()
        self.check_ids = check_ids
        configs = layout.configs()
        tiers = [Tier.parse(t) for t in layout.tiers]
        self.features = [f for c in configs for f in c.feature_names]
        self._config = {f: c for c in configs for f in c.feature_names}
        self.num_tiers = len(tiers)
        # Every bucket block_bucketize makes, [tier][feature] (what :meth:`bucketize` returns).
        self.bucket_keys = [f"{f}@{t.value}" for t in tiers for f in self.features]
        # Buckets that never hold an id: a tier the feature's table has no rows in.
        self.empty_buckets = {f"{f}@{t.value}" for k, t in enumerate(tiers) for f in self.features
                              if layout.rows[self._config[f].name][k] == 0}
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
        self.table_base, base = {}, 0
        for c in configs:
            self.table_base[c.name] = base
            base += c.num_embeddings
        # Renumbered row of every row of every table (tables concatenated): 4 bytes per row.
        self.register_buffer("row_map", torch.zeros(base, dtype=torch.int32, device=device))
        self.register_buffer("block_sizes", torch.tensor(
            [max(1, self._config[f].num_embeddings) for f in self.features], device=device),
            persistent=False)
        self.register_buffer("feature_base", torch.tensor(
            [self.table_base[self._config[f].name] for f in self.features], device=device),
            persistent=False)
        self.register_buffer("feature_rows", torch.tensor(
            [self._config[f].num_embeddings for f in self.features], device=device),
            persistent=False)
        self._bucket_pos = [torch.cumsum(torch.tensor([0] + layout.rows[self._config[f].name]), 0).to(device)
                            for f in self.features]

    def _renumber_per_feature(self, values: torch.Tensor, per_key: List[int]) -> torch.Tensor:
        """CPU: per feature, a min/max check and one gather from the feature's table's slice of
        the id map (no per-id feature index is materialised)."""
        renumbered = torch.empty(values.shape, dtype=torch.int32, device=values.device)
        start = 0
        for f, n in zip(self.features, per_key):
            if n == 0:
                continue
            ids = values[start : start + n]
            c = self._config[f]
            if self.check_ids:
                lo, hi = torch.aminmax(ids)
                if int(lo) < 0 or int(hi) >= c.num_embeddings:
                    self._raise_bad_id(f, ids)
            base = self.table_base[c.name]
            torch.index_select(self.row_map[base : base + c.num_embeddings], 0, ids,
                               out=renumbered[start : start + n])
            start += n
        return renumbered

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
                f = self.features[int(feature_of_id[i])]
                self._raise_bad_id(f, values[i : i + 1])
        return self.row_map[values.long() + self.feature_base[feature_of_id]]

    def _raise_bad_id(self, f: str, ids: torch.Tensor) -> None:
        c = self._config[f]
        bad = ids[(ids < 0) | (ids >= c.num_embeddings)][0]
        raise ValueError(f"feature {f!r}: id {int(bad)} is outside table "
                         f"{c.name!r} ({c.num_embeddings} rows)")

    def bucketize(self, features: KeyedJaggedTensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
        """``(local rows, lengths, weights, batch size)`` of every bucket in
        :attr:`bucket_keys` order: the ids of bucket ``i`` are ``lengths[i*B:(i+1)*B]`` long and
        follow each other; DROP ids are last.  No ids are cut, so no host synchronisation."""
        if features.keys() != self.features:
            keys = features.keys()
            unknown = sorted(set(keys) - set(self.features))
            missing = [f for f in self.features if f not in keys]
            if unknown or missing:
                raise KeyError(f"input features do not match the collection: unknown {unknown}, "
                               f"missing {missing}")
            features = features.permute([keys.index(f) for f in self.features])
        values, lengths = features.values(), features.lengths()
        if values.is_cuda:
            renumbered = self._renumber_vectorised(values, lengths)
        else:
            renumbered = self._renumber_per_feature(values, features.length_per_key())
        renumbered = renumbered.to(values.dtype)
        new_lengths, local_ids, new_weights, _, _ = torch.ops.fbgemm.block_bucketize_sparse_features(
            lengths, renumbered, False, False, self.block_sizes.to(values.dtype), self.num_tiers,
            features.weights_or_none(), None, -1, [p.to(values.dtype) for p in self._bucket_pos])
        return local_ids, new_lengths, new_weights, lengths.numel() // len(self.features)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        local_ids, new_lengths, new_weights, B = self.bucketize(features)
        if self._keep is not None:
            # Only the buckets the quantized collection reads: DROP (always last) and tiers a
            # table does not use have no sub-table.  Their ids sit after the kept ones
            # (bucket-major order), so the values are a prefix.
            new_lengths = new_lengths.view(-1, B)[self._keep].reshape(-1)
            n = int(new_lengths.sum())
            local_ids = local_ids[:n]
            new_weights = None if new_weights is None else new_weights[:n]
        return KeyedJaggedTensor(keys=self.output_keys, values=local_ids, lengths=new_lengths,
                                 weights=new_weights, stride=B)


class _MixedGroup(nn.Module):
    """Some tables of a mixed collection, in one quantized TorchRec collection (one TBE).

    Args:
        layout: tables, tiers in use and rows per tier.
        device: where the weights live (``cpu``: FBGEMM HOST tables; ``cuda``: DEVICE).
        check_ids: raise on ids outside a table (naming the feature and the id); turn it off
            for speed when the inputs are known to be valid.
    """

    def __init__(self, layout: MixedLayout, device: torch.device = torch.device("cpu"),
                 check_ids: bool = True) -> None:
        super().__init__()
        self._configs = layout.configs()
        self._tiers = [Tier.parse(t) for t in layout.tiers]
        self._stored = [t for t in self._tiers if t is not Tier.DROP]
        self._features = [f for c in self._configs for f in c.feature_names]
        # Output keys when every table has every stored tier: [tier][feature] blocks.
        self._stacked = [f"{f}@{t.value}" for t in self._stored for f in self._features]
        self._bucket_features: Dict[tuple, torch.Tensor] = {}
        self._dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]
        self._feature_config = {f: c for c in self._configs for f in c.feature_names}
        K = len(self._tiers)
        for c in self._configs:
            counts = layout.rows[c.name]
            if len(counts) != K or sum(counts) != c.num_embeddings:
                raise ValueError(f"table {c.name!r}: rows per tier {counts} do not add up to "
                                 f"{c.num_embeddings} over tiers {layout.tiers}")
        # Tier-major, like the transform's output: the quantized collection then reads its
        # input in order (no permute of the ids) and its output is [tier][feature] blocks.
        physical = []
        for k, tier in enumerate(self._tiers):
            for c in self._configs:
                counts = layout.rows[c.name]
                if tier is not Tier.DROP and counts[k] > 0:
                    physical.append(EmbeddingBagConfig(
                        name=f"{c.name}@{tier.value}", num_embeddings=counts[k],
                        embedding_dim=c.embedding_dim,
                        feature_names=[f"{f}@{tier.value}" for f in c.feature_names],
                        pooling=PoolingType.SUM, data_type=_DATA_TYPE[tier]))
        # A group whose rows are all dropped has nothing to look up (its output is zeros).
        self.qebc = QuantEmbeddingBagCollection(
            tables=physical, is_weighted=layout.is_weighted, device=device,
            output_dtype=torch.float) if physical else None
        # Bucketized ids are local rows of their sub-table by construction (the input transform
        # checks the original ids), so FBGEMM's per-call bounds check (5-70% of a lookup on
        # CPU, torchrec-cpu-facts.md 5.2) would only repeat work.
        for tbe in self._tbes():
            tbe.bounds_check_mode_int = BoundsCheckMode.NONE.value
        self.input_transform = RowwiseInputTransform(layout, device=device, check_ids=check_ids)
        # Output columns: each (tier, feature) block of the quantized output adds into the
        # feature's block of ours.
        self._out_offsets = torch.cumsum(torch.tensor([0] + self._dims), 0).tolist()
        self._colmaps: Dict[tuple, torch.Tensor] = {}
        self._has_mean = any(c.pooling == PoolingType.MEAN for c in self._configs)
        self._mean_columns = [self._feature_config[f].pooling == PoolingType.MEAN
                              for f, d in zip(self._features, self._dims) for _ in range(d)]
        self._column_feature = [i for i, d in enumerate(self._dims) for _ in range(d)]
        # The lookups: FBGEMM's TBE op called directly (not through the quantized collection's
        # KJT forward), with offsets into the bucketized ids wherever they lie — so DROP ids
        # need not be cut off (no host sync) and sub-tables can be read in separate calls.
        self._physical = [(f, c.embedding_dim, c.data_type) for c in physical for f in c.feature_names]
        # None: INT2 through an fp16 output on CUDA only (see _lookups); True/False force it.
        self.int2_fp16_output: Optional[bool] = None
        self._device_cache: Dict[tuple, object] = {}

    def _tbes(self) -> List[nn.Module]:
        return [] if self.qebc is None else list(self.qebc._emb_modules)

    def _tbe_views(self) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        views = {}
        for tbe in self._tbes():
            for spec, (w, sb) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
                views[spec[0]] = (w, sb)
        return views

    def _set_weights(self, name: str, data: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> None:
        w, sb = self._tbe_views()[name]
        w.copy_(data[0].to(w.device))
        if sb is not None:
            sb.copy_(data[1].to(sb.device))

    def memory(self) -> Tuple[Dict[str, Dict[str, int]], int, int]:
        """(bytes per table and tier, weight bytes held, id-map bytes held)."""
        per_table: Dict[str, Dict[str, int]] = {c.name: {} for c in self._configs}
        for tbe in self._tbes():
            for name, rows, dim, _, _ in tbe.embedding_specs:
                table, tier = name.rsplit("@", 1)
                per_table[table][tier] = sub_table_bytes(Tier(tier), rows, dim, tbe.row_alignment)
        weights = sum(int(getattr(tbe, a).numel()) for tbe in self._tbes()
                      for a in ("weights_host", "weights_dev", "weights_uvm"))
        row_map = self.input_transform.row_map
        return per_table, weights, row_map.numel() * row_map.element_size()

    # ------------------------------------------------------------------ lookups
    def _lookups(self, device: torch.device) -> List["_Lookup"]:
        """One FBGEMM call over every sub-table; or, on CUDA (or with ``int2_fp16_output``
        set), one over the non-INT2 sub-tables (fp32 output) and one over the INT2 ones (fp16
        output).

        Why: FBGEMM's CUDA kernels write INT2 results to an fp32 output wrongly — in
        ``VecNT<16, PrimitiveType::INT>::store(float*)`` the accumulator pointer is a ``float4*``
        advanced by an element count, so 12 of every 16 outputs are read from past the
        accumulator — while their fp16 store is right.  INT2 rows dequantize to fp16 values on
        CUDA anyway (see :func:`dequantize_rows`); only the pooled INT2 part of each bag is
        rounded to fp16 (relative 2^-11, far below INT2's own quantization error)."""
        split = self.int2_fp16_output if self.int2_fp16_output is not None else device.type == "cuda"
        key = ("lookups", split)
        if key not in self._device_cache:
            n = len(self._physical)
            int2 = [j for j in range(n) if self._physical[j][2] == DataType.INT2] if split else []
            rest = [j for j in range(n) if j not in int2]
            self._device_cache[key] = [_Lookup.plan(self, js, dtype) for js, dtype in
                                      ((rest, SparseType.FP32), (int2, SparseType.FP16)) if js]
        return self._device_cache[key]

    def _lookup(self, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor],
                B: int, keys: List[str]) -> torch.Tensor:
        """Pooled sub-table rows of bucketized ids laid out as ``keys`` (each bucket ``B`` bags),
        combined into [B, sum of dims] (each tier's block adds into its feature's block)."""
        tbe = self.qebc._emb_modules[0]
        device = values.device
        if B == 0:
            return torch.zeros(0, self._out_offsets[-1], device=device)
        # CUDA kernels take int32 ids and offsets; CPU ones either, with matching dtypes.
        index_dtype = torch.int32 if values.is_cuda else values.dtype
        indices = values.to(index_dtype)
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).to(index_dtype)
        dev_weights = tbe.weights_host if tbe.host_size > 0 else tbe.weights_dev
        width = self._out_offsets[-1]
        out = None
        for call in self._lookups(device):
            t = call.tensors(self, tbe, keys, device)
            res = torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function(
                dev_weights=dev_weights, uvm_weights=tbe.weights_uvm,
                weights_placements=t["placements"], weights_offsets=t["offsets"],
                weights_tys=t["tys"], D_offsets=t["D_offsets"], total_D=call.total_D,
                max_int2_D=call.max_D[DataType.INT2], max_int4_D=call.max_D[DataType.INT4],
                max_int8_D=call.max_D[DataType.INT8], max_float16_D=call.max_D[DataType.FP16],
                max_float32_D=call.max_D[DataType.FP32], indices=indices,
                offsets=call.offsets(t, offsets, B), pooling_mode=int(PoolingMode.SUM),
                indice_weights=weights, output_dtype=call.output_dtype.as_int(),
                lxu_cache_weights=tbe.lxu_cache_weights, lxu_cache_locations=t["no_cache"],
                row_alignment=tbe.row_alignment, max_float8_D=0, fp8_exponent_bits=-1,
                fp8_exponent_bias=-1).float()
            if call.stacked:
                # Whole [tier][feature] blocks: summing over tiers is one reduction.
                part = res.view(B, -1, width).sum(1)
                out = part if out is None else out.add_(part)
            else:
                if out is None:
                    out = torch.zeros(B, width, device=device)
                out.index_add_(1, t["columns"], res)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, features: KeyedJaggedTensor, transformed: bool) -> torch.Tensor:
        """Pooled embeddings [B, sum of dims] of this group's features (raw, or already passed
        through its input transform)."""
        if self.qebc is not None and type(self.qebc) is not QuantEmbeddingBagCollection:
            return self._forward_sharded(features, transformed)
        if transformed:
            values, lengths = features.values(), features.lengths()
            weights, B = features.weights_or_none(), features.stride()
            keys = self.input_transform.output_keys
        else:
            values, lengths, weights, B = self.input_transform.bucketize(features)
            keys = self.input_transform.bucket_keys
        if self.qebc is None:
            out = torch.zeros(B, self._out_offsets[-1], device=values.device)
        else:
            out = self._lookup(values, lengths, weights, B, keys)
        if self._has_mean:
            out = self._mean(out, lengths, keys, B)
        return out

    def _forward_sharded(self, features: KeyedJaggedTensor, transformed: bool) -> torch.Tensor:
        """Through a sharded quantized collection (``shard_for_inference``), which takes KJTs."""
        if not transformed:
            features = self.input_transform(features)
        B = features.stride()
        kt = self.qebc(features)
        q = kt.values()
        width = self._out_offsets[-1]
        if kt.keys() == self._stacked:
            # Every table has every stored tier: the output is [tier][feature] blocks.
            out = q.view(B, len(self._stored), width).sum(1)
        else:
            key = (tuple(kt.keys()), q.device)  # a sharded collection may order its output anew
            if key not in self._colmaps:
                self._colmaps[key] = self._column_map(kt.keys(), kt.length_per_key()).to(q.device)
            out = torch.zeros(B, width, dtype=q.dtype, device=q.device)
            out.index_add_(1, self._colmaps[key], q)
        if self._has_mean:
            out = self._mean(out, features.lengths(), features.keys(), B)
        return out

    def _bucket_feature(self, keys: List[str], device: torch.device) -> torch.Tensor:
        """Feature index of each bucket key (cached per key layout)."""
        key = (tuple(keys), device)
        if key not in self._bucket_features:
            index = {f: i for i, f in enumerate(self._features)}
            self._bucket_features[key] = torch.tensor(
                [index[k.rsplit("@", 1)[0]] for k in keys], device=device)
        return self._bucket_features[key]

    def _column_map(self, keys: List[str], dims: List[int]) -> torch.Tensor:
        index = {f: i for i, f in enumerate(self._features)}
        cols = []
        for k, d in zip(keys, dims):
            f = k.rsplit("@", 1)[0]
            start = self._out_offsets[index[f]]
            cols.append(torch.arange(start, start + d))
        return torch.cat(cols)

    def _mean(self, out: torch.Tensor, lengths: torch.Tensor, keys: List[str], B: int) -> torch.Tensor:
        """Divide MEAN features' columns by each bag's full length: the sum of its buckets'
        lengths, DROP included (dropped rows read as zeros, and count)."""
        lengths = lengths.view(-1, B)
        full = torch.zeros(len(self._features), B, dtype=lengths.dtype, device=lengths.device)
        full.index_add_(0, self._bucket_feature(keys, lengths.device), lengths)
        key = ("mean", out.device)
        if key not in self._device_cache:
            self._device_cache[key] = (
                torch.tensor(self._column_feature, device=out.device),
                torch.tensor(self._mean_columns, device=out.device))
        column_feature, mean_columns = self._device_cache[key]
        L = full.t().to(out.dtype).clamp(min=1)[:, column_feature]
        return torch.where(mean_columns, out / L, out)


@dataclasses.dataclass
class _Lookup:
    """One FBGEMM call of a group's lookup: some of its TBE's features (sub-table buckets).

    The TBE op reads bag ``i`` of the call at ids ``offsets[i]:offsets[i+1]`` of the whole
    bucketized id array, so the call's buckets must follow each other there — with at most
    buckets between them that never hold an id (tiers a table has no rows in).
    :meth:`tensors` checks that, and builds the call's index tensors, once per key layout and
    device."""

    features: List[int]  # indices of the TBE's features
    keys: List[str]
    dims: List[int]
    output_dtype: SparseType
    total_D: int
    max_D: Dict[DataType, int]
    stacked: bool  # the output is whole [tier][feature] blocks of the group's features
    columns: torch.Tensor  # else: the group's output column of each output column
    cache: Dict[tuple, Dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)

    @staticmethod
    def plan(group: "_MixedGroup", features: List[int], output_dtype: SparseType) -> "_Lookup":
        keys = [group._physical[j][0] for j in features]
        dims = [group._physical[j][1] for j in features]
        max_D = {dt: 0 for dt in (DataType.FP32, DataType.FP16, DataType.INT8, DataType.INT4, DataType.INT2)}
        for j in features:
            _, d, dt = group._physical[j]
            max_D[dt] = max(max_D[dt], d)
        tiers = list(dict.fromkeys(k.rsplit("@", 1)[1] for k in keys))
        stacked = keys == [f"{f}@{t}" for t in tiers for f in group._features]
        return _Lookup(features, keys, dims, output_dtype, sum(dims), max_D, stacked,
                       group._column_map(keys, dims))

    def tensors(self, group: "_MixedGroup", tbe: nn.Module, layout: List[str],
                device: torch.device) -> Dict[str, torch.Tensor]:
        key = (tuple(layout), device)
        if key not in self.cache:
            position = {k: i for i, k in enumerate(layout)}
            pos = [position[k] for k in self.keys]
            empty = group.input_transform.empty_buckets
            for p, q in zip(pos, pos[1:]):
                if q <= p or any(k not in empty for k in layout[p + 1 : q]):
                    raise RuntimeError(f"internal: buckets {self.keys} are not consecutive in {layout}")
            sel = torch.tensor(self.features, device=tbe.weights_offsets.device)
            self.cache[key] = {
                "positions": torch.tensor(pos, device=device),
                "placements": tbe.weights_placements[sel], "offsets": tbe.weights_offsets[sel],
                "tys": tbe.weights_tys[sel],
                "D_offsets": torch.tensor([0] + list(itertools.accumulate(self.dims)),
                                          dtype=torch.int32, device=device),
                "columns": self.columns.to(device),
                "no_cache": torch.empty(0, dtype=torch.int32, device=device),
                "first": pos[0] if pos == list(range(pos[0], pos[0] + len(pos))) else None,
                "count": len(pos), "bags": {}}
        return self.cache[key]

    @staticmethod
    def offsets(t: Dict, offsets: torch.Tensor, B: int) -> torch.Tensor:
        """The call's bag offsets, from the complete offsets of all buckets: a slice when its
        buckets are consecutive (the usual single call), else the start of every bag of its
        buckets, then the end of its last bag."""
        if t["first"] is not None:
            return offsets[t["first"] * B : (t["first"] + t["count"]) * B + 1]
        if B not in t["bags"]:
            if len(t["bags"]) > 32:  # serving sees few distinct batch sizes; bound the cache
                t["bags"].clear()
            pos = t["positions"]
            starts = (pos.unsqueeze(1) * B + torch.arange(B, device=pos.device)).reshape(-1)
            t["bags"][B] = torch.cat([starts, starts[-1:] + 1])
        return offsets[t["bags"][B]]


def _check_cuda_scale(table: str, scale_bias: torch.Tensor, rows: torch.Tensor) -> None:
    """FBGEMM's CUDA kernels multiply each row's fp16 scale by up to 512 in fp16 (see
    :func:`dequantize_rows`): a scale of 128 or more (a row spanning over 32,000 for INT8)
    would read as inf there."""
    scale = scale_bias.contiguous().view(torch.float16)[:, 0].float()
    bad = ~torch.isfinite((scale * 512).half())
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"table {table!r}: row {int(rows[i])} spans too wide a range "
                         f"(scale {float(scale[i]):g}) for FBGEMM's CUDA integer kernels")


def _tier_positions(tier_index: torch.Tensor, used: Sequence[int]) -> torch.Tensor:
    """Map TIER_ORDER indices to positions in ``used`` (the tiers present)."""
    lut = torch.full((len(TIER_ORDER),), -1, dtype=torch.long)
    for k, i in enumerate(used):
        lut[i] = k
    return lut[tier_index]


def _sub_layout(layout: MixedLayout, names: Sequence[str]) -> MixedLayout:
    keep = set(names)
    return MixedLayout(tables=[t for t in layout.tables if t["name"] in keep], tiers=list(layout.tiers),
                       rows={n: r for n, r in layout.rows.items() if n in keep},
                       is_weighted=layout.is_weighted, groups=[list(names)])


class MixedInputTransform(nn.Module):
    """The id-to-tier transform of a whole :class:`RowwiseMixedEmbeddingBagCollection`: the
    output of every table group's :class:`RowwiseInputTransform`, one after the other.  Run it
    where a serving pipeline prepares inputs (data-loader workers) and feed its output to the
    collection, which then only looks rows up."""

    def __init__(self, transforms: Sequence[RowwiseInputTransform]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(transforms)
        self.features = [f for t in transforms for f in t.features]
        self.output_keys = [k for t in transforms for k in t.output_keys]

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        parts = _split_features(features, self.features, [len(t.features) for t in self.parts])
        out = [t(p) for t, p in zip(self.parts, parts)]
        return out[0] if len(out) == 1 else KeyedJaggedTensor.concat(out)


def _split_features(features: KeyedJaggedTensor, order: List[str], sizes: List[int]) -> List[KeyedJaggedTensor]:
    """``features`` in ``order``, split into consecutive groups of ``sizes`` keys (views)."""
    keys = features.keys()
    if keys != order:
        unknown = sorted(set(keys) - set(order))
        missing = [f for f in order if f not in keys]
        if unknown or missing:
            raise KeyError(f"input features do not match the collection: unknown {unknown}, "
                           f"missing {missing}")
        features = features.permute([keys.index(f) for f in order])
    return [features] if len(sizes) == 1 else features.split(sizes)


class RowwiseMixedEmbeddingBagCollection(nn.Module):
    """Row-wise mixed-precision replacement for a TorchRec ``EmbeddingBagCollection``.

    Takes the ``KeyedJaggedTensor`` the float collection takes (or the output of
    :attr:`input_transform`) and returns the ``KeyedTensor`` it returns: same keys, dims, order.
    Build it with :meth:`from_float` (a float collection and a :class:`TierAssignment`),
    :meth:`from_state_dict` or :meth:`load` (no float model needed).

    Tables are split into ``len(layout.groups)`` groups, each with its own FBGEMM TBE; on CPU the
    groups run in parallel threads (FBGEMM's CPU kernels use one thread per call, and release
    Python's GIL), which is where the speed of a multi-core CPU comes from.

    Args:
        layout: tables, tiers in use, rows per tier and table groups.
        device: where the weights live (``cpu``: FBGEMM HOST tables; ``cuda``: DEVICE).
        check_ids: raise on ids outside a table (naming the feature and the id); with
            ``False`` invalid ids give undefined results.  On CUDA the check is the forward's
            only host synchronisation.
    """

    def __init__(self, layout: MixedLayout, device: torch.device = torch.device("cpu"),
                 check_ids: bool = True) -> None:
        super().__init__()
        names = [t["name"] for t in layout.tables]
        grouped = [n for g in layout.groups for n in g]
        if sorted(grouped) != sorted(names) or len(grouped) != len(names):
            raise ValueError(f"layout groups {layout.groups} must cover the tables {names} once")
        order = {n: i for i, n in enumerate(names)}
        if [order[n] for n in grouped] != sorted(order[n] for n in grouped):
            raise ValueError("layout groups must keep the tables' order")
        self.layout = layout
        self.check_ids = check_ids
        self.groups = nn.ModuleList(
            [_MixedGroup(_sub_layout(layout, g), device=device, check_ids=check_ids) for g in layout.groups])
        self.input_transform = MixedInputTransform([g.input_transform for g in self.groups])
        self._configs = layout.configs()
        self._features = [f for c in self._configs for f in c.feature_names]
        self._dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]
        self._sizes = [len(g.input_transform.features) for g in self.groups]
        self._transformed_sizes = [len(g.input_transform.output_keys) for g in self.groups]
        self._pool: Optional[ThreadPoolExecutor] = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"] = None  # threads do not pickle
        return state

    # ------------------------------------------------------------------ construction
    @staticmethod
    @torch.no_grad()
    def from_float(ebc: EmbeddingBagCollection, assignment: TierAssignment, check_ids: bool = True,
                   num_groups: Optional[int] = None) -> "RowwiseMixedEmbeddingBagCollection":
        """Convert a float collection; every table must have a tier per row in ``assignment``.
        NaN/Inf weights raise an error naming the table and row.

        Args:
            num_groups: table groups, each its own TBE run in its own thread (default: the
                number of torch threads on CPU, at most one per table; 1 on CUDA).
        """
        configs = ebc.embedding_bag_configs()
        missing = [c.name for c in configs if c.name not in assignment.tiers]
        if missing:
            raise ValueError(f"no tier assignment for tables {missing}")
        device = next(iter(ebc.parameters())).device
        if num_groups is None:
            num_groups = 1 if device.type == "cuda" else torch.get_num_threads()
        num_groups = max(1, min(num_groups, len(configs)))
        used = sorted({int(i) for c in configs for i in torch.unique(assignment.tiers[c.name])})
        tiers = [TIER_ORDER[i] for i in used]
        rows, perms = {}, {}
        for c in configs:
            t = assignment.tiers[c.name].long()
            if t.numel() != c.num_embeddings:
                raise ValueError(f"table {c.name!r}: {t.numel()} tiers for {c.num_embeddings} rows")
            w = ebc.embedding_bags[c.name].weight
            bad = ~torch.isfinite(w).all(1)
            if bool(bad.any()):
                raise ValueError(f"table {c.name!r}: row {int(bad.nonzero()[0])} has NaN/Inf weights")
            k_of_row = _tier_positions(t, used)
            perms[c.name] = torch.sort(k_of_row, stable=True).indices
            rows[c.name] = torch.bincount(k_of_row, minlength=len(used)).tolist()
        names = [c.name for c in configs]
        bounds = [round(i * len(names) / num_groups) for i in range(num_groups + 1)]
        layout = MixedLayout(
            tables=[{"name": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim,
                     "features": list(c.feature_names), "pooling": c.pooling.value} for c in configs],
            tiers=[t.value for t in tiers], rows=rows, is_weighted=ebc.is_weighted(),
            groups=[names[bounds[i]:bounds[i + 1]] for i in range(num_groups)])
        module = RowwiseMixedEmbeddingBagCollection(layout, device=device, check_ids=check_ids)
        group_of = {n: g for g in module.groups for n in g.input_transform.table_base}
        for c in configs:
            group = group_of[c.name]
            perm = perms[c.name]
            new_id = torch.empty_like(perm)
            new_id[perm] = torch.arange(perm.numel())
            base = group.input_transform.table_base[c.name]
            group.input_transform.row_map[base : base + c.num_embeddings] = new_id.to(torch.int32)
            w = ebc.embedding_bags[c.name].weight.detach().cpu()
            start = 0
            for k, tier in enumerate(tiers):
                n = rows[c.name][k]
                if tier is not Tier.DROP and n > 0:
                    data = quantize_rows(w[perm[start:start + n]], tier)
                    if device.type == "cuda" and data[1] is not None:
                        _check_cuda_scale(c.name, data[1], perm[start:start + n])
                    group._set_weights(f"{c.name}@{tier.value}", data)
                start += n
        return module

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Dict:
        return self.layout.to_dict()

    def set_extra_state(self, state: Dict) -> None:
        if MixedLayout.from_dict(state) != self.layout:
            raise ValueError("the saved state is of a differently laid out mixed collection")

    def save(self, path: str) -> None:
        """Write ``state_dict()`` to ``path`` (read it back with :meth:`load`)."""
        torch.save(self.state_dict(), path)

    @staticmethod
    def load(path: str, device: torch.device = torch.device("cpu"),
             check_ids: bool = True) -> "RowwiseMixedEmbeddingBagCollection":
        """Rebuild from a file written by :meth:`save`, with ``torch.load(weights_only=True)``:
        plain tensors and containers, plus TorchRec's packed 4-/2-bit tensor types, and no
        other pickled object."""
        with torch.serialization.safe_globals([UInt4Tensor, UInt2Tensor]):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: not a loadable mixed-collection state ({e})") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a state dict")
        return RowwiseMixedEmbeddingBagCollection.from_state_dict(state, device, check_ids)

    @staticmethod
    def from_state_dict(state: Dict[str, torch.Tensor], device: torch.device = torch.device("cpu"),
                        check_ids: bool = True) -> "RowwiseMixedEmbeddingBagCollection":
        """Rebuild from ``module.state_dict()`` alone (no float model needed)."""
        if "_extra_state" not in state:
            raise ValueError("not a RowwiseMixedEmbeddingBagCollection state (no layout)")
        module = RowwiseMixedEmbeddingBagCollection(MixedLayout.from_dict(state["_extra_state"]),
                                                    device=device, check_ids=check_ids)
        module.load_state_dict(state)
        return module

    # ------------------------------------------------------------------ reports
    def memory_report(self) -> Dict[str, object]:
        """Bytes per table and tier (the physical sub-tables, cache-line aligned as FBGEMM
        allocates them), the id map, and the total of the buffers actually held."""
        tables: Dict[str, Dict[str, int]] = {}
        weights = id_map = 0
        for g in self.groups:
            per_table, w, m = g.memory()
            tables.update(per_table)
            weights += w
            id_map += m
        return {"tables": tables, "weights_bytes": weights, "id_map_bytes": id_map,
                "total_bytes": weights + id_map}

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._configs)

    # ------------------------------------------------------------------ forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of ``features``: the collection's own features, or the output of
        :attr:`input_transform` (already split by tier, e.g. in data-loader workers)."""
        transformed = features.keys() == self.input_transform.output_keys
        if transformed:
            parts = [features] if len(self.groups) == 1 else features.split(self._transformed_sizes)
        else:
            parts = _split_features(features, self._features, self._sizes)
        if len(self.groups) == 1:
            outs = [self.groups[0](parts[0], transformed)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=len(self.groups),
                                                thread_name_prefix="rowwise-mixed")
            futures = [self._pool.submit(g, p, transformed) for g, p in zip(self.groups, parts)]
            outs = [f.result() for f in futures]
        values = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return KeyedTensor(keys=list(self._features), length_per_key=list(self._dims), values=values)
