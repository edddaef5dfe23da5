"""Sharding a model's embedding tables with TorchRec's planner and ``DistributedModelParallel``."""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from shark_torchrec.training.distributed import DistEnv

logger = logging.getLogger(__name__)


def plan_sharding(
    model: nn.Module,
    env: DistEnv,
    batch_size: int,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    sharders: Optional[Sequence] = None,
    storage_reservation=None,
) -> ShardingPlan:
    """Plan with ``EmbeddingShardingPlanner`` on rank 0 and broadcast the plan to all ranks.

    The topology is the process group's: ``env.world_size`` devices of ``env.device``'s type
    (on CPU the planner places tables in DDR; see ``torchrec-cpu-facts.md`` section 3.3).
    ``storage_reservation`` (e.g. :class:`~shark_torchrec.planning.TrackerStorageReservation`)
    replaces the planner's default reservation.
    """
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=env.world_size,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)),
        ),
        kernel_config=KernelConfig(compute_device=env.device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints,
        storage_reservation=storage_reservation,
    )
    sharders = list(sharders) if sharders else [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    if env.is_main:
        logger.info("sharding plan:\n%s", plan)
    return plan


def shard_model(
    model: nn.Module,
    env: DistEnv,
    plan: ShardingPlan,
    sharders: Optional[Sequence] = None,
) -> DistributedModelParallel:
    """Wrap ``model`` in DMP with ``plan``; dense layers get DDP when ``world_size > 1``."""
    sharders = list(sharders) if sharders else [EmbeddingBagCollectionSharder()]
    return DistributedModelParallel(
        module=model,
        device=env.device,
        plan=plan,
        sharders=sharders,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
    )


def plan_summary(plan: ShardingPlan) -> Dict[str, Dict[str, object]]:
    """``{module: {table: {sharding_type, compute_kernel, ranks}}}`` for logs and metrics."""
    out: Dict[str, Dict[str, object]] = {}
    for module_fqn, module_plan in plan.plan.items():
        out[module_fqn] = {
            table: {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else None,
            }
            for table, ps in module_plan.items()
        }
    return out
