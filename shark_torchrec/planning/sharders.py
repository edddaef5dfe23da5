"""Sharders for training that offer every sharding type TorchRec can run on the device.

TorchRec's ``EmbeddingBagCollectionSharder`` lists row-wise and table-row-wise sharding for
CUDA only, so on CPU the planner refuses them ("No available sharding type and compute kernel
combination ...") although DMP runs them correctly on gloo (``torchrec-cpu-facts.md`` 3.1/3.3:
all eleven sharding/kernel combinations match an unsharded reference).
"""

from __future__ import annotations

from typing import List

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingType

#: Sharding types DMP runs for an EmbeddingBagCollection on CPU (gloo), verified.
CPU_SHARDING_TYPES = [
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
]


class AllShardingTypesEBCSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that also offers row-wise and table-row-wise sharding
    on CPU; on CUDA it offers exactly what TorchRec's does."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types = types + [t for t in CPU_SHARDING_TYPES if t not in types]
        return types
