"""Where the tables of a sharded collection lie: every shard's table, rows, columns and rank.

A ``DistributedModelParallel``-sharded ``EmbeddingBagCollection`` stores each table as a
``ShardedTensor`` (table-wise: one shard; row-wise and table-row-wise: row ranges; column-wise
and table-column-wise: column blocks) or, data-parallel, as a plain tensor on every rank.  The
metadata of every shard is known on every rank, so :class:`ShardedLayout` is the same
everywhere; each rank reads the rows of its own shards in place (views of FBGEMM's weights,
:func:`collection_layout`).  Nothing is gathered.

A table's shards form a grid: row ranges (a ``RowGroup`` each), each split into column blocks
(one shard each).  The rank holding a row group's first block is its *leader*: it decides the
tiers of those rows (every block of a row takes the same tier).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table

from shark_torchrec.quant.id_map import entry_bits

LAYOUT_FORMAT = "shark-torchrec/sharded-layout/v1"
#: ``TableShard.rank`` of a table held whole by every rank (data parallel).
REPLICATED = -1


@dataclasses.dataclass(frozen=True)
class TableShard:
    """One shard: rows ``[row_offset, row_offset + rows)`` and columns ``[col_offset,
    col_offset + cols)`` of ``table``, on ``rank`` (:data:`REPLICATED`: on every rank)."""

    table: str
    index: int
    rank: int
    row_offset: int
    rows: int
    col_offset: int
    cols: int

    @property
    def name(self) -> str:
        """The shard's own table name in a rank's local collection."""
        return f"{self.table}#{self.index}"

    def held_by(self, rank: int) -> bool:
        return self.rank == rank or self.rank == REPLICATED


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """The shards that hold the same rows of a table, in column order."""

    table: str
    row_offset: int
    rows: int
    blocks: Tuple[TableShard, ...]

    @property
    def leader(self) -> int:
        """The rank that decides these rows' tiers (rank 0 for a replicated table)."""
        return 0 if self.blocks[0].rank == REPLICATED else self.blocks[0].rank

    @property
    def widths(self) -> List[int]:
        return [b.cols for b in self.blocks]


@dataclasses.dataclass
class ShardedLayout:
    """The tables of a sharded collection and where their shards lie (the same on every rank).

    Attributes:
        tables: ``{"name", "rows", "dim", "features", "pooling"}`` per table, in the
            collection's order.
        shards: every shard of every table.
        world_size: ranks the shards lie on.
        is_weighted: whether inputs carry per-id weights.
    """

    tables: List[Dict]
    shards: List[TableShard]
    world_size: int
    is_weighted: bool = False

    def __post_init__(self) -> None:
        self.check()

    # ------------------------------------------------------------------ reading
    def configs(self) -> List[EmbeddingBagConfig]:
        return [EmbeddingBagConfig(name=t["name"], num_embeddings=t["rows"], embedding_dim=t["dim"],
                                   feature_names=list(t["features"]), pooling=PoolingType(t["pooling"]))
                for t in self.tables]

    def embedding_names(self) -> Dict[str, List[str]]:
        """``{table: [output key per feature]}``: TorchRec's names (``feature@table`` for a
        feature several tables read)."""
        return {t["name"]: n for t, n in zip(self.tables, get_embedding_names_by_table(self.configs()))}

    def map_bits(self, shards: List[TableShard]) -> Dict[str, int]:
        """``{shard name: bits per id-map entry}``: each shard takes its whole table's width
        (:func:`~shark_torchrec.quant.id_map.entry_bits`), so a table's bytes do not depend on
        how it is split."""
        rows = {t["name"]: t["rows"] for t in self.tables}
        return {s.name: entry_bits(rows[s.table]) for s in shards}

    def shards_of(self, table: str) -> List[TableShard]:
        return [s for s in self.shards if s.table == table]

    def local(self, rank: int) -> List[TableShard]:
        """The shards ``rank`` holds (replicated tables included), in table then shard order."""
        return [s for s in self.shards if s.held_by(rank)]

    def row_groups(self, table: str) -> List[RowGroup]:
        """A table's row ranges, each with its column blocks."""
        by_rows: Dict[Tuple[int, int], List[TableShard]] = {}
        for s in self.shards_of(table):
            by_rows.setdefault((s.row_offset, s.rows), []).append(s)
        return [RowGroup(table, r0, n, tuple(sorted(b, key=lambda s: s.col_offset)))
                for (r0, n), b in sorted(by_rows.items())]

    def led_by(self, rank: int) -> List[Tuple[str, int, int]]:
        """``(table, row_offset, rows)`` of the row groups whose tiers ``rank`` decides."""
        return [(g.table, g.row_offset, g.rows) for t in self.tables for g in self.row_groups(t["name"])
                if g.leader == rank]

    def column_blocks(self, table: str) -> List[int]:
        """Widths of a table's column blocks (``[dim]`` unless it is column-wise sharded)."""
        return self.row_groups(table)[0].widths

    def check(self) -> None:
        """Raise naming the table whose shards do not tile it exactly (a grid of row ranges
        and column blocks)."""
        names = [t["name"] for t in self.tables]
        unknown = sorted({s.table for s in self.shards} - set(names))
        if unknown:
            raise ValueError(f"shards of unknown tables {unknown}")
        for t in self.tables:
            groups = self.row_groups(t["name"])
            if not groups:
                raise ValueError(f"table {t['name']!r} has no shards")
            starts = [g.row_offset for g in groups]
            ends = [g.row_offset + g.rows for g in groups]
            if starts[0] != 0 or ends[-1] != t["rows"] or starts[1:] != ends[:-1]:
                raise ValueError(f"table {t['name']!r}: row shards {list(zip(starts, ends))} do not "
                                 f"cover its {t['rows']} rows once")
            for g in groups:
                c = [b.col_offset for b in g.blocks]
                e = [b.col_offset + b.cols for b in g.blocks]
                if c[0] != 0 or e[-1] != t["dim"] or c[1:] != e[:-1] or g.widths != groups[0].widths:
                    raise ValueError(f"table {t['name']!r}: rows {g.row_offset}+{g.rows} are split "
                                     f"into columns {list(zip(c, e))}, not one grid of dim {t['dim']}")
            for s in self.shards_of(t["name"]):
                if not (s.rank == REPLICATED or 0 <= s.rank < self.world_size):
                    raise ValueError(f"table {t['name']!r}: shard on rank {s.rank} of {self.world_size}")

    # ------------------------------------------------------------------ serialising
    def to_dict(self) -> Dict:
        return {"format": LAYOUT_FORMAT, "tables": self.tables, "world_size": self.world_size,
                "is_weighted": self.is_weighted, "shards": [dataclasses.asdict(s) for s in self.shards]}

    @staticmethod
    def from_dict(d: Mapping) -> "ShardedLayout":
        if not isinstance(d, Mapping) or d.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"not a sharded layout (format {LAYOUT_FORMAT!r})")
        return ShardedLayout(tables=[dict(t) for t in d["tables"]],
                             shards=[TableShard(**s) for s in d["shards"]],
                             world_size=int(d["world_size"]), is_weighted=bool(d["is_weighted"]))


