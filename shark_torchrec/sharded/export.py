"""Exporting a sharded compressed DLRM, each rank writing its own part, and loading it onto any
number of processes.

An export is a directory:

* ``manifest.json`` — the format, an id, the model's shape, the sharded layout (every shard's
  table, rows, columns and writer rank), each shard's rows per tier, the row alignment, the
  training sharding plan, the pruning plan, metadata, and every part's file, size and SHA-256;
* ``part-<rank>.pt`` — written by each rank in parallel (``torch.save``; read back with
  ``weights_only=True``): per shard it holds, its id map and its rows in FBGEMM's stored form per
  tier (rank 0's part also holds the data-parallel tables);
* ``dense.pt`` — the dense layers (written once, by rank 0).

:func:`load_sharded_export` rebuilds a :class:`ShardedRowwiseMixedEmbeddingBagCollection`
model on the processes that call it: the writer's number keeps each shard where it was; any
other number (1 included) places the shards anew, largest first on the least loaded rank (a
shard is never split).  Each rank reads only its shards (memory-mapped parts) and checks the
SHA-256 of every part it opens.  A missing, truncated or foreign part (another export's, or
altered) is an :class:`~shark_torchrec.export.ExportError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.models.dlrm import DLRMTrain
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor

from shark_torchrec.export import ExportError, build_dlrm, check_model_shape, check_pruning_plan, describe_dlrm
from shark_torchrec.quant.id_map import map_bytes
from shark_torchrec.quant.layout import OUTPUT_DTYPES, MixedLayout, output_dtype_name
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection
from shark_torchrec.quant.tiers import CENTROID_TIER, TIER_ORDER, Tier, sub_table_bytes
from shark_torchrec.sharded.collection import ShardedRowwiseMixedEmbeddingBagCollection, local_configs
from shark_torchrec.sharded.comm import Comm
from shark_torchrec.sharded.layout import REPLICATED, ShardedLayout, TableShard

SHARDED_EXPORT_FORMAT = "shark-torchrec/sharded-export/v1"
MANIFEST = "manifest.json"


def is_sharded_export(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ shard state
def _shard_state(collection: RowwiseMixedEmbeddingBagCollection, shard: TableShard) -> Dict[str, Any]:
    """A shard's id map and stored rows, as tensors of their own (for ``torch.save``)."""
    name = shard.name
    group = next(g for g in collection.groups if name in g.input_transform.table_base)
    transform = group.input_transform
    views = group._tbe_views()
    rows = {}
    for tier in collection.layout.tiers:
        key = f"{name}@{tier}"
        if key in views:
            w, sb = views[key]
            rows[tier] = [w.contiguous().clone(), None if sb is None else sb.contiguous().clone()]
    return {"row_map": transform.table_map(name).clone(), "map_bits": transform.table_bits[name], "rows": rows}


def _shard_counts(collection: RowwiseMixedEmbeddingBagCollection, shard: TableShard) -> List[int]:
    """The shard's renumbered rows in each :data:`TIER_ORDER` tier (FP16: its centroids too;
    SHARED: none, see :attr:`MixedLayout.shared`)."""
    counts = dict(zip(collection.layout.tiers, collection.layout.rows[shard.name]))
    return [int(counts.get(t.value, 0)) for t in TIER_ORDER]


#: The tier order of exports written before the SHARED tier (their counts lack it).
_TIERS_BEFORE_SHARED = [t.value for t in TIER_ORDER if t is not Tier.SHARED]


def _logical_counts(counts: List[int], shared: List[int]) -> List[int]:
    """Rows per tier as assigned (SHARED rows counted, centroids not) from renumbered counts."""
    out = list(counts)
    out[TIER_ORDER.index(CENTROID_TIER)] -= shared[1]
    out[TIER_ORDER.index(Tier.SHARED)] += shared[0]
    return out


def _saved_map_bits(state: Dict[str, Any]) -> int:
    """Bits per id-map entry of a saved shard: ``map_bits``; 8x ``map_bytes`` in exports
    written before entries were bit-packed (the same bytes); 32 in those written before the
    width was saved, whose maps are int32."""
    if "map_bits" in state:
        return int(state["map_bits"])
    return 32 if state["row_map"].dtype == torch.int32 else 8 * int(state["map_bytes"])


