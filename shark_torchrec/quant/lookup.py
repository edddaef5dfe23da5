"""Looking rows up: one group of a mixed collection's tables, its sub-tables in one TorchRec
quantized collection (one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen``).

Two ways to read it, both into the collection's output columns:

* the fused CPU kernel (:mod:`shark_torchrec.quant.cpu_kernel`): raw ids in, pooled bags out,
  one pass; :meth:`_MixedGroup.kernel_tensors` tells it where each sub-table's rows sit in the
  TBE's buffer;
* FBGEMM's TBE op on ids already split by tier (:mod:`shark_torchrec.quant.remap`): CUDA, a
  sharded collection, inputs that went through the input transform, and the CPU fallback.  One
  call over every sub-table (tier-major, so the ``[tier][feature]`` output blocks add up with
  one reduction); on CUDA INT2 sub-tables in a second call with fp16 output (see
  :meth:`_MixedGroup._lookups`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Optional, Tuple

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, PoolingMode
from torch import nn
from torchrec.modules.embedding_configs import DataType, PoolingType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.quant.layout import MixedLayout
from shark_torchrec.quant.remap import RowwiseInputTransform
from shark_torchrec.quant.tiers import Tier, sub_table_bytes


class _MixedGroup(nn.Module):
    """Some tables of a mixed collection, in one quantized TorchRec collection (one TBE).

    Args:
        layout: tables, tiers in use and rows per tier.
        device: where the weights live (``cpu``: FBGEMM HOST tables; ``cuda``: DEVICE).
        check_ids: raise on ids outside a table (naming the feature and the id); turn it off
            for speed when the inputs are known to be valid.
    """

    def __init__(self, layout: MixedLayout, device: torch.device = torch.device("cpu"),
                 check_ids: bool = True, strict: bool = False) -> None:
        super().__init__()
        layout.check()
        self._configs = layout.configs()
        self._tiers = [Tier.parse(t) for t in layout.tiers]
        self._stored = [t for t in self._tiers if t is not Tier.DROP]
        # Output slots (one per feature of each table, named as TorchRec names them: a feature
        # several tables read is "<feature>@<table>"); "feature" below means such a slot.
        self._features = [e for e, _, _ in layout.slots()]
        # Output keys when every table has every stored tier: [tier][feature] blocks.
        self._stacked = [f"{f}@{t.value}" for t in self._stored for f in self._features]
        self._bucket_features: Dict[tuple, torch.Tensor] = {}
        self._dims = [c.embedding_dim for _, _, c in layout.slots()]
        self._feature_config = {e: c for e, _, c in layout.slots()}
        self._rows = {c.name: list(layout.rows[c.name]) for c in self._configs}
        physical = layout.physical_configs()
        # A group whose rows are all dropped has nothing to look up (its output is zeros).
        self.qebc = QuantEmbeddingBagCollection(
            tables=physical, is_weighted=layout.is_weighted, device=device,
            output_dtype=torch.float, row_alignment=layout.row_alignment) if physical else None
        # Bucketized ids are local rows of their sub-table by construction (the input transform
        # checks the original ids), so FBGEMM's per-call bounds check (5-70% of a lookup on
        # CPU, torchrec-cpu-facts.md 5.2) would only repeat work.
        for tbe in self._tbes():
            tbe.bounds_check_mode_int = BoundsCheckMode.NONE.value
        self.input_transform = RowwiseInputTransform(layout, device=device, check_ids=check_ids,
                                                     strict=strict)
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

    def _set_weights(self, name: str, data: Tuple[torch.Tensor, Optional[torch.Tensor]], start: int = 0,
                     views: Optional[Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None) -> None:
        """Write stored rows (:func:`~shark_torchrec.quant.rows.quantize_rows`) into sub-table
        ``name`` from its row ``start`` on (``views``: :meth:`_tbe_views`, when already read)."""
        w, sb = (views or self._tbe_views())[name]
        n = data[0].shape[0]
        # (copy_ would broadcast a short or one-row source, or leave rows unwritten, silently)
        if start + n > w.shape[0] or tuple(data[0].shape[1:]) != tuple(w.shape[1:]) or \
                (sb is not None and (data[1] is None or tuple(data[1].shape) != (n, *sb.shape[1:]))):
            raise ValueError(f"sub-table {name!r}: rows of shape {tuple(data[0].shape)} from row {start} do not "
                             f"fit its {tuple(w.shape)} stored rows")
        w[start:start + n].copy_(data[0].to(w.device))
        if sb is not None:
            sb[start:start + n].copy_(data[1].to(sb.device))

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

    # ------------------------------------------------------------------ fused CPU kernel
    def kernel_tensors(self, column: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``torch.ops.shark_torchrec.mixed_embedding_bag`` needs to read this group's
        features into output columns from ``column`` on: ``feature_meta`` [F, 6] (id-map byte
        offset, rows, dim, output column, MEAN, bits per id-map entry), ``tier_start`` [F, K + 1] (renumbered row where each
        tier starts) and ``sub_meta`` [F, K, 3] (byte offset of each (feature, tier) sub-table
        in the TBE's weight buffer, bytes per row as FBGEMM pads them, FBGEMM ``SparseType``;
        -1 for DROP and tiers the table has no rows in).  Built once."""
        key = ("kernel", column)
        if key not in self._device_cache:
            t = self.input_transform
            specs = {}
            for tbe in self._tbes():
                # weights_offsets / weights_tys are per TBE feature; a table may serve several.
                first = {}
                for i, table in enumerate(tbe.feature_table_map):
                    first.setdefault(table, i)
                for j, (spec, (w, _)) in enumerate(zip(tbe.embedding_specs, tbe.split_embedding_weights())):
                    # Integer rows: the weight view starts after the 4-byte scale/bias; its row
                    # stride is the whole padded row.
                    specs[spec[0]] = (int(tbe.weights_offsets[first[j]]), w.stride(0),
                                      int(tbe.weights_tys[first[j]]))
            F, K = len(self._features), len(self._tiers)
            feature_meta = torch.zeros(F, 6, dtype=torch.long)
            sub_meta = torch.tensor([0, 0, -1], dtype=torch.long).repeat(F, K, 1)
            tier_start = torch.zeros(F, K + 1, dtype=torch.long)
            for i, f in enumerate(self._features):
                c = self._feature_config[f]
                feature_meta[i] = torch.tensor([t.table_base[c.name], c.num_embeddings, c.embedding_dim,
                                                column + self._out_offsets[i],
                                                int(c.pooling == PoolingType.MEAN), t.table_bits[c.name]])
                tier_start[i] = torch.cumsum(torch.tensor([0] + self._rows[c.name]), 0)
                for k, tier in enumerate(self._tiers):
                    name = f"{c.name}@{tier.value}"
                    if name in specs:
                        sub_meta[i, k] = torch.tensor(specs[name])
            self._device_cache[key] = (feature_meta, tier_start, sub_meta)
        return self._device_cache[key]

    def table_sub_meta(self, table: str) -> torch.Tensor:
        """Where ``table``'s sub-tables lie in the TBE's weight buffer: int64 [7, 3] by
        :data:`TIER_ORDER` tier (byte offset, bytes per stored row, FBGEMM ``SparseType``; -1
        where it has none, as DROP) — what ``quantize_into`` writes rows by."""
        from shark_torchrec.quant.tiers import TIER_ORDER

        meta = torch.tensor([0, 0, -1], dtype=torch.long).repeat(len(TIER_ORDER), 1)
        for tbe in self._tbes():
            first = {}
            for i, t in enumerate(tbe.feature_table_map):
                first.setdefault(t, i)
            for j, (spec, (w, _)) in enumerate(zip(tbe.embedding_specs, tbe.split_embedding_weights())):
                name, tier = spec[0].rsplit("@", 1)
                if name == table:
                    meta[TIER_ORDER.index(Tier(tier))] = torch.tensor(
                        [int(tbe.weights_offsets[first[j]]), w.stride(0), int(tbe.weights_tys[first[j]])])
        return meta

    def weight_buffer(self) -> torch.Tensor:
        """The TBE's host weight buffer (every sub-table's rows), or an empty one."""
        tbes = self._tbes()
        return tbes[0].weights_host if tbes else torch.empty(0, dtype=torch.uint8)

    def kernel_state(self) -> Tuple[object, ...]:
        """The objects the kernel's inputs come from: the quantized collection, the id map and
        the weight buffer.  A forward keeps its inputs while these stay the same objects
        (``.to()``, sharding the quantized collection or an id map assigned anew replaces
        some).  Read through the modules' dicts: ``nn.Module.__getattr__`` would cost
        microseconds per call on small batches."""
        qebc = self._modules.get("qebc")  # None: every row dropped
        tbes = qebc.__dict__.get("_emb_modules") if qebc is not None else None
        return (qebc, self._modules["input_transform"]._buffers["row_map"],
                tbes[0].__dict__.get("weights_host") if tbes else None)

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
        if B == 0:  # (no bags: nothing to divide; view(-1, 0) would fail)
            return out
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