def _rank_of(placement) -> int:
    return int(placement.rank())


def collection_layout(module: nn.Module, rank: int, world_size: int
                      ) -> Tuple[ShardedLayout, Dict[str, torch.Tensor]]:
    """The layout of a sharded ``EmbeddingBagCollection`` (``ShardedEmbeddingBagCollection``,
    or a plain one: every table one replicated shard) and ``{shard name: rows}`` of the
    shards ``rank`` holds — views of the module's own weights, nothing copied."""
    configs = getattr(module, "_embedding_bag_configs", None)
    if configs is None:
        configs = module.embedding_bag_configs()
    is_weighted = bool(getattr(module, "_is_weighted", False)) or (
        hasattr(module, "is_weighted") and callable(module.is_weighted) and module.is_weighted())
    state = module.state_dict()
    tables = [{"name": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim,
               "features": list(c.feature_names), "pooling": c.pooling.value} for c in configs]
    shards: List[TableShard] = []
    local: Dict[str, torch.Tensor] = {}
    for c in configs:
        key = f"embedding_bags.{c.name}.weight"
        if key not in state:
            raise KeyError(f"no weights for table {c.name!r} in the collection's state (looked for {key!r})")
        value = state[key]
        if isinstance(value, ShardedTensor):
            metas = sorted(value.metadata().shards_metadata, key=lambda m: (m.shard_offsets[0], m.shard_offsets[1]))
            empty = [m for m in metas if m.shard_sizes[0] == 0 or m.shard_sizes[1] == 0]
            if empty:  # (raised alike on every rank: the layout is the same everywhere)
                raise ValueError(f"table {c.name!r} ({c.num_embeddings} rows) is sharded over more ranks than it "
                                 f"has rows or columns (a shard of {list(empty[0].shard_sizes)}): shard it "
                                 "table-wise, or over fewer ranks")
            index = {}
            for i, m in enumerate(metas):
                s = TableShard(c.name, i, _rank_of(m.placement), m.shard_offsets[0], m.shard_sizes[0],
                               m.shard_offsets[1], m.shard_sizes[1])
                shards.append(s)
                index[(s.row_offset, s.col_offset)] = s
            for ls in value.local_shards():
                md = ls.metadata
                s = index[(md.shard_offsets[0], md.shard_offsets[1])]
                local[s.name] = ls.tensor
        else:
            s = TableShard(c.name, 0, REPLICATED, 0, c.num_embeddings, 0, c.embedding_dim)
            shards.append(s)
            local[s.name] = value
    return ShardedLayout(tables, shards, world_size, is_weighted), local
