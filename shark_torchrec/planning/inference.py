"""Sharding models with row-wise mixed-precision collections across devices, for inference.

The mixed collection is built on TorchRec's quantized ``EmbeddingBagCollection`` (one per table
group), so TorchRec's quant sharder places its physical (table, tier) sub-tables, planned by
``EmbeddingShardingPlanner`` from their real bytes (FBGEMM row sizes and alignment).  The id-to-
tier transform stays with the collection (replicated; 4 bytes per row).  Every sub-table of a
logical table need not sit on the same device: the sharded quantized collection routes each
tier's ids to wherever its sub-table lives.

On CPU this follows the recipe of ``torchrec-cpu-facts.md`` section 5.1: device propagation on,
scale/bias not split in the state dict, and the weights copied into the sharded TBEs (TorchRec's
inference sharding allocates fresh ones).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.fused_params import (
    FUSED_PARAM_QUANT_STATE_DICT_SPLIT_SCALE_BIAS,
    FUSED_PARAM_REGISTER_TBE_BOOL,
)
from torchrec.distributed.global_settings import set_propogate_device
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.quant_embeddingbag import QuantEmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.inference.modules import assign_weights_to_tbe, shard_quant_model
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)

from shark_torchrec.planning.storage import TrackerStorageReservation
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection


def _mixed_collections(model: nn.Module) -> List[RowwiseMixedEmbeddingBagCollection]:
    found = [m for m in model.modules() if isinstance(m, RowwiseMixedEmbeddingBagCollection)]
    if not found:
        raise ValueError("the model holds no RowwiseMixedEmbeddingBagCollection (run quantize_ first)")
    return found


def _tbes(model: nn.Module) -> List[IntNBitTableBatchedEmbeddingBagsCodegen]:
    return [m for m in model.modules() if isinstance(m, IntNBitTableBatchedEmbeddingBagsCodegen)]


def shard_for_inference(
    model: nn.Module,
    world_size: int,
    compute_device: str = "cpu",
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    hbm_cap: Optional[int] = None,
    ddr_cap: Optional[int] = None,
) -> Tuple[nn.Module, ShardingPlan, EmbeddingShardingPlanner]:
    """Shard ``model``'s mixed collections over ``world_size`` devices, in place.

    Args:
        model: a model holding :class:`RowwiseMixedEmbeddingBagCollection` s (e.g. a DLRM after
            ``quantize_``), or one itself.
        world_size: devices.
        compute_device: ``"cpu"`` or ``"cuda"``.
        constraints: per physical table (``"<table>@<tier>"``); default: table-wise, ``quant``.
        hbm_cap, ddr_cap: bytes per device for the planner.

    Returns ``(sharded model, plan, planner)``; the planner's ``_best_plan`` holds its per-shard
    storage estimates.
    """
    collections = _mixed_collections(model)
    int2 = [n for c in collections for g in c.groups for n in g._tbe_views() if n.endswith("@int2")]
    if compute_device == "cuda" and int2:
        # TorchRec's sharded quantized collection reads every sub-table into one fp32 output,
        # which FBGEMM's CUDA kernels get wrong for INT2 (see _MixedGroup._lookups); the
        # unsharded collection reads INT2 through an fp16 output instead.
        raise NotImplementedError(
            f"sharding INT2 sub-tables {int2} for CUDA: FBGEMM's fp32-output INT2 CUDA lookup "
            "is wrong; keep these tables unsharded or assign them INT4/DROP instead of INT2")
    # Views of the current weights, by physical table (they keep the buffers alive).
    weights = {}
    for c in collections:
        for g in c.groups:
            weights.update(g._tbe_views())
    names = [cfg.name for c in collections for g in c.groups if g.qebc is not None
             for cfg in g.qebc.embedding_bag_configs()]
    if constraints is None:
        constraints = {n: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value],
                                               compute_kernels=[EmbeddingComputeKernel.QUANT.value])
                       for n in names}
    # TorchRec's inference sharding on CPU needs device propagation (else it asserts CUDA).
    set_propogate_device(True)
    sharders = [QuantEmbeddingBagCollectionSharder(fused_params={
        # FP16/FP32 tables have no scale/bias to split (torchrec-cpu-facts.md 5.1).
        FUSED_PARAM_QUANT_STATE_DICT_SPLIT_SCALE_BIAS: False,
        # Registered TBEs can be found, to copy the weights in.
        FUSED_PARAM_REGISTER_TBE_BOOL: True,
    })]
    topology = Topology(world_size=world_size, compute_device=compute_device,
                        local_world_size=world_size, hbm_cap=hbm_cap, ddr_cap=ddr_cap)
    # The id maps travel with the collections (one per device that serves them): reserved.
    id_map = sum(g.input_transform.row_map.numel() * g.input_transform.row_map.element_size()
                 for c in collections for g in c.groups)
    reservation = TrackerStorageReservation({"ddr" if compute_device == "cpu" else "hbm": id_map},
                                            percentage=0.0)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=1, constraints=constraints,
                                       storage_reservation=reservation)
    plan = planner.plan(model, sharders)
    sharded, _ = shard_quant_model(model, world_size=world_size, compute_device=compute_device,
                                   sharding_device=compute_device, sharders=sharders,
                                   sharding_plan=plan)
    assign_weights_to_tbe(sharded, weights)
    for tbe in _tbes(sharded):
        # Ids reaching a sub-table are its local rows by construction (see mixed_ebc).
        tbe.bounds_check_mode_int = BoundsCheckMode.NONE.value
    return sharded, plan, planner


def allocated_bytes_per_rank(sharded: nn.Module, plan: ShardingPlan, world_size: int) -> List[int]:
    """Weight bytes the sharded TBEs actually hold, by the rank their tables are placed on."""
    rank_of = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            rank_of[table] = ps.ranks[0]
    out = [0] * world_size
    for tbe in _tbes(sharded):
        ranks = {rank_of[spec[0]] for spec in tbe.embedding_specs}
        if len(ranks) != 1:
            raise RuntimeError(f"a TBE holds tables of ranks {sorted(ranks)}")
        held = int(tbe.weights_host.numel() + tbe.weights_dev.numel() + tbe.weights_uvm.numel())
        out[ranks.pop()] += held
    return out


def planned_bytes_per_rank(planner: EmbeddingShardingPlanner, world_size: int) -> List[int]:
    """The planner's storage estimate per rank (device + host memory)."""
    out = [0] * world_size
    for so in planner._best_plan:
        for s in so.shards:
            out[s.rank] += s.storage.hbm + s.storage.ddr
    return out
