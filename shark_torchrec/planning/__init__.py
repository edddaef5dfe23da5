"""Planning and sharding with SHARK in mind.

* :class:`AllShardingTypesEBCSharder` — row-wise and table-row-wise sharding on CPU too.
* :func:`tracker_bytes_per_rank`, :class:`TrackerStorageReservation` — the planner reserves what
  the importance and row-priority trackers hold on each rank.
* :mod:`~shark_torchrec.planning.inference` — sharding mixed-precision models for inference.
* :mod:`~shark_torchrec.planning.compress` — compress to fit a topology (``shark-torchrec plan``).
* :func:`load_overrides` — one YAML file of per-table planner constraints and compression
  settings (:class:`PlannerOverrides`).
"""

from shark_torchrec.planning.overrides import (
    OverridesError,
    PlannerOverrides,
    load_overrides,
    parse_overrides,
)
from shark_torchrec.planning.sharders import CPU_SHARDING_TYPES, AllShardingTypesEBCSharder
from shark_torchrec.planning.storage import TrackerStorageReservation, tracker_bytes_per_rank

__all__ = [
    "OverridesError",
    "PlannerOverrides",
    "load_overrides",
    "parse_overrides",
    "AllShardingTypesEBCSharder",
    "CPU_SHARDING_TYPES",
    "TrackerStorageReservation",
    "tracker_bytes_per_rank",
]