def _build_local(layout: ShardedLayout, shards: List[TableShard], counts: Dict[str, List[int]],
                 states: Dict[str, Dict[str, Any]], row_alignment: int, shared: Dict[str, List[int]]
                 ) -> Optional[RowwiseMixedEmbeddingBagCollection]:
    """A rank's local collection over ``shards``, from their saved states."""
    if not shards:
        return None
    configs = local_configs(layout, shards)
    used = [i for i in range(len(TIER_ORDER)) if any(counts[s.name][i] for s in shards)] or [0]
    mixed = MixedLayout(
        tables=[{"name": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim,
                 "features": list(c.feature_names), "pooling": c.pooling.value} for c in configs],
        tiers=[TIER_ORDER[i].value for i in used], rows={s.name: [counts[s.name][i] for i in used] for s in shards},
        is_weighted=layout.is_weighted, row_alignment=row_alignment,
        shared={s.name: list(shared[s.name]) for s in shards if s.name in shared},
        map_bits={s.name: _saved_map_bits(states[s.name]) for s in shards})
    module = RowwiseMixedEmbeddingBagCollection(mixed, check_ids=False)
    group = module.groups[0]
    views = group._tbe_views()
    for s in shards:
        state = states[s.name]
        table_map = group.input_transform.table_map(s.name)
        saved = state["row_map"].contiguous().view(torch.uint8)
        if saved.shape != table_map.shape:
            raise ExportError(f"shard {s.name!r}: its saved id map holds {saved.numel()} bytes, its layout "
                              f"{table_map.numel()}")
        table_map.copy_(saved)
        for tier, (w, sb) in state["rows"].items():
            held = views[f"{s.name}@{tier}"][0].shape[0]
            if w.shape[0] != held:
                raise ExportError(f"shard {s.name!r}: {w.shape[0]} saved {tier} rows, its layout {held}")
            group._set_weights(f"{s.name}@{tier}", (w, sb), 0, views)
    return module


