"""Gathering a sharded model's state into full (unsharded) tensors on one rank."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor


def full_state_dict(model: nn.Module, dst: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """The model's state with every ``ShardedTensor`` gathered whole, on rank ``dst``.

    Every rank must call it (it is collective); ranks other than ``dst`` get ``None``.
    Keys lose a leading DMP/DDP ``module.`` prefix.

    For tests and small models only: every table is gathered whole into ``dst``'s memory.
    Nothing in the pipeline calls it: a sharded model is compressed, evaluated and exported
    where its shards lie (:mod:`shark_torchrec.sharded`).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[name] = full
        elif isinstance(value, torch.Tensor):
            out[name] = value.detach().cpu().clone()
    return out if rank == dst else None
