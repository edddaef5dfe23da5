"""Compressing and serving sharded models where their shards lie.

* :class:`ShardedLayout` (:func:`collection_layout`) — every shard's table, rows, columns and
  rank, read from a ``DistributedModelParallel`` collection; each rank's shards as views.
* :func:`assign_tiers_sharded` — the tier policy of ``quantize_`` decided by each row's
  leader, with one global byte budget (all-reduced histograms).
* :class:`ShardedRowwiseMixedEmbeddingBagCollection` — the mixed tables of each rank's shards,
  served sharded: ids routed to their shards, pooled rows routed back.
* :func:`quantize_sharded`, :func:`quantize_sharded_dlrm` — the conversion, each rank on its own
  shards (no table gathered).
* :class:`Comm` — the collectives they use (none in a single process).
"""

from shark_torchrec.sharded.assign import ShardedTierAssignment, assign_tiers_sharded
from shark_torchrec.sharded.collection import ShardedRowwiseMixedEmbeddingBagCollection
from shark_torchrec.sharded.comm import Comm
from shark_torchrec.sharded.convert import (
    build_sharded_collection,
    leader_priorities,
    quantize_sharded,
    quantize_sharded_dlrm,
)
from shark_torchrec.sharded.layout import REPLICATED, RowGroup, ShardedLayout, TableShard, collection_layout

__all__ = [
    "Comm",
    "REPLICATED",
    "RowGroup",
    "ShardedLayout",
    "ShardedRowwiseMixedEmbeddingBagCollection",
    "ShardedTierAssignment",
    "TableShard",
    "assign_tiers_sharded",
    "build_sharded_collection",
    "leader_priorities",
    "collection_layout",
    "quantize_sharded",
    "quantize_sharded_dlrm",
]
