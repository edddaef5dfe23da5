"""Planning and sharding with SHARK in mind.

* :class:`AllShardingTypesEBCSharder` — row-wise and table-row-wise sharding on CPU too.
* :func:`tracker_bytes_per_rank`, :class:`TrackerStorageReservation` — the planner reserves what
  the importance and row-priority trackers hold on each rank.
"""

from shark_torchrec.planning.sharders import CPU_SHARDING_TYPES, AllShardingTypesEBCSharder
from shark_torchrec.planning.storage import TrackerStorageReservation, tracker_bytes_per_rank

__all__ = [
    "AllShardingTypesEBCSharder",
    "CPU_SHARDING_TYPES",
    "TrackerStorageReservation",
    "tracker_bytes_per_rank",
]
