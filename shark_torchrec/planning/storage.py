"""Storage the SHARK trackers hold per rank, reserved in TorchRec's planner.

The trackers are not sharded tensors, so they are not in the planner's per-shard estimates:
:class:`RowPriority` keeps one float32 per row and channel, each rank its share of the rows, and
:class:`TaylorFieldImportance` keeps, per training step, the pooled embeddings and their
baseline (and, for ``shuffle``, the gathered global batch).  :class:`TrackerStorageReservation`
takes them off every device's capacity before the planner places tables, on top of TorchRec's
own heuristic reservation.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from torch import nn
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder
from torchrec.modules.embedding_configs import EmbeddingBagConfig


def tracker_bytes_per_rank(
    tables: Sequence[EmbeddingBagConfig],
    local_batch_size: int,
    world_size: int,
    row_priority: int = 1,
    field_importance: Optional[str] = None,
) -> Dict[str, int]:
    """``{"ddr": bytes, "hbm": bytes}`` the trackers need on each rank.

    Args:
        tables: every table of the model.
        local_batch_size: per-rank batch size.
        world_size: ranks (the ``shuffle`` baseline gathers the global batch).
        row_priority: channels of :class:`~shark_torchrec.importance.RowPriority` kept (host
            memory, sharded over the ranks; ``True`` is one, ``False`` none).
        field_importance: the :class:`~shark_torchrec.importance.TaylorFieldImportance` baseline,
            if one is attached (its per-step buffers live where the embeddings do).
    """
    from shark_torchrec.importance.row_priority import RowPriority

    width = sum(t.embedding_dim * len(t.feature_names) for t in tables)
    # each rank keeps its share of every table's rows (the larger share when they do not divide)
    share = sum(-(-t.num_embeddings // world_size) for t in tables)
    ddr = share * RowPriority.bytes_per_row * int(row_priority)
    step = 0
    if field_importance is not None:
        step = 4 * local_batch_size * width  # the pooled embeddings kept for the backward
        if field_importance in ("mean", "shuffle"):
            step += 4 * local_batch_size * width  # the baseline
        if field_importance == "shuffle":
            step += 4 * local_batch_size * world_size * width  # the gathered global batch
    return {"ddr": ddr, "hbm": step}


class TrackerStorageReservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation (the planner's default), minus the trackers' bytes on
    every device.  (A subclass, not a wrapper: the planner reads the heuristic's settings when it
    reports that a plan does not fit.)

    Args:
        tracker_bytes: ``{"ddr": ..., "hbm": ...}`` per rank (see :func:`tracker_bytes_per_rank`);
            on a CPU topology both come off DDR.
        percentage: the heuristic's extra margin (TorchRec's default 0.15).
    """

    def __init__(self, tracker_bytes: Dict[str, int], percentage: float = 0.15, **kwargs) -> None:
        super().__init__(percentage=percentage, **kwargs)
        self.tracker_bytes = dict(tracker_bytes)

    def reserve(
        self,
        topology: Topology,
        batch_size: int,
        module: nn.Module,
        sharders: List[ModuleSharder[nn.Module]],
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        **kwargs,
    ) -> Topology:
        reserved = super().reserve(topology, batch_size, module, sharders, constraints, **kwargs)
        ddr, hbm = self.tracker_bytes.get("ddr", 0), self.tracker_bytes.get("hbm", 0)
        for device in reserved.devices:
            if reserved.compute_device == "cpu":
                device.storage.ddr -= ddr + hbm
            else:
                device.storage.ddr -= ddr
                device.storage.hbm -= hbm
        self._last_reserved_topology = reserved
        return reserved
