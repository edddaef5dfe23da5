"""A row-wise mixed-precision ``EmbeddingBagCollection`` on TorchRec's quantized collection.

Each logical table is stored as one physical TorchRec table per tier it uses
(``"<table>@<tier>"``, with that tier's ``data_type``) inside a TorchRec quantized
``EmbeddingBagCollection`` — one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen`` holds all
tiers of a group of tables (:mod:`~shark_torchrec.quant.layout`).  Rows are renumbered so that
each tier's rows are contiguous (``perm = argsort(tier, stable)``), and a bit-packed id map (the
bits a table's rows need, :mod:`~shark_torchrec.quant.id_map`) gives every id its renumbered row.

A forward on CPU is one call of a fused kernel (:mod:`~shark_torchrec.quant.cpu_kernel`): id
map, tier, lookup in the TBE's own buffer and pooling in one pass over the ids, each bag
written once into the output; large batches are split by bags over the torch threads.  On
CUDA, for a sharded collection, for inputs already split by tier, and where the kernel cannot
be built, the ids are split by tier with FBGEMM's ``block_bucketize_sparse_features``
(:mod:`~shark_torchrec.quant.remap`) and read with FBGEMM's TBE op
(:mod:`~shark_torchrec.quant.lookup`).

DROP rows have no physical row: they read as zeros (and a MEAN bag still counts them).  SHARED
rows have none either: their id-map entries point at their table's centroids, stored after its
own FP16 rows (:mod:`~shark_torchrec.quant.shared_rows`), so both lookups read them unchanged.  The
output is the ``KeyedTensor`` a float ``EmbeddingBagCollection`` with the same tables returns:
same keys, dims and order (a feature several tables read gives one output per table, named
``"<feature>@<table>"`` as TorchRec names it); like it, the collection ignores input features no table serves
(``strict=True``: a ``KeyError`` naming them).  Saving and loading:
:mod:`~shark_torchrec.quant.serialization`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.fx import _symbolic_trace as _fx_trace
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from shark_torchrec.quant import serialization
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.quant.layout import LAYOUT_FORMAT, OUTPUT_DTYPES, MixedLayout, output_dtype_name
from shark_torchrec.quant.lookup import _MixedGroup
from shark_torchrec.quant.remap import (
    MixedInputTransform,
    RowwiseInputTransform,
    check_features,
    contiguous_jagged,
    jagged_error,
    select_features,
    split_features,
    without_weights,
)
from shark_torchrec.quant.rows import check_cuda_scale, dequantize_rows, quantize_rows, unpack_rows
from shark_torchrec.quant.shared_rows import SharedRows
from shark_torchrec.quant.tiers import TIER_ORDER, Tier, TierAssignment, check_row_fit

__all__ = [
    "LAYOUT_FORMAT",
    "MixedInputTransform",
    "MixedLayout",
    "RowwiseInputTransform",
    "RowwiseMixedEmbeddingBagCollection",
    "dequantize_rows",
    "quantize_rows",
    "unpack_rows",
]

# Ids per thread below which splitting a batch over threads does not pay: handing a part to a
# pool thread costs tens of microseconds, a thread reads ~100 ids in that time (BENCHMARKS.md,
# lookup section).
IDS_PER_THREAD = 16_384
# Rows quantized at a time while converting (16 MiB of fp32 at dim 64).
_QUANTIZE_ROWS = 65_536


def _quantize_into(c: EmbeddingBagConfig, w: torch.Tensor, tiers: torch.Tensor, counts: torch.Tensor, group,
                   row_fit: str = "minmax") -> None:
    """Write a table's rows into its sub-tables (integer rows with the row fit ``row_fit``)
    and its id map with the CPU kernel; raise naming the first row holding NaN/Inf."""
    transform = group.input_transform
    tier_start = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), counts[:-1]]), 0)
    weights = w.detach()
    if weights.dtype != torch.float32 or weights.stride(-1) != 1:
        weights = weights.float().contiguous()
    bad = torch.ops.shark_torchrec.quantize_into(
        weights, tiers.to(torch.int8).contiguous(), group.table_sub_meta(c.name), tier_start,
        group.weight_buffer(), transform.table_map(c.name), transform.table_bits[c.name], row_fit == "lsq")
    if bad >= 0:
        raise ValueError(f"table {c.name!r}: row {bad} {_unstorable(w[bad], TIER_ORDER[int(tiers[bad])])}")


def _unstorable(row: torch.Tensor, tier: Tier) -> str:
    """Why ``row`` could not be stored in ``tier``: the end of the error naming it."""
    r = row.detach().float()
    if not bool(torch.isfinite(r).all()):
        return "has NaN/Inf weights"
    return (f"holds {float(r.abs().max()):g}, beyond FP16's range (+-65504): its tier {tier.value} cannot store it "
            "(an FP16 row, or an integer row's fp16 scale or bias, would read as inf or NaN); store it fp32")


def _check_finite(table: str, w: torch.Tensor) -> None:
    """Raise naming the first row of ``w`` that holds a NaN or an infinity (read in chunks)."""
    for r0 in range(0, w.shape[0], _QUANTIZE_ROWS):
        chunk = w[r0:r0 + _QUANTIZE_ROWS]
        if chunk.numel() == 0:
            continue
        lo, hi = torch.aminmax(chunk)  # NaN propagates: one cheap pass while all is well
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            bad = ~torch.isfinite(chunk).all(1)
            raise ValueError(f"table {table!r}: row {r0 + int(bad.nonzero()[0])} has NaN/Inf weights")


def _check_storable(table: str, tier: Tier, rows: torch.Tensor, picked: torch.Tensor, data) -> None:
    """Raise naming the first of ``rows`` (their weights ``picked``) whose stored form
    (``quantize_rows``' ``data``) reads back non-finite (a finite row beyond FP16's range)."""
    q, scale_bias = data
    if tier is Tier.FP16:
        bad = ~torch.isfinite(q.view(torch.float16)).all(1)
    elif scale_bias is not None:
        bad = ~torch.isfinite(scale_bias.view(torch.float16)).all(1)
    else:
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"table {table!r}: row {int(rows[i])} {_unstorable(picked[i], tier)}")


_FP16 = TIER_ORDER.index(Tier.FP16)
_SHARED = TIER_ORDER.index(Tier.SHARED)


def _quantize_python(configs, weights, tiers, physical, used, group_of, device, row_fit: str = "minmax") -> None:
    """:func:`_quantize_into` in torch and FBGEMM's quantizers (CUDA, or no kernel built)."""
    views = {id(g): g._tbe_views() for g in set(group_of.values())}
    for c in configs:
        _check_finite(c.name, weights[c.name])
        group = group_of[c.name]
        t, w = tiers[c.name], weights[c.name]
        start = 0  # renumbered rows: tier by tier, in row order within a tier
        for i in used:
            tier = TIER_ORDER[i]
            rows = (t == i).nonzero().squeeze(1)
            n = rows.numel()
            if n:
                group.input_transform.set_map_entries(c.name, rows, torch.arange(start, start + n))
            if n and tier is not Tier.DROP:
                # index_select into one buffer: 4-8x faster than w[rows] here
                buf = torch.empty(min(n, _QUANTIZE_ROWS), c.embedding_dim, dtype=w.dtype, device=w.device)
                for r0 in range(0, n, _QUANTIZE_ROWS):
                    chunk = rows[r0:r0 + _QUANTIZE_ROWS]
                    picked = torch.index_select(w, 0, chunk.to(w.device), out=buf[:chunk.numel()])
                    data = quantize_rows(picked.cpu(), tier, row_fit)
                    _check_storable(c.name, tier, chunk, picked, data)
                    if device.type == "cuda" and data[1] is not None:
                        check_cuda_scale(c.name, data[1], chunk)
                    group._set_weights(f"{c.name}@{tier.value}", data, r0, views[id(group)])
            start += int(physical[c.name][i])  # (FP16: its rows, then the centroids)


