"""Converting a sharded model's tables to row-wise mixed precision in place: each rank turns
its own shards into mixed sub-tables, and the result serves sharded
(:class:`~shark_torchrec.sharded.collection.ShardedRowwiseMixedEmbeddingBagCollection`).

No process ever holds more fp32 rows than its own shards: tiers are assigned from the shards
in place (:func:`~shark_torchrec.sharded.assign.assign_tiers_sharded`), and rows are quantized
a chunk at a time straight into FBGEMM's buffers
(:meth:`~shark_torchrec.quant.RowwiseMixedEmbeddingBagCollection.from_weights`).

    sharded_dlrm, assignment = quantize_sharded_dlrm(dmp_model, RowwiseQuantConfig(budget_fraction=0.15),
                                                     priorities=row_priority)   # a sharded RowPriority
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.models.dlrm import DLRMTrain

from shark_torchrec.export import build_dlrm, describe_dlrm
from shark_torchrec.quant.config import RowwiseQuantConfig
from shark_torchrec.quant.layout import OUTPUT_DTYPES
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection
from shark_torchrec.quant.shared_rows import SharedRows
from shark_torchrec.sharded.assign import PriorityFn, ShardedTierAssignment, assign_tiers_sharded
from shark_torchrec.sharded.collection import ShardedRowwiseMixedEmbeddingBagCollection, local_configs
from shark_torchrec.sharded.comm import Comm
from shark_torchrec.sharded.layout import REPLICATED, ShardedLayout, collection_layout


def build_sharded_collection(layout: ShardedLayout, weights: Dict[str, torch.Tensor], tiers: Dict[str, torch.Tensor],
                             row_alignment: int, comm: Comm, check_ids: bool = True,
                             device: torch.device = torch.device("cpu"),
                             shared: Optional[Dict[str, SharedRows]] = None, row_fit: str = "minmax",
                             ) -> ShardedRowwiseMixedEmbeddingBagCollection:
    """This rank's part of a sharded mixed collection, from its shards' rows and tiers
    (``{shard name: ...}``; ``shared``: the centroids of shards with SHARED rows,
    :attr:`ShardedTierAssignment.shared`; ``row_fit``: how integer rows get their scale and
    bias, :attr:`RowwiseQuantConfig.row_fit`)."""
    routed = [s for s in layout.local(comm.rank) if s.rank != REPLICATED]
    replicated = [s for s in layout.shards if s.rank == REPLICATED]

    def convert(shards):
        if not shards:
            return None
        # ids reaching a local table were checked against the whole table by the sharded
        # collection; they are rows of the shard by construction.
        return RowwiseMixedEmbeddingBagCollection.from_weights(
            local_configs(layout, shards), {s.name: weights[s.name] for s in shards},
            {s.name: tiers[s.name] for s in shards}, is_weighted=layout.is_weighted,
            row_alignment=row_alignment, device=device, check_ids=False,
            shared={s.name: shared[s.name] for s in shards if s.name in (shared or {})},
            map_bits=layout.map_bits(shards), row_fit=row_fit)

    return ShardedRowwiseMixedEmbeddingBagCollection(layout, convert(routed), convert(replicated), comm,
                                                     check_ids=check_ids, row_alignment=row_alignment)


def leader_priorities(layout: ShardedLayout, source: Any, comm: Comm, mix: Optional[Dict[str, float]] = None
                      ) -> PriorityFn:
    """The priorities of the rows this rank decides, asked of ``source`` (a sharded
    :class:`~shark_torchrec.importance.RowPriority`: anything with ``rows(requests, mix)``) in
    one collective, as a :data:`PriorityFn`."""
    requests = layout.led_by(comm.rank)
    got = dict(zip(((t, r0) for t, r0, _ in requests), source.rows(requests, mix)))
    return lambda t, r0, n: got[(t, r0)]


def quantize_sharded(ebc: nn.Module, config: RowwiseQuantConfig, priorities: Any = None,
                     comm: Optional[Comm] = None, check_ids: bool = True,
                     ) -> Tuple[ShardedRowwiseMixedEmbeddingBagCollection, ShardedTierAssignment]:
    """A sharded mixed collection from a ``DistributedModelParallel``-sharded
    ``EmbeddingBagCollection`` (a collective: every rank calls it).

    Args:
        ebc: the sharded collection (``ShardedEmbeddingBagCollection``).
        config: the tier policy (as for ``quantize_``; the budget covers all ranks).
        priorities: a sharded ``RowPriority`` (each rank gets the rows it decides), or
            ``priorities(table, row_offset, rows)`` for the rows this rank decides (default:
            all rows equal).
        comm: the process group (default: the world).
    """
    comm = comm or Comm()
    layout, weights = collection_layout(ebc, comm.rank, comm.world)
    weights = {k: v.detach() for k, v in weights.items()}
    if priorities is not None and hasattr(priorities, "rows"):
        priorities = leader_priorities(layout, priorities, comm)
    assignment = assign_tiers_sharded(layout, weights, config, priorities, comm)
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    mixed = build_sharded_collection(layout, weights, assignment.tiers, config.row_alignment, comm,
                                     check_ids, device, assignment.shared, config.row_fit)
    mixed.output_dtype = OUTPUT_DTYPES[config.output_dtype]
    return mixed, assignment


def dense_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A (DMP-wrapped) model's replicated state: everything but its embedding tables, keys
    without DMP's ``module.`` prefix."""
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor) or ".embedding_bags." in key:
            continue
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def quantize_sharded_dlrm(model: nn.Module, config: RowwiseQuantConfig, priorities: Any = None,
                          comm: Optional[Comm] = None, check_ids: bool = True,
                          ) -> Tuple[DLRMTrain, ShardedTierAssignment]:
    """A TorchRec ``DLRMTrain`` for inference whose collection is the sharded mixed conversion
    of ``model``'s (a DMP-wrapped ``DLRMTrain``), its dense layers copied (a collective).
    The DMP model is left as it was."""
    dlrm = model.module.model if hasattr(model, "module") else model.model
    mixed, assignment = quantize_sharded(dlrm.sparse_arch.embedding_bag_collection, config, priorities, comm,
                                         check_ids)
    new = DLRMTrain(build_dlrm(describe_dlrm(dlrm), mixed))
    missing, unexpected = new.load_state_dict(dense_state(model), strict=False)
    collection = "model.sparse_arch.embedding_bag_collection."
    if unexpected or any(not k.startswith(collection) for k in missing):
        raise RuntimeError(f"dense state mismatch: missing {missing}, unexpected {unexpected}")
    new.eval()
    return new, assignment
