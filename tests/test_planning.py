"""Planning-only checks (no process group; plans for topologies this machine does not have,
as TorchRec's own planner tests do)."""

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError
from torch import nn

from shark_torchrec.planning import (
    AllShardingTypesEBCSharder,
    TrackerStorageReservation,
    tracker_bytes_per_rank,
)

TABLES = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=100_000,
                             feature_names=[f"f{i}"]) for i in range(4)]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=TABLES, device=torch.device("meta"))


def _plan(sharders, constraints=None, reservation=None, ddr_cap=None):
    topology = Topology(world_size=2, compute_device="cpu", local_world_size=2, ddr_cap=ddr_cap)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=512, constraints=constraints,
                                       storage_reservation=reservation)
    return planner, planner.plan(Model(), sharders)


def test_row_wise_on_cpu_needs_the_shark_sharder() -> None:
    constraints = {"t1": ParameterConstraints(sharding_types=["row_wise"]),
                   "t2": ParameterConstraints(sharding_types=["table_row_wise"])}
    with pytest.raises(Exception, match="No available sharding type"):
        _plan([EmbeddingBagCollectionSharder()], constraints)
    _, plan = _plan([AllShardingTypesEBCSharder()], constraints)
    ps = plan.plan["ebc"]
    assert ps["t1"].sharding_type == "row_wise" and sorted(ps["t1"].ranks) == [0, 1]
    assert ps["t2"].sharding_type == "table_row_wise"
    assert AllShardingTypesEBCSharder().sharding_types("cuda") == EmbeddingBagCollectionSharder().sharding_types("cuda")


def test_tracker_bytes() -> None:
    b = tracker_bytes_per_rank(TABLES, local_batch_size=512, world_size=2, field_importance="shuffle")
    width = 4 * 64
    assert b["ddr"] == 8 * 400_000 // 2  # sharded: each of the 2 ranks keeps half the rows
    assert tracker_bytes_per_rank(TABLES, 512, 2, row_priority=4)["ddr"] == 4 * 8 * 400_000 // 2
    assert b["hbm"] == 4 * 512 * width * 2 + 4 * 1024 * width
    assert tracker_bytes_per_rank(TABLES, 512, 2, row_priority=False)["ddr"] == 0


def test_planner_reserves_the_trackers_memory() -> None:
    tracker = {"ddr": 123_456_789, "hbm": 1_000}
    base_planner, _ = _plan([AllShardingTypesEBCSharder()], reservation=HeuristicalStorageReservation(0.15))
    reservation = TrackerStorageReservation(tracker, percentage=0.15)
    _plan([AllShardingTypesEBCSharder()], reservation=reservation)
    before = base_planner._storage_reservation.last_reserved_topology
    after = reservation.last_reserved_topology
    for d0, d1 in zip(before.devices, after.devices):
        assert d0.storage.ddr - d1.storage.ddr == 123_456_789 + 1_000  # CPU: both off DDR
    # 4 tables × 100,000 × 64 fp32 (+ row-wise Adagrad state) on 2 devices of 400 MiB: about
    # 49 MiB per device.  They fit beside 340 MiB of trackers, not beside 390 MiB.
    cap = 400 * 1024 ** 2
    _plan([AllShardingTypesEBCSharder()], ddr_cap=cap,
          reservation=TrackerStorageReservation({"ddr": 340 * 1024 ** 2}))
    with pytest.raises(PlannerError):
        _plan([AllShardingTypesEBCSharder()], ddr_cap=cap,
              reservation=TrackerStorageReservation({"ddr": 390 * 1024 ** 2}))