# ------------------------------------------------------------------------------ export
def export_sharded(model: DLRMTrain, path: str, pruning_plan: Optional[Any] = None,
                   metadata: Optional[Dict[str, Any]] = None, plan: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model`` (a ``DLRMTrain`` whose collection is a
    :class:`ShardedRowwiseMixedEmbeddingBagCollection`) to the directory ``path``; a
    collective: every rank writes its part, rank 0 the dense layers and, last, the manifest."""
    dlrm = model.model
    collection = dlrm.sparse_arch.embedding_bag_collection
    if not isinstance(collection, ShardedRowwiseMixedEmbeddingBagCollection):
        raise TypeError(f"export_sharded expects a sharded mixed collection, got {type(collection).__name__}")
    comm, layout = collection.comm, collection.layout
    export_id = comm.all_gather_object(uuid.uuid4().hex)[0]
    os.makedirs(path, exist_ok=True)
    comm.barrier()
    mine = {}
    for s in layout.local(comm.rank):
        if s.rank == REPLICATED and comm.rank != 0:
            continue
        source = collection.replicated if s.rank == REPLICATED else collection.routed
        mine[s.name] = (_shard_state(source, s), _shard_counts(source, s), source.layout.shared.get(s.name))
    part = f"part-{comm.rank:05d}.pt"
    _atomic_save({"format": SHARDED_EXPORT_FORMAT, "export_id": export_id, "rank": comm.rank,
                  "shards": {k: v[0] for k, v in mine.items()}}, os.path.join(path, part))
    record = {"file": part, "rank": comm.rank, "shards": sorted(mine), "bytes": os.path.getsize(os.path.join(path, part)),
              "sha256": _sha256(os.path.join(path, part)), "counts": {k: v[1] for k, v in mine.items()},
              "shared": {k: v[2] for k, v in mine.items() if v[2]}}
    records = comm.all_gather_object(record)
    if comm.rank == 0:
        dense = {k: v for k, v in dlrm.state_dict().items() if not k.startswith("sparse_arch.embedding_bag_collection.")}
        _atomic_save({"format": SHARDED_EXPORT_FORMAT, "export_id": export_id, "state_dict": dense},
                     os.path.join(path, "dense.pt"))
        counts = {k: c for r in records for k, c in r["counts"].items()}
        shared = {k: c for r in records for k, c in r["shared"].items()}
        manifest = {
            "format": SHARDED_EXPORT_FORMAT, "export_id": export_id, "model": describe_dlrm(dlrm),
            "layout": layout.to_dict(), "row_alignment": collection.row_alignment, "rows_per_tier": counts,
            "output_dtype": output_dtype_name(collection.output_dtype),
            "shared": shared,
            "parts": [{k: r[k] for k in ("file", "rank", "shards", "bytes", "sha256")} for r in records],
            "dense": {"file": "dense.pt", "bytes": os.path.getsize(os.path.join(path, "dense.pt")),
                      "sha256": _sha256(os.path.join(path, "dense.pt"))},
            "tiers": [t.value for t in TIER_ORDER],
            "pruning_plan": pruning_plan.to_json() if pruning_plan is not None else "",
            "metadata": metadata or {}, "sharding_plan": plan or {},
        }
        tmp = os.path.join(path, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(path, MANIFEST))
    comm.barrier()


# ------------------------------------------------------------------------------ load
def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest of the sharded export at ``path``, checked (ExportError naming the field)."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise ExportError(f"{path}: no {MANIFEST} (not a sharded export)")
    try:
        with open(file) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != SHARDED_EXPORT_FORMAT:
        raise ExportError(f"{file}: not a shark-torchrec sharded export (format must be {SHARDED_EXPORT_FORMAT!r})")
    missing = [k for k in ("export_id", "model", "layout", "row_alignment", "rows_per_tier", "parts", "dense",
                           "tiers") if k not in m]
    if missing:
        raise ExportError(f"{file}: manifest lacks {missing}")
    if m["tiers"] == _TIERS_BEFORE_SHARED and isinstance(m["rows_per_tier"], dict):  # an earlier version's
        at = TIER_ORDER.index(Tier.SHARED)
        m["rows_per_tier"] = {k: (c[:at] + [0] + c[at:] if isinstance(c, list) else c)
                              for k, c in m["rows_per_tier"].items()}
        m["tiers"] = [t.value for t in TIER_ORDER]
    if m["tiers"] != [t.value for t in TIER_ORDER]:
        raise ExportError(f"{file}: field 'tiers' {m['tiers']} is not this version's tier order")
    shared = m.setdefault("shared", {})
    if not isinstance(shared, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x >= 0 for x in v)
            for v in shared.values()):
        raise ExportError(f"{file}: field 'shared' must map shards to [shared rows, centroids]")
    check_model_shape(file, m["model"])
    check_pruning_plan(file, m.get("pruning_plan", ""))
    try:
        layout = ShardedLayout.from_dict(m["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{file}: field 'layout' is not a valid sharded layout ({type(e).__name__}: {e})") from e
    shards = {s.name for s in layout.shards}
    in_parts = [n for p in m["parts"] for n in p["shards"]]
    if sorted(in_parts) != sorted(shards):
        raise ExportError(f"{file}: parts hold shards {sorted(in_parts)}, the layout has {sorted(shards)}")
    for name in shards:
        c = m["rows_per_tier"].get(name)
        s = next(x for x in layout.shards if x.name == name)
        n_shared, k = shared.get(name, [0, 0])
        if not isinstance(c, list) or len(c) != len(TIER_ORDER) or sum(c) != s.rows - n_shared + k:
            raise ExportError(f"{file}: field 'rows_per_tier' of shard {name!r} is {c!r} ({s.rows} rows, "
                              f"{n_shared} of them shared, {k} centroids)")
    return m


def placement(layout: ShardedLayout, world: int, rows_per_tier: Dict[str, List[int]], row_alignment: int
              ) -> ShardedLayout:
    """The layout on ``world`` ranks: the writer's when it had as many, else every shard
    placed anew, largest first on the least loaded rank (data-parallel tables stay on all)."""
    if world == layout.world_size:
        return layout

    widths = layout.map_bits(layout.shards)

    def size(s: TableShard) -> int:
        return map_bytes(s.rows, widths[s.name]) + sum(
            sub_table_bytes(t, n, s.cols, row_alignment) for t, n in zip(TIER_ORDER, rows_per_tier[s.name]))

    load = [0] * world
    moved = {}
    for s in sorted((s for s in layout.shards if s.rank != REPLICATED), key=lambda s: (-size(s), s.name)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += size(s)
        moved[s.name] = r
    shards = [dataclasses.replace(s, rank=moved.get(s.name, s.rank)) for s in layout.shards]
    return ShardedLayout(layout.tables, shards, world, layout.is_weighted)


def _read_part(path: str, record: Dict[str, Any], export_id: str, checked: set) -> Dict[str, Any]:
    file = os.path.join(path, record["file"])
    if not os.path.isfile(file):
        raise ExportError(f"{file}: part of the export is missing")
    if file not in checked:
        if os.path.getsize(file) != record["bytes"]:
            raise ExportError(f"{file}: {os.path.getsize(file)} bytes, the manifest says {record['bytes']} "
                              f"(truncated or replaced)")
        if _sha256(file) != record["sha256"]:
            raise ExportError(f"{file}: SHA-256 differs from the manifest's (altered or another export's part)")
        checked.add(file)
    with torch.serialization.safe_globals([UInt4Tensor, UInt2Tensor]):
        try:
            payload = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ExportError(f"{file}: not a readable part ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != SHARDED_EXPORT_FORMAT \
            or payload.get("export_id") != export_id:
        raise ExportError(f"{file}: a part of another export (its id differs from the manifest's)")
    return payload


def load_sharded_export(path: str, comm: Optional[Comm] = None, check_ids: bool = True
                        ) -> Tuple[DLRMTrain, Dict[str, Any]]:
    """Rebuild a sharded export on the processes that call it (a collective; one plain
    process loads it whole).  Returns ``(DLRMTrain in eval mode, info)``; ``info`` has the
    manifest's ``model``, ``pruning_plan``, ``metadata``, ``sharding_plan``, and
    ``placement`` (the layout the shards were placed by)."""
    comm = comm or Comm()
    m = read_manifest(path)
    written = ShardedLayout.from_dict(m["layout"])
    layout = placement(written, comm.world, m["rows_per_tier"], m["row_alignment"])
    where = {n: p for p in m["parts"] for n in p["shards"]}
    checked: set = set()
    payloads: Dict[str, Dict[str, Any]] = {}
    states = {}
    mine = layout.local(comm.rank)
    for s in mine:
        record = where[s.name]
        if record["file"] not in payloads:
            payloads[record["file"]] = _read_part(path, record, m["export_id"], checked)
        shard_states = payloads[record["file"]].get("shards", {})
        if s.name not in shard_states:
            raise ExportError(f"{os.path.join(path, record['file'])}: lacks shard {s.name!r}")
        states[s.name] = shard_states[s.name]
    counts = m["rows_per_tier"]
    try:
        routed = _build_local(layout, [s for s in mine if s.rank != REPLICATED], counts, states, m["row_alignment"],
                              m["shared"])
        replicated = _build_local(layout, [s for s in mine if s.rank == REPLICATED], counts, states,
                                  m["row_alignment"], m["shared"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ExportError(f"{path}: a part's shard data does not match the manifest ({type(e).__name__}: {e})") from e
    collection = ShardedRowwiseMixedEmbeddingBagCollection(layout, routed, replicated, comm, check_ids=check_ids,
                                                           row_alignment=m["row_alignment"])
    try:
        collection.output_dtype = OUTPUT_DTYPES[output_dtype_name(m.get("output_dtype", "fp32"))]
    except ValueError as e:
        raise ExportError(f"{path}: manifest field 'output_dtype': {e}") from e
    dense_file = os.path.join(path, m["dense"]["file"])
    dense = _read_part(path, m["dense"], m["export_id"], checked)
    model = DLRMTrain(build_dlrm(m["model"], collection))
    missing, unexpected = model.model.load_state_dict(dense["state_dict"], strict=False)
    if unexpected or any(not k.startswith("sparse_arch.embedding_bag_collection.") for k in missing):
        raise ExportError(f"{dense_file}: dense weights do not match the model: missing {missing}, "
                          f"unexpected {unexpected}")
    for k, v in dense["state_dict"].items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ExportError(f"{dense_file}: dense weight {k!r} is not finite")
    model.eval()
    info = {k: m.get(k) for k in ("model", "pruning_plan", "metadata", "sharding_plan", "row_alignment")}
    info["placement"] = layout
    per_table: Dict[str, List[int]] = {}
    for s in layout.shards:  # rows per tier of each table (column blocks counted once)
        if s.col_offset == 0:
            per_table[s.table] = [a + b for a, b in zip(per_table.get(s.table, [0] * len(TIER_ORDER)),
                                                        _logical_counts(counts[s.name],
                                                                        m["shared"].get(s.name, [0, 0])))]
    info["rows_per_tier"] = {t: dict(zip(m["tiers"], c)) for t, c in per_table.items()}
    return model, info