def _place_centroids(name: str, tiers: torch.Tensor, counts: torch.Tensor, physical: torch.Tensor,
                     shared: SharedRows, group) -> None:
    """Write a table's centroids after its own FP16 rows, and point its SHARED rows' id-map
    entries at them."""
    own = int(counts[_FP16])
    group._set_weights(f"{name}@{Tier.FP16.value}", quantize_rows(shared.centroids, Tier.FP16), own)
    first = int(physical[:_FP16].sum()) + own  # renumbered row of centroid 0
    rows = (tiers == _SHARED).nonzero().squeeze(1)
    group.input_transform.set_map_entries(name, rows, first + shared.index[rows].long())


@torch.fx.wrap
def _fused_lookup(features: KeyedJaggedTensor, order: List[str],
                  calls: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                  width: int, check: bool, weighted: bool, strict: bool, tables: Dict[str, List[Tuple[str, int]]],
                  out_dtype: torch.dtype) -> torch.Tensor:
    """The mixed collection's CPU forward as one function of its input and tensors: a leaf of
    ``torch.fx`` graphs (registered with ``torch.fx.wrap``), so a traced model calls it as the
    eager forward runs it: the input checks (:func:`~shark_torchrec.quant.remap.jagged_error`),
    per-id weights ignored by an unweighted collection, the input's features put in ``order``
    (others ignored, or a ``KeyError`` with ``strict``), then ``calls`` of the fused kernel
    (built for that order: key slots, id map, feature, tier and sub-table metadata, weight
    buffer) over every bag, ids checked with ``check`` (``tables``: each feature's tables and
    rows, for the error).  Written in TorchScript's subset: a traced model scripts with
    ``torch.jit.script``, as TorchRec's inference path serves one."""
    message = jagged_error(features, weighted)
    if message is not None:
        raise ValueError(f"RowwiseMixedEmbeddingBagCollection: {message}")
    features = contiguous_jagged(features)
    if not weighted:
        features = without_weights(features)
    features = select_features(features, order, strict)
    B = features.stride()
    out = torch.empty([B, width])
    if B > 0:
        values, offsets = features.values(), features.offsets()
        weights = features.weights_or_none()
        if weights is not None and weights.dtype != torch.float32:
            weights = weights.float()
        bad = -1
        for c in calls:
            bad = max(bad, torch.ops.shark_torchrec.mixed_embedding_bag(
                values, offsets, weights, c[0], c[1], c[2], c[3], c[4], c[5], out, 0, B, check))
        if bad >= 0:
            ends = torch.cumsum(torch.tensor(features.length_per_key()), 0)
            f = order[int(torch.searchsorted(ends, torch.tensor(bad), right=True))]
            i = int(values[bad])
            table, rows = tables[f][0]
            for t, n in tables[f]:
                if i < 0 or i >= n:
                    table, rows = t, n
                    break
            raise ValueError(f"feature '{f}': id {i} is outside table '{table}' ({rows} rows)")
    return out if out_dtype == torch.float32 else out.to(out_dtype)


