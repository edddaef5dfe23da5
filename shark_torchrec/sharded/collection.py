"""A row-wise mixed-precision collection sharded over processes, for serving and evaluation.

Each rank holds the mixed sub-tables of its own shards only (a
:class:`~shark_torchrec.quant.RowwiseMixedEmbeddingBagCollection` over them: on CPU read by the
fused kernel, on CUDA by FBGEMM's TBE), plus every data-parallel table whole.  A forward takes
this rank's batch and returns the ``KeyedTensor`` the unsharded collection returns for it:

1. ids are checked and split by the row range of the shard that holds them (FBGEMM's
   ``block_bucketize_sparse_features``, as TorchRec's row-wise input distribution), copied to
   every column block of their rows, and sent to the ranks that hold them (``all_to_all``:
   bag lengths, ids, per-id weights);
2. each rank reads the bags it received, source by source, in SUM;
3. the pooled blocks go back (``all_to_all``) and are added into the output columns: column
   blocks side by side, row-range partial sums on top of each other; MEAN bags are divided
   by their full length (dropped rows count, as in the unsharded collection).

Why not TorchRec's inference sharding (``shard_quant_model``, used by
:mod:`shark_torchrec.planning.inference`): it shards over the devices of *one* process
(``ShardingEnv.from_local``), so one host would hold every shard; here each process holds its
own, as in training.  Every rank must call forward the same number of times (each call is a
collective), with batches of any size (0 included).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection
from shark_torchrec.quant.remap import select_features
from shark_torchrec.sharded.comm import Comm
from shark_torchrec.sharded.layout import REPLICATED, ShardedLayout, TableShard


def local_configs(layout: ShardedLayout, shards: List[TableShard]) -> List[EmbeddingBagConfig]:
    """The tables of a rank's local collection: one per shard (``"<table>#<index>"``), its
    features ``"<output key>#<index>"``, pooled in SUM (MEAN is applied on the whole bag)."""
    names = layout.embedding_names()
    return [EmbeddingBagConfig(name=s.name, num_embeddings=s.rows, embedding_dim=s.cols,
                               feature_names=[f"{e}#{s.index}" for e in names[s.table]],
                               pooling=PoolingType.SUM) for s in shards]


class ShardedRowwiseMixedEmbeddingBagCollection(nn.Module):
    """Row-wise mixed-precision tables sharded over the ranks of ``comm`` (see the module
    docstring).  Build it with :func:`~shark_torchrec.sharded.convert.quantize_sharded` (from a
    DMP-sharded model) or :func:`~shark_torchrec.sharded.export.load_export` (from a sharded
    export, on any number of processes).

    Args:
        layout: every shard of every table, the same on every rank.
        routed: this rank's shards of the row- and column-split tables (None: it holds none).
        replicated: the data-parallel tables, whole on every rank (None: there are none).
        comm: the process group.
        check_ids: raise on ids outside their table, naming the feature and the table.
        row_alignment: the bytes rows are padded to (the same in every rank's tables).
    """

    def __init__(self, layout: ShardedLayout, routed: Optional[RowwiseMixedEmbeddingBagCollection],
                 replicated: Optional[RowwiseMixedEmbeddingBagCollection], comm: Optional[Comm] = None,
                 check_ids: bool = True, row_alignment: int = 16) -> None:
        super().__init__()
        self.layout = layout
        self.row_alignment = row_alignment
        self.comm = comm or Comm()
        if layout.world_size != self.comm.world:
            raise ValueError(f"the layout is for {layout.world_size} ranks, the process group has {self.comm.world}")
        self.check_ids = check_ids
        self.routed = routed
        self.replicated = replicated
        self._configs = layout.configs()
        names = layout.embedding_names()
        # Output slots: (output key, input feature, table config), TorchRec's order.
        self._slots = [(e, f, c) for c in self._configs for e, f in zip(names[c.name], c.feature_names)]
        self._keys = [e for e, _, _ in self._slots]
        self._dims = [c.embedding_dim for _, _, c in self._slots]
        starts = torch.cumsum(torch.tensor([0] + self._dims), 0).tolist()
        self._width = starts[-1]
        self._column = {e: starts[i] for i, (e, _, _) in enumerate(self._slots)}
        rep_tables = {s.table for s in layout.shards if s.rank == REPLICATED}
        self._routed_slots = [i for i, (_, _, c) in enumerate(self._slots) if c.name not in rep_tables]
        self._rep_slots = [i for i, (_, _, c) in enumerate(self._slots) if c.name in rep_tables]
        self._mean_slots = [i for i, (_, _, c) in enumerate(self._slots) if c.pooling == PoolingType.MEAN]
        self._plan = self._routing_plan()

    # ------------------------------------------------------------------ plan
    def _routing_plan(self) -> Dict[str, object]:
        """What a forward sends where (the same on every rank; built once)."""
        layout, rank = self.layout, self.comm.rank
        routed = [self._slots[i] for i in self._routed_slots]
        groups = {c.name: layout.row_groups(c.name) for _, _, c in routed}
        R = max((len(g) for g in groups.values()), default=1)
        pos = []
        for _, _, c in routed:
            bounds = [g.row_offset for g in groups[c.name]] + [c.num_embeddings]
            pos.append(torch.tensor(bounds + [c.num_embeddings] * (R + 1 - len(bounds))))
        slot_index = {e: j for j, (e, _, _) in enumerate(routed)}
        # A rank's local features, in its local collection's order: for each of its shards,
        # each output key of the shard's table.
        per_rank: List[List[Tuple[TableShard, str]]] = [[] for _ in range(self.comm.world)]
        for s in layout.shards:
            if s.rank != REPLICATED:
                for e, _, c in routed:
                    if c.name == s.table:
                        per_rank[s.rank].append((s, e))
        segments = []  # (row group, routed slot) of each feature sent, destination-major
        for d in range(self.comm.world):
            for s, e in per_rank[d]:
                p = next(i for i, g in enumerate(groups[s.table]) if g.row_offset == s.row_offset)
                segments.append(p * len(routed) + slot_index[e])
        cols = []  # per rank: the global output column of each of its local output columns
        for d in range(self.comm.world):
            c = [torch.arange(self._column[e] + s.col_offset, self._column[e] + s.col_offset + s.cols)
                 for s, e in per_rank[d]]
            cols.append(torch.cat(c) if c else torch.zeros(0, dtype=torch.long))
        return {
            "R": R, "pos": pos, "count": [len(p) for p in per_rank],
            "permute": torch.tensor(segments, dtype=torch.int32),
            "block_sizes": torch.tensor([max(1, c.num_embeddings) for _, _, c in routed]),
            "rows": torch.tensor([c.num_embeddings for _, _, c in routed]),
            "features": [f for _, f, _ in routed], "tables": [c.name for _, _, c in routed],
            "local_keys": [f"{e}#{s.index}" for s, e in per_rank[rank]],
            "cols": cols,
            "rep_features": [self._slots[i][1] for i in self._rep_slots],
            "rep_rows": torch.tensor([self._slots[i][2].num_embeddings for i in self._rep_slots]),
            "rep_tables": [self._slots[i][2].name for i in self._rep_slots],
            "rep_keys": [f"{self._slots[i][0]}#0" for i in self._rep_slots],
            "rep_cols": torch.cat([torch.arange(self._column[self._slots[i][0]],
                                                self._column[self._slots[i][0]] + self._dims[i])
                                   for i in self._rep_slots]) if self._rep_slots else torch.zeros(0, dtype=torch.long),
        }

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._configs)

    def is_weighted(self) -> bool:
        return self.layout.is_weighted

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _check(values: torch.Tensor, lengths: torch.Tensor, B: int, features: List[str],
               rows: torch.Tensor, tables: List[str]) -> None:
        """Raise naming the feature, the id and the table of the first id outside its table."""
        F = len(features)
        if values.numel() == 0 or F == 0:
            return
        feature_of_id = torch.repeat_interleave(torch.arange(F, device=values.device).repeat_interleave(B),
                                                lengths.long(), output_size=values.numel())
        bad = (values < 0) | (values >= rows.to(values.device)[feature_of_id])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            j = int(feature_of_id[i])
            raise ValueError(f"feature {features[j]!r}: id {int(values[i])} is outside table "
                             f"{tables[j]!r} ({int(rows[j])} rows)")

    @torch.no_grad()
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of this rank's batch (a collective: every rank calls it)."""
        B = features.stride()
        out = torch.zeros(B, self._width, device=features.values().device)
        plan = self._plan
        if self._routed_slots:
            self._forward_routed(features, B, out)
        if self._rep_slots:
            kjt = select_features(features, plan["rep_features"])
            if self.check_ids:
                self._check(kjt.values(), kjt.lengths(), B, plan["rep_features"], plan["rep_rows"],
                            plan["rep_tables"])
            kjt = KeyedJaggedTensor(keys=plan["rep_keys"], values=kjt.values(), lengths=kjt.lengths(),
                                    weights=kjt.weights_or_none(), stride=B)
            if B:
                out.index_copy_(1, plan["rep_cols"].to(out.device), self.replicated(kjt).values())
        if self._mean_slots and B:
            for i in self._mean_slots:
                e, f, _ = self._slots[i]
                L = features[f].lengths().to(out.dtype).clamp(min=1).unsqueeze(1)
                c0 = self._column[e]
                out[:, c0:c0 + self._dims[i]] /= L
        return KeyedTensor(keys=list(self._keys), length_per_key=list(self._dims), values=out)

    def _forward_routed(self, features: KeyedJaggedTensor, B: int, out: torch.Tensor) -> None:
        plan, comm = self._plan, self.comm
        kjt = select_features(features, plan["features"])
        # one dtype on every rank: what one sends, another reads
        values, lengths, weights = kjt.values().long(), kjt.lengths().long(), kjt.weights_or_none()
        if self.check_ids:
            self._check(values, lengths, B, plan["features"], plan["rows"], plan["tables"])
        F, R = len(plan["features"]), plan["R"]
        if R > 1:
            lengths, values, weights, _, _ = torch.ops.fbgemm.block_bucketize_sparse_features(
                lengths, values, False, False, plan["block_sizes"].to(values.dtype), R, weights, None, -1,
                [p.to(values.dtype) for p in plan["pos"]])
        # segments (row group, slot) -> one per (rank, local feature), in rank order
        lengths, values, weights = torch.ops.fbgemm.permute_2D_sparse_data(
            plan["permute"], lengths.view(R * F, B), values, weights)
        counts = plan["count"]
        seg_sums = lengths.sum(1) if B else torch.zeros(len(plan["permute"]), dtype=lengths.dtype)
        per_rank = torch.split(seg_sums, counts)
        n_values = [int(s.sum()) for s in per_rank]
        meta = comm.exchange([torch.tensor([n, B], dtype=torch.long) for n in n_values], [2] * comm.world)
        src_values = [int(m[0]) for m in meta]
        src_B = [int(m[1]) for m in meta]
        mine = len(plan["local_keys"])
        got_lengths = comm.exchange(list(torch.split(lengths.reshape(-1), [c * B for c in counts])),
                                    [mine * b for b in src_B])
        got_values = comm.exchange(list(torch.split(values, n_values)), src_values)
        got_weights = None
        if self.layout.is_weighted:
            w = weights if weights is not None else torch.ones(values.numel(), device=values.device)
            got_weights = comm.exchange(list(torch.split(w.float(), n_values)), src_values)
        pooled = []
        for s in range(comm.world):
            if mine == 0 or src_B[s] == 0:
                pooled.append(torch.zeros(0, device=out.device))
                continue
            part = KeyedJaggedTensor(keys=plan["local_keys"], values=got_values[s], lengths=got_lengths[s],
                                     weights=None if got_weights is None else got_weights[s], stride=src_B[s])
            pooled.append(self.routed(part).values().reshape(-1))
        widths = [int(c.numel()) for c in plan["cols"]]
        back = comm.exchange(pooled, [B * w for w in widths])
        for d in range(comm.world):
            if widths[d] and B:
                out.index_add_(1, plan["cols"][d].to(out.device), back[d].view(B, widths[d]))
