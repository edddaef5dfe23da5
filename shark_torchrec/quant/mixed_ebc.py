"""A row-wise mixed-precision ``EmbeddingBagCollection`` on TorchRec's quantized collection.

Each logical table is stored as one physical TorchRec table per tier it uses
(``"<table>@<tier>"``, with that tier's ``data_type``), all inside one TorchRec quantized
``EmbeddingBagCollection`` — so inside one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen``
per pooling group.  Rows are renumbered so that each tier's rows are contiguous
(``perm = argsort(tier, stable)``); a forward

1. maps every id to its renumbered row with one gather over all features
   (:meth:`RowwiseMixedEmbeddingBagCollection.remap`, an input transform that can also run in
   data-loader workers: see :class:`RowwiseRemap`);
2. splits the ids of every feature by tier with one
   ``torch.ops.fbgemm.block_bucketize_sparse_features`` call over all features
   (``torchrec-cpu-facts.md`` section 6), local row = renumbered row − tier start;
3. looks the buckets up as features ``"<feature>@<tier>"`` of the quantized collection;
4. adds each feature's tier outputs back together (MEAN: divided by the bag's full length).

DROP rows have no physical row: their ids fall in a bucket that is never looked up, so they
read as zeros (and a MEAN bag still counts them).  The output is the ``KeyedTensor`` a float
``EmbeddingBagCollection`` with the same tables returns: same keys, dims and order.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
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


def dequantize_rows(w: torch.Tensor, tier: Tier) -> torch.Tensor:
    """What a row reads as after storage in ``tier`` (DROP: zeros)."""
    w = w.detach().float().contiguous()
    if tier is Tier.DROP:
        return torch.zeros_like(w)
    if tier in (Tier.FP32, Tier.FP16):
        return w if tier is Tier.FP32 else w.half().float()
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, _BITS[tier])
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, _BITS[tier])


@dataclasses.dataclass
class MixedLayout:
    """What a mixed collection holds, without weights (serialisable; enough to rebuild it).

    Attributes:
        tables: the logical tables (name, rows, dim, features, pooling).
        tiers: the tiers in use, most precise first (DROP last if used).
        rows: ``{table: [rows per tier in tiers order]}``.
        is_weighted: whether inputs carry per-id weights.
    """

    tables: List[Dict]
    tiers: List[str]
    rows: Dict[str, List[int]]
    is_weighted: bool = False

    def to_dict(self) -> Dict:
        return {"format": LAYOUT_FORMAT, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: Dict) -> "MixedLayout":
        if not isinstance(d, dict) or d.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"not a row-wise mixed collection layout (format {LAYOUT_FORMAT!r})")
        return MixedLayout(tables=d["tables"], tiers=d["tiers"], rows=d["rows"],
                           is_weighted=d["is_weighted"])

    def configs(self) -> List[EmbeddingBagConfig]:
        return [EmbeddingBagConfig(name=t["name"], num_embeddings=t["rows"], embedding_dim=t["dim"],
                                   feature_names=list(t["features"]),
                                   pooling=PoolingType(t["pooling"])) for t in self.tables]


class RowwiseInputTransform(nn.Module):
    """The id-to-tier part of a :class:`RowwiseMixedEmbeddingBagCollection`'s forward, as a
    separate input transform: a ``KeyedJaggedTensor`` of the collection's features becomes one
    with features ``"<feature>@<tier>"`` (tier-major) holding local rows of each tier's
    sub-table.  It holds only the id map, so it is cheap to ship to data-loader workers and
    takes the remapping off the serving path (``collection(transform(kjt))``).

    Every id is renumbered with one gather over all features, then split by tier with one
    ``block_bucketize_sparse_features`` call.  Ids outside their table raise an error naming
    the feature and the id, unless ``check_ids=False``.
    """

    def __init__(self, layout: MixedLayout, device: torch.device = torch.device("cpu"),
                 check_ids: bool = True) -> None:
        super().__init__()
        self.check_ids = check_ids
        configs = layout.configs()
        tiers = [Tier.parse(t) for t in layout.tiers]
        self.features = [f for c in configs for f in c.feature_names]
        self._config = {f: c for c in configs for f in c.feature_names}
        self.bucket_keys = [f"{f}@{t.value}" for t in tiers for f in self.features]
        self.num_tiers = len(tiers)
        self.table_base, base = {}, 0
        for c in configs:
            self.table_base[c.name] = base
            base += c.num_embeddings
        # Renumbered row of every row of every table (tables concatenated): 4 bytes per row.
        self.register_buffer("row_map", torch.zeros(base, dtype=torch.int32, device=device))
        self.register_buffer("feature_base", torch.tensor(
            [self.table_base[self._config[f].name] for f in self.features], device=device),
            persistent=False)
        self.register_buffer("feature_rows", torch.tensor(
            [self._config[f].num_embeddings for f in self.features], device=device),
            persistent=False)
        self.register_buffer("block_sizes", torch.tensor(
            [max(1, self._config[f].num_embeddings) for f in self.features], device=device),
            persistent=False)
        self._bucket_pos = [torch.cumsum(torch.tensor([0] + layout.rows[self._config[f].name]), 0).to(device)
                            for f in self.features]

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if features.keys() != self.features:
            keys = features.keys()
            unknown = sorted(set(keys) - set(self.features))
            missing = [f for f in self.features if f not in keys]
            if unknown or missing:
                raise KeyError(f"input features do not match the collection: unknown {unknown}, "
                               f"missing {missing}")
            features = features.permute([keys.index(f) for f in self.features])
        values, lengths = features.values(), features.lengths()
        per_key = torch.tensor(features.length_per_key(), device=values.device)
        feature_of_id = torch.repeat_interleave(
            torch.arange(len(self.features), device=values.device), per_key)
        if self.check_ids:
            bad = (values < 0) | (values >= self.feature_rows[feature_of_id])
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                f = self.features[int(feature_of_id[i])]
                c = self._config[f]
                raise ValueError(f"feature {f!r}: id {int(values[i])} is outside table "
                                 f"{c.name!r} ({c.num_embeddings} rows)")
        renumbered = self.row_map[values.long() + self.feature_base[feature_of_id]].to(values.dtype)
        new_lengths, local_ids, new_weights, _, _ = torch.ops.fbgemm.block_bucketize_sparse_features(
            lengths, renumbered, False, False, self.block_sizes.to(values.dtype), self.num_tiers,
            features.weights_or_none(), None, -1, [p.to(values.dtype) for p in self._bucket_pos])
        return KeyedJaggedTensor(keys=self.bucket_keys, values=local_ids, lengths=new_lengths,
                                 weights=new_weights, stride=features.stride())


class RowwiseMixedEmbeddingBagCollection(nn.Module):
    """Row-wise mixed-precision replacement for a TorchRec ``EmbeddingBagCollection``.

    Build it with :meth:`from_float` (a float collection and a :class:`TierAssignment`) or
    :meth:`from_state_dict` (a saved state, no float model needed).

    Args:
        layout: tables, tiers in use and rows per tier.
        device: where the weights live (``cpu``: FBGEMM HOST tables; ``cuda``: DEVICE).
        check_ids: raise on ids outside a table (naming the feature and the id); turn it off
            for speed when the inputs are known to be valid.
    """

    def __init__(self, layout: MixedLayout, device: torch.device = torch.device("cpu"),
                 check_ids: bool = True) -> None:
        super().__init__()
        self.layout = layout
        self.check_ids = check_ids
        self._configs = layout.configs()
        self._tiers = [Tier.parse(t) for t in layout.tiers]
        self._stored = [t for t in self._tiers if t is not Tier.DROP]
        self._features = [f for c in self._configs for f in c.feature_names]
        self._dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]
        self._feature_config = {f: c for c in self._configs for f in c.feature_names}
        K = len(self._tiers)
        physical = []
        for c in self._configs:
            counts = layout.rows[c.name]
            if len(counts) != K or sum(counts) != c.num_embeddings:
                raise ValueError(f"table {c.name!r}: rows per tier {counts} do not add up to "
                                 f"{c.num_embeddings} over tiers {layout.tiers}")
            for k, tier in enumerate(self._tiers):
                if tier is not Tier.DROP and counts[k] > 0:
                    physical.append(EmbeddingBagConfig(
                        name=f"{c.name}@{tier.value}", num_embeddings=counts[k],
                        embedding_dim=c.embedding_dim,
                        feature_names=[f"{f}@{tier.value}" for f in c.feature_names],
                        pooling=PoolingType.SUM, data_type=_DATA_TYPE[tier]))
        self.qebc = QuantEmbeddingBagCollection(
            tables=physical, is_weighted=layout.is_weighted, device=device,
            output_dtype=torch.float)
        self.input_transform = RowwiseInputTransform(layout, device=device, check_ids=check_ids)
        # Output columns: each (tier, feature) block of the quantized output adds into the
        # feature's block of ours.
        self._out_offsets = torch.cumsum(torch.tensor([0] + self._dims), 0).tolist()
        self._colmap: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ construction
    @staticmethod
    @torch.no_grad()
    def from_float(ebc: EmbeddingBagCollection, assignment: TierAssignment,
                   check_ids: bool = True) -> "RowwiseMixedEmbeddingBagCollection":
        """Convert a float collection; every table must have a tier per row in ``assignment``.
        NaN/Inf weights raise an error naming the table and row."""
        configs = ebc.embedding_bag_configs()
        missing = [c.name for c in configs if c.name not in assignment.tiers]
        if missing:
            raise ValueError(f"no tier assignment for tables {missing}")
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
        layout = MixedLayout(
            tables=[{"name": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim,
                     "features": list(c.feature_names), "pooling": c.pooling.value} for c in configs],
            tiers=[t.value for t in tiers], rows=rows, is_weighted=ebc.is_weighted())
        device = next(iter(ebc.parameters())).device
        module = RowwiseMixedEmbeddingBagCollection(layout, device=device, check_ids=check_ids)
        for c in configs:
            perm = perms[c.name]
            new_id = torch.empty_like(perm)
            new_id[perm] = torch.arange(perm.numel())
            base = module.input_transform.table_base[c.name]
            module.input_transform.row_map[base : base + c.num_embeddings] = new_id.to(torch.int32)
            w = ebc.embedding_bags[c.name].weight.detach().cpu()
            start = 0
            for k, tier in enumerate(tiers):
                n = rows[c.name][k]
                if tier is not Tier.DROP and n > 0:
                    module._set_weights(f"{c.name}@{tier.value}", quantize_rows(w[perm[start:start + n]], tier))
                start += n
        return module

    def _tbe_views(self) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        views = {}
        for tbe in self.qebc._emb_modules:
            for spec, (w, sb) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
                views[spec[0]] = (w, sb)
        return views

    def _set_weights(self, name: str, data: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> None:
        w, sb = self._tbe_views()[name]
        w.copy_(data[0].to(w.device))
        if sb is not None:
            sb.copy_(data[1].to(sb.device))

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
        per_table: Dict[str, Dict[str, int]] = {c.name: {} for c in self._configs}
        for tbe in self.qebc._emb_modules:
            for name, rows, dim, _, _ in tbe.embedding_specs:
                table, tier = name.rsplit("@", 1)
                per_table[table][tier] = sub_table_bytes(Tier(tier), rows, dim, tbe.row_alignment)
        weights = sum(int(getattr(tbe, a).numel()) for tbe in self.qebc._emb_modules
                      for a in ("weights_host", "weights_dev", "weights_uvm"))
        row_map = self.input_transform.row_map
        id_map = row_map.numel() * row_map.element_size()
        return {"tables": per_table, "weights_bytes": weights, "id_map_bytes": id_map,
                "total_bytes": weights + id_map}

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._configs)

    # ------------------------------------------------------------------ forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of ``features`` — either the collection's own features, or the
        output of :attr:`input_transform` (already split by tier, e.g. in data workers)."""
        if features.keys() != self.input_transform.bucket_keys:
            features = self.input_transform(features)
        B = features.stride()
        kt = self.qebc(features)
        q = kt.values()
        if self._colmap is None or self._colmap.device != q.device:
            self._colmap = self._column_map(kt.keys(), kt.length_per_key()).to(q.device)
        out = torch.zeros(B, self._out_offsets[-1], dtype=q.dtype, device=q.device)
        out.index_add_(1, self._colmap, q)
        if any(c.pooling == PoolingType.MEAN for c in self._configs):
            # A bag's full length is the sum of its tiers' (DROP included: it counts as zeros).
            lengths = features.lengths().view(len(self._tiers), len(self._features), B).sum(0)
            out = self._mean(out, lengths, B)
        return KeyedTensor(keys=list(self._features), length_per_key=list(self._dims), values=out)

    def _column_map(self, keys: List[str], dims: List[int]) -> torch.Tensor:
        index = {f: i for i, f in enumerate(self._features)}
        cols = []
        for k, d in zip(keys, dims):
            f = k.rsplit("@", 1)[0]
            start = self._out_offsets[index[f]]
            cols.append(torch.arange(start, start + d))
        return torch.cat(cols)

    def _mean(self, out: torch.Tensor, lengths: torch.Tensor, B: int) -> torch.Tensor:
        L = lengths.to(out.dtype).clamp(min=1)
        divisor = torch.ones_like(out)
        for i, f in enumerate(self._features):
            if self._feature_config[f].pooling == PoolingType.MEAN:
                a, b = self._out_offsets[i], self._out_offsets[i + 1]
                divisor[:, a:b] = L[i].unsqueeze(1)
        return out / divisor


def _tier_positions(tier_index: torch.Tensor, used: Sequence[int]) -> torch.Tensor:
    """Map TIER_ORDER indices to positions in ``used`` (the tiers present)."""
    lut = torch.full((len(TIER_ORDER),), -1, dtype=torch.long)
    for k, i in enumerate(used):
        lut[i] = k
    return lut[tier_index]