class RowwiseMixedEmbeddingBagCollection(nn.Module):
    """Row-wise mixed-precision replacement for a TorchRec ``EmbeddingBagCollection``.

    Takes the ``KeyedJaggedTensor`` the float collection takes (or the output of
    :attr:`input_transform`) and returns the ``KeyedTensor`` it returns: same keys, dims, order.
    Build it with :meth:`from_float` (a float collection and a :class:`TierAssignment`),
    :meth:`from_state_dict` or :meth:`load` (no float model needed).

    Threads (CPU): a batch of at least ``2 * IDS_PER_THREAD`` ids is split by bags into up to
    ``torch.get_num_threads()`` parts, read in parallel (the kernel releases the GIL) into one
    output.  On the FBGEMM path, table groups run in parallel threads instead.

    Args:
        layout: tables, tiers in use, rows per tier and table groups (one TBE each).
        device: where the weights live (``cpu``: FBGEMM HOST tables; ``cuda``: DEVICE).
        check_ids: raise on ids outside a table (naming the feature and the id); with
            ``False`` invalid ids give undefined results.  On CUDA the check is the forward's
            only host synchronisation.
        strict: raise on input features no table serves (naming them); by default they are
            ignored, as TorchRec's collections do.

    Attributes:
        use_cpu_kernel: read CPU inputs with the fused kernel when it is available (default);
            ``False`` forces FBGEMM's bucketize + TBE path (benchmarks compare the two).
    """

    def __init__(self, layout: MixedLayout, device: torch.device = torch.device("cpu"),
                 check_ids: bool = True, strict: bool = False) -> None:
        super().__init__()
        names = [t["name"] for t in layout.tables]
        grouped = [n for g in layout.groups for n in g]
        if sorted(grouped) != sorted(names) or len(grouped) != len(names):
            raise ValueError(f"layout groups {layout.groups} must cover the tables {names} once")
        order = {n: i for i, n in enumerate(names)}
        if [order[n] for n in grouped] != sorted(order[n] for n in grouped):
            raise ValueError("layout groups must keep the tables' order")
        if torch.device(device).type == "cuda" and layout.row_alignment != 16:
            raise ValueError(f"row_alignment {layout.row_alignment} is for tables served on CPU: "
                             f"FBGEMM's CUDA kernels read rows aligned to 16 bytes (convert with "
                             f"row_alignment=16 to serve on a GPU)")
        self.layout = layout
        self.check_ids = check_ids
        self.strict = strict
        self.use_cpu_kernel = True
        self._device = torch.device(device)
        self.groups = nn.ModuleList([_MixedGroup(layout.subset(g), device=device, check_ids=check_ids,
                                                 strict=strict) for g in layout.groups])
        self.input_transform = MixedInputTransform([g.input_transform for g in self.groups], strict=strict)
        # State-dict names (quant/serialization.py): TorchRec's, each id map once.
        self._register_state_dict_hook(RowwiseMixedEmbeddingBagCollection._public_state_hook)
        self._register_load_state_dict_pre_hook(RowwiseMixedEmbeddingBagCollection._internal_state_hook,
                                                with_module=True)
        self._configs = layout.configs()
        # Output keys (TorchRec's embedding names: "<feature>@<table>" for a feature several
        # tables read) and the input feature each one reads.
        self._features = [e for e, _, _ in layout.slots()]
        self._input_features = [f for _, f, _ in layout.slots()]
        self._dims = [c.embedding_dim for _, _, c in layout.slots()]
        self._width = sum(self._dims)
        self._out_dtype = OUTPUT_DTYPES[layout.output_dtype]  # (a load keeps the layout: checked)
        self._sizes = [len(g.input_transform.features) for g in self.groups]
        self._transformed_sizes = [len(g.input_transform.output_keys) for g in self.groups]
        self._columns = [sum(g._out_offsets[-1] for g in self.groups[:i]) for i in range(len(self.groups))]
        # Per input key layout: (groups, their kernel_state(), the kernel's inputs per group).
        self._kernel_plans: Dict[Tuple[str, ...], tuple] = {}
        self._pool: Optional[ThreadPoolExecutor] = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"] = None  # threads do not pickle
        return state

    # ------------------------------------------------------------------ construction
    @staticmethod
    @torch.no_grad()
    def from_float(ebc: EmbeddingBagCollection, assignment: TierAssignment, check_ids: bool = True,
                   num_groups: Optional[int] = None, strict: bool = False, output_dtype="fp32",
                   ) -> "RowwiseMixedEmbeddingBagCollection":
        """Convert a float collection; every table must have a tier per row in ``assignment``.
        NaN/Inf weights raise an error naming the table and row.

        Args:
            num_groups: table groups, each its own TBE (default 1: the fused CPU kernel splits
                work over threads by bags, so more TBEs only add calls).
            strict: see the class.
            output_dtype: ``"fp32"`` or ``"fp16"``: the dtype of the pooled embeddings returned.
        """
        configs = ebc.embedding_bag_configs()
        missing = [c.name for c in configs if c.name not in assignment.tiers]
        if missing:
            raise ValueError(f"no tier assignment for tables {missing}")
        return RowwiseMixedEmbeddingBagCollection.from_weights(
            configs, {c.name: ebc.embedding_bags[c.name].weight for c in configs}, assignment.tiers,
            is_weighted=ebc.is_weighted(), row_alignment=assignment.row_alignment,
            device=next(iter(ebc.parameters())).device, check_ids=check_ids, num_groups=num_groups,
            strict=strict, shared=assignment.shared, output_dtype=output_dtype, row_fit=assignment.row_fit)

    @staticmethod
    @torch.no_grad()
    def from_weights(configs: Sequence[EmbeddingBagConfig], weights: Mapping[str, torch.Tensor],
                     tiers: Mapping[str, torch.Tensor], is_weighted: bool = False,
                     row_alignment: int = 16, device: torch.device = torch.device("cpu"),
                     check_ids: bool = True, num_groups: Optional[int] = None, strict: bool = False,
                     shared: Optional[Mapping[str, SharedRows]] = None, output_dtype="fp32",
                     map_bits: Optional[Mapping[str, int]] = None, row_fit: str = "minmax",
                     ) -> "RowwiseMixedEmbeddingBagCollection":
        """Build from tables' float rows and their tiers (:data:`TIER_ORDER` indices per row):
        ``weights[name]`` may be any [rows, dim] view (a sharded model's local shard, a column
        block).  Rows are quantized in chunks straight into FBGEMM's buffers, so no copy of a
        table is made (memory: the quantized tables, the id map, and a chunk).
        ``shared[name]``: the centroids of a table with SHARED rows (and each row's centroid).
        ``map_bits[name]``: its id-map entries' width in bits (default: what its rows need; a
        shard takes its whole table's, :attr:`MixedLayout.map_bits`).  ``row_fit``: how integer rows
        get their scale and bias (:mod:`~shark_torchrec.quant.rows`).
        NaN/Inf weights raise an error naming the table and row."""
        check_row_fit(row_fit)
        device = torch.device(device)
        shared = dict(shared or {})
        num_groups = max(1, min(num_groups or 1, len(configs)))
        for c in configs:
            t = tiers[c.name]
            w = weights[c.name]
            if t.numel() != c.num_embeddings or tuple(w.shape) != (c.num_embeddings, c.embedding_dim):
                raise ValueError(f"table {c.name!r}: {t.numel()} tiers and weights {tuple(w.shape)} "
                                 f"for {c.num_embeddings} rows of dim {c.embedding_dim}")
            outside = (t.long() < 0) | (t.long() >= len(TIER_ORDER))
            if bool(outside.any()):
                row = int(outside.nonzero()[0])
                raise ValueError(f"table {c.name!r}: row {row} has tier index {int(t[row])}, not one of "
                                 f"TIER_ORDER (0..{len(TIER_ORDER) - 1})")
        counts = {c.name: torch.bincount(tiers[c.name].long(), minlength=len(TIER_ORDER)) for c in configs}
        # Renumbered rows per tier: SHARED rows have none, their centroids follow the FP16 rows.
        physical = {}
        for c in configs:
            n = counts[c.name].clone()
            if int(n[_SHARED]) > 0:
                s = shared.get(c.name)
                if s is None or s.index.numel() != c.num_embeddings or s.centroids.shape[1:] != (c.embedding_dim,):
                    raise ValueError(f"table {c.name!r}: {int(n[_SHARED])} SHARED rows need its centroids "
                                     f"(SharedRows with an index for each of its {c.num_embeddings} rows)")
                index = s.index.long()[tiers[c.name].long() == _SHARED]
                if bool(((index < 0) | (index >= s.k)).any()):  # (it would read another tier's row)
                    raise ValueError(f"table {c.name!r}: a SHARED row's centroid index "
                                     f"{int(index[(index < 0) | (index >= s.k)][0])} is outside its {s.k} centroids")
                if not bool(torch.isfinite(s.centroids).all()):
                    raise ValueError(f"table {c.name!r}: its centroids are not finite")
                n[_FP16] += s.k
                n[_SHARED] = 0
            physical[c.name] = n
        used = [i for i in range(len(TIER_ORDER)) if any(int(n[i]) for n in physical.values())] or [0]
        names = [c.name for c in configs]
        bounds = [round(i * len(names) / num_groups) for i in range(num_groups + 1)]
        layout = MixedLayout(
            tables=[{"name": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim,
                     "features": list(c.feature_names), "pooling": c.pooling.value} for c in configs],
            tiers=[TIER_ORDER[i].value for i in used],
            rows={c.name: [int(physical[c.name][i]) for i in used] for c in configs},
            is_weighted=is_weighted, groups=[names[bounds[i]:bounds[i + 1]] for i in range(num_groups)],
            row_alignment=row_alignment,
            shared={c.name: [int(counts[c.name][_SHARED]), shared[c.name].k] for c in configs
                    if int(counts[c.name][_SHARED]) > 0},
            output_dtype=output_dtype_name(output_dtype), map_bits=dict(map_bits or {}))
        module = RowwiseMixedEmbeddingBagCollection(layout, device=device, check_ids=check_ids, strict=strict)
        if device.type == "meta":  # the structure only, as TorchRec converts a meta collection
            return module
        group_of = {n: g for g in module.groups for n in g.input_transform.table_base}
        if device.type == "cpu" and cpu_kernel_available():
            for c in configs:  # one streaming pass per table (csrc/quantize_rows.cpp)
                _quantize_into(c, weights[c.name], tiers[c.name], physical[c.name], group_of[c.name], row_fit)
        else:
            _quantize_python(configs, weights, tiers, physical, used, group_of, device, row_fit)
        for name in layout.shared:
            _place_centroids(name, tiers[name], counts[name], physical[name], shared[name], group_of[name])
        return module

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> torch.Tensor:
        return serialization.encode_layout(self.layout)

    def set_extra_state(self, state) -> None:
        serialization.check_extra_state(self.layout, state)

    @staticmethod
    def _public_state_hook(module, state_dict, prefix, local_metadata) -> None:
        serialization.public_names(module.groups, module.layout, state_dict, prefix)

    @staticmethod
    def _internal_state_hook(module, state_dict, prefix, *args) -> None:
        serialization.internal_names(module.groups, module.layout, state_dict, prefix)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, copying into the tensors the lookups read.
        ``assign=True`` is refused: it would swap the id map for the loaded one while the rows
        stay in FBGEMM's weight buffer (TorchRec's quantized collection serves its weights as
        views of that buffer), so ids would read the old model's rows."""
        if assign:
            raise ValueError("RowwiseMixedEmbeddingBagCollection.load_state_dict: assign=True is not "
                             "supported (the rows live in FBGEMM's weight buffer, which an assigned "
                             "state would not replace); load with assign=False, or build a new "
                             "module with from_state_dict()")
        return super().load_state_dict(state_dict, strict=strict)

    def save(self, path: str) -> None:
        """Write ``state_dict()`` to ``path`` (read it back with :meth:`load`)."""
        torch.save(self.state_dict(), path)

    @staticmethod
    def load(path: str, device: torch.device = torch.device("cpu"), check_ids: bool = True,
             strict: bool = False) -> "RowwiseMixedEmbeddingBagCollection":
        """Rebuild from a file written by :meth:`save`, with ``torch.load(weights_only=True)``:
        plain tensors and containers, plus TorchRec's packed 4-/2-bit tensor types, and no
        other pickled object."""
        return RowwiseMixedEmbeddingBagCollection.from_state_dict(
            serialization.read_state(path), device, check_ids, strict)

    @staticmethod
    def from_state_dict(state: Dict[str, torch.Tensor], device: torch.device = torch.device("cpu"),
                        check_ids: bool = True, strict: bool = False,
                        ) -> "RowwiseMixedEmbeddingBagCollection":
        """Rebuild from ``module.state_dict()`` alone (no float model needed)."""
        module = RowwiseMixedEmbeddingBagCollection(serialization.layout_of(state), device=device,
                                                    check_ids=check_ids, strict=strict)
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
        """The tables, as TorchRec's collections report them, each with the ``data_type`` of
        its rows: its one tier's, or for a mixed table its most precise tier's
        (:func:`~shark_torchrec.quant.layout.reported_data_type`)."""
        return self.layout.reported_configs()

    # ------------------------------------------------------------------ forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of ``features``: the collection's own features (others are
        ignored, or raise with ``strict``), or the output of :attr:`input_transform` (already
        split by tier, e.g. in data-loader workers).

        Ids must be int32/int64 and lengths non-negative, adding up to the ids given (else a
        ``ValueError`` says what is wrong).  Like TorchRec's collections, an unweighted
        collection ignores per-id weights in its input."""
        # (torch.fx's own flag: its is_fx_tracing() logs a warning on every call)
        if _fx_trace._is_fx_tracing_flag and not torch.compiler.is_compiling():
            return self._traced_forward(features)
        features = self._checked(features)
        calls = self._kernel_calls(features)
        if calls is not None:
            values = self._forward_kernel(features, calls)
        elif features.keys() == self.input_transform.output_keys:
            parts = [features] if len(self.groups) == 1 else features.split(self._transformed_sizes)
            values = self._run_groups(parts, transformed=True)
        else:
            parts = split_features(features, self._input_features, self._sizes, self.strict)
            values = self._run_groups(parts, transformed=False)
        if values.dtype != self._out_dtype:
            values = values.to(self._out_dtype)
        return KeyedTensor(keys=list(self._features), length_per_key=list(self._dims), values=values)

    def pooled_into(self, features: KeyedJaggedTensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`forward`'s values written into ``out`` [B, width] (a contiguous float
        tensor, e.g. a slice of a larger buffer; the fused CPU kernel writes it in place)."""
        features = self._checked(features)
        if tuple(out.shape) != (features.stride(), self._width):  # (the kernel wrote part of a wider one)
            raise ValueError(f"{type(self).__name__}.pooled_into: out must be [{features.stride()}, {self._width}] "
                             f"(batch size, width), got {list(out.shape)}")
        calls = self._kernel_calls(features)
        if (calls is not None and out.is_contiguous() and out.dtype == torch.float32
                and self._out_dtype == torch.float32):
            return self._forward_kernel(features, calls, out)
        return out.copy_(self(features).values())

    def _checked(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` after :func:`jagged_error`'s checks, without weights when the collection
        is unweighted (TorchRec's collections ignore them; the kernels would apply them)."""
        message = jagged_error(features, self.layout.is_weighted)
        if message is not None:
            raise ValueError(f"{type(self).__name__}: {message}")
        features = contiguous_jagged(features)
        return features if self.layout.is_weighted else without_weights(features)

    def _kernel_calls(self, features: KeyedJaggedTensor) -> Optional[List[tuple]]:
        """The fused kernel's calls, each its inputs after the ids and offsets (the group's
        slot each input key fills, id map, metadata, weight buffer), or None where the kernel
        does not apply: CUDA, ``use_cpu_kernel`` off, inputs already split by tier, a sharded
        group, no kernel built.  One call per group, or more where one input feature fills
        several slots of a group (a feature several tables read): call ``r`` fills each key's
        ``r``-th slot, so together the calls write every output column.

        Built once per input key layout and kept while the groups' tensors stay the same
        objects (:meth:`_MixedGroup.kernel_state`): on the small batches of a served model the
        forward is 1.17x faster for it (BENCHMARKS.md, lookup section)."""
        if not self.use_cpu_kernel or features.values().is_cuda:
            return None
        return self._kernel_calls_for(features.keys())

    def _kernel_calls_for(self, keys: List[str]) -> Optional[List[tuple]]:
        """:meth:`_kernel_calls` for inputs with these keys, in this order."""
        entry = self._kernel_plans.get(tuple(keys))
        groups = self._modules["groups"]
        if entry is not None and entry[0] is groups and all(
                a is b for g, state in zip(groups, entry[1]) for a, b in zip(g.kernel_state(), state)):
            return entry[2]
        if not (self._device.type == "cpu" and keys != self.input_transform.output_keys
                and all(g.qebc is None or type(g.qebc) is QuantEmbeddingBagCollection for g in groups)
                and cpu_kernel_available()):
            return None
        check_features(keys, self._input_features, self.strict)
        calls = []
        for i, g in enumerate(groups):
            slots_of: Dict[str, List[int]] = {}
            for j, f in enumerate(g.input_transform.features):
                slots_of.setdefault(f, []).append(j)
            filled = []
            for r in range(max(len(v) for v in slots_of.values())):
                key_slot = [slots_of[k][r] if len(slots_of.get(k, ())) > r else -1 for k in keys]
                filled += [j for j in key_slot if j >= 0]
                calls.append((torch.tensor(key_slot, dtype=torch.long), g.input_transform.row_map,
                              *g.kernel_tensors(self._columns[i]), g.weight_buffer()))
            # The output is allocated uninitialised: every slot must be written exactly once.
            if sorted(filled) != list(range(len(g.input_transform.features))):
                raise RuntimeError(f"internal: kernel calls fill slots {sorted(filled)} of "
                                   f"{g.input_transform.slots}")
        if len(self._kernel_plans) > 64:  # inputs come in few key layouts; bound the cache
            self._kernel_plans.clear()
        self._kernel_plans[tuple(keys)] = (groups, [g.kernel_state() for g in groups], calls)
        return calls

    def _traced_forward(self, features) -> KeyedTensor:
        """The forward as ``torch.fx`` records it: one leaf call (:func:`_fused_lookup`, the
        checks, the key order and the fused kernel; the module's tensors become the graph's
        attributes) and TorchRec's ``KeyedTensor`` around its output, so that a model holding
        the collection traces whole and its graph gives the eager forward's output."""
        order = list(dict.fromkeys(self._input_features))  # each input feature once, slot order
        calls = self._kernel_calls_for(order) if self._device.type == "cpu" else None
        if calls is None:
            raise RuntimeError(f"{type(self).__name__}: tracing with torch.fx needs the fused CPU kernel "
                               "(a CPU collection whose kernel builds); the FBGEMM path does not trace yet")
        tables = {f: [(c.name, c.num_embeddings) for _, g, c in self.layout.slots() if g == f] for f in order}
        values = _fused_lookup(features, order, calls, self._width, self.check_ids, self.layout.is_weighted,
                               self.strict, tables, self._out_dtype)
        return KeyedTensor(keys=list(self._features), length_per_key=list(self._dims), values=values)

    def _thread_pool(self, workers: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool._max_workers < workers:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rowwise-mixed")
        return self._pool

    def _run_groups(self, parts: List[KeyedJaggedTensor], transformed: bool) -> torch.Tensor:
        """FBGEMM path: each group's bucketize + TBE, groups in parallel threads."""
        if len(self.groups) == 1:
            return self.groups[0](parts[0], transformed)
        pool = self._thread_pool(len(self.groups))
        futures = [pool.submit(g, p, transformed) for g, p in zip(self.groups, parts)]
        return torch.cat([f.result() for f in futures], dim=1)

    def _forward_kernel(self, features: KeyedJaggedTensor, calls: List[tuple],
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """CPU: every group's features read by the fused kernel straight from the input ids
        into one output (no split of the input, no per-tier outputs to add up)."""
        B = features.stride()
        if out is None:
            out = torch.empty(B, self._width)
        if B == 0:
            return out
        values, offsets = features.values(), features.offsets()
        weights = features.weights_or_none()
        if weights is not None and weights.dtype != torch.float32:
            weights = weights.float()
        op = torch.ops.shark_torchrec.mixed_embedding_bag
        check = self.check_ids

        def read(b0: int, b1: int) -> int:
            bad = -1
            for c in calls:
                bad = max(bad, op(values, offsets, weights, *c, out, b0, b1, check))
            return bad

        parts = min(torch.get_num_threads(), values.numel() // IDS_PER_THREAD, B)
        if parts <= 1:
            bad = read(0, B)
        else:
            bounds = [B * i // parts for i in range(parts + 1)]
            pool = self._thread_pool(parts)
            futures = [pool.submit(read, bounds[i], bounds[i + 1]) for i in range(parts)]
            bad = max(f.result() for f in futures)
        if bad >= 0:
            self._raise_bad_id(features, bad)
        return out

    def _raise_bad_id(self, features: KeyedJaggedTensor, position: int) -> None:
        """The error naming the feature of the id at ``position`` of the input's values and
        the table it is outside of."""
        ends = torch.cumsum(torch.tensor(features.length_per_key()), 0)
        f = features.keys()[int(torch.searchsorted(ends, position, right=True))]
        ids = features.values()[position : position + 1]
        for g in self.groups:
            g.input_transform.raise_if_outside(f, ids)
        raise RuntimeError(f"internal: the CPU kernel flagged id {int(ids)} of feature {f!r}, "
                           f"which is inside every table that reads it")


# torch.fx writes a traced module's forward signature from these annotations: the classes
# themselves, not the strings `from __future__ import annotations` leaves, so that a traced
# collection scripts with torch.jit.script.
RowwiseMixedEmbeddingBagCollection.forward.__annotations__.update({"features": KeyedJaggedTensor,
                                                                   "return": KeyedTensor})
