"""Placement-independent initialisation of sharded embedding tables.

DMP initialises every shard from the RNG of the rank that holds it, so the same model
sharded differently (or on a different number of ranks) starts from different weights.
Here each table is initialised in blocks of rows, block ``b`` of table ``t`` from a generator
seeded by ``(seed, t, b)``: any shard (row-wise, column-wise or whole-table) can produce
its slice without materialising the table, and every placement gets the same weights.
The distribution is TorchRec's default for ``EmbeddingBagConfig``:
``U(-sqrt(1/num_embeddings), sqrt(1/num_embeddings))``.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec.modules.embedding_configs import EmbeddingBagConfig

ROW_BLOCK = 8192


def _block(seed: int, table_index: int, block: int, rows: int, dim: int, bound: float) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + table_index) * 1_000_033 + block)
    return torch.empty(rows, dim).uniform_(-bound, bound, generator=g)


def table_rows(
    config: EmbeddingBagConfig, table_index: int, seed: int, row_start: int, row_end: int
) -> torch.Tensor:
    """Rows ``[row_start, row_end)`` (all columns) of the table's deterministic init."""
    bound = math.sqrt(1.0 / config.num_embeddings)
    parts = []
    b0, b1 = row_start // ROW_BLOCK, (row_end - 1) // ROW_BLOCK
    for b in range(b0, b1 + 1):
        lo = b * ROW_BLOCK
        rows = min(ROW_BLOCK, config.num_embeddings - lo)
        blk = _block(seed, table_index, b, rows, config.embedding_dim, bound)
        parts.append(blk[max(row_start - lo, 0) : min(row_end - lo, rows)])
    return torch.cat(parts) if parts else torch.empty(0, config.embedding_dim)


def _fill(dest: torch.Tensor, config: EmbeddingBagConfig, t: int, seed: int, offsets, sizes) -> None:
    (r0, c0), (nr, nc) = offsets, sizes
    if nr == 0 or nc == 0:
        return
    src = table_rows(config, t, seed, r0, r0 + nr)[:, c0 : c0 + nc]
    dest.copy_(src.to(dtype=dest.dtype, device=dest.device))


@torch.no_grad()
def init_embedding_shards(
    model: nn.Module, ebc_fqn: str, tables: Iterable[EmbeddingBagConfig], seed: int
) -> None:
    """Write the deterministic initialisation into a (sharded or plain) collection's weights.

    Args:
        model: the DMP-wrapped (or plain) model.
        ebc_fqn: path of the ``EmbeddingBagCollection`` in ``model.state_dict()`` keys,
            without any DMP prefix (``module.``).
        tables: the collection's table configs, in their order (the order seeds them).
        seed: the run's seed.
    """
    state = model.state_dict()
    by_name: Dict[str, Tuple[int, EmbeddingBagConfig]] = {
        c.name: (i, c) for i, c in enumerate(tables)
    }
    done = set()
    for key, value in state.items():
        stripped = key[len("module.") :] if key.startswith("module.") else key
        prefix = f"{ebc_fqn}.embedding_bags."
        if not stripped.startswith(prefix) or not stripped.endswith(".weight"):
            continue
        name = stripped[len(prefix) : -len(".weight")]
        t, config = by_name[name]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                md = shard.metadata
                _fill(shard.tensor, config, t, seed, md.shard_offsets, md.shard_sizes)
        else:
            _fill(value, config, t, seed, (0, 0), tuple(value.shape))
        done.add(name)
    missing = sorted(set(by_name) - done)
    if missing:
        raise RuntimeError(f"init_embedding_shards: no weights found for tables {missing}")
