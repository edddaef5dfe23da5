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

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.quant.layout import reported_data_type
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection
from shark_torchrec.quant.remap import contiguous_jagged, jagged_error, select_features, without_weights
from shark_torchrec.quant.tiers import Tier
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
        self._reported = self._reported_configs()
        #: the dtype of the pooled embeddings returned (``RowwiseQuantConfig.output_dtype``)
        self.output_dtype = torch.float32
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
        self._scratch_buffers: Dict[str, torch.Tensor] = {}  # see _scratch

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
        # Contiguous runs of each rank's columns in the output: (output column, its column, width,
        # add), add where an earlier rank (row-wise partial sums) already wrote the column.
        written = torch.zeros(self._width, dtype=torch.bool)
        runs = []
        for d in range(self.comm.world):
            mine = []
            for j, g in enumerate(cols[d].tolist()):
                add = bool(written[g])  # (two row ranges of a table on one rank: the second adds)
                written[g] = True
                if mine and mine[-1][0] + mine[-1][2] == g and mine[-1][1] + mine[-1][2] == j and mine[-1][3] == add:
                    mine[-1][2] += 1
                else:
                    mine.append([g, j, 1, add])
            runs.append([tuple(r) for r in mine])
        return {
            "R": R, "pos": pos, "count": [len(p) for p in per_rank],
            "permute": torch.tensor(segments, dtype=torch.int32),
            "block_sizes": torch.tensor([max(1, c.num_embeddings) for _, _, c in routed]),
            "rows": torch.tensor([c.num_embeddings for _, _, c in routed]),
            "wire_dtype": torch.int32 if all(c.num_embeddings < 2**31 for _, _, c in routed) else torch.int64,
            "features": [f for _, f, _ in routed], "tables": [c.name for _, _, c in routed],
            "local_keys": [f"{e}#{s.index}" for s, e in per_rank[rank]],
            "cols": cols, "runs": runs,
            "rep_features": [self._slots[i][1] for i in self._rep_slots],
            "rep_rows": torch.tensor([self._slots[i][2].num_embeddings for i in self._rep_slots]),
            "rep_tables": [self._slots[i][2].name for i in self._rep_slots],
            "rep_keys": [f"{self._slots[i][0]}#0" for i in self._rep_slots],
            "rep_cols": torch.cat([torch.arange(self._column[self._slots[i][0]],
                                                self._column[self._slots[i][0]] + self._dims[i])
                                   for i in self._rep_slots]) if self._rep_slots else torch.zeros(0, dtype=torch.long),
        }

    def _reported_configs(self) -> List[EmbeddingBagConfig]:
        """The configs with each table's ``data_type``, from the tiers its shards hold on every
        rank (a collective: built where the collection is, on every rank)."""
        table_of = {s.name: s.table for s in self.layout.shards}
        local: Dict[str, set] = {}
        for part in (self.routed, self.replicated):
            if part is None:
                continue
            for shard in part.layout.tables:
                table = table_of[shard["name"]]
                local.setdefault(table, set()).update(t.value for t in part.layout.stored_tiers(shard["name"]))
        stored: Dict[str, set] = {}
        for theirs in self.comm.all_gather_object(local):
            for table, tiers in theirs.items():
                stored.setdefault(table, set()).update(tiers)
        return [dataclasses.replace(c, data_type=reported_data_type([Tier.parse(t) for t in stored.get(c.name, ())]))
                for c in self._configs]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The tables, each with the ``data_type`` of its rows over all ranks' shards (as
        :meth:`RowwiseMixedEmbeddingBagCollection.embedding_bag_configs`)."""
        return list(self._reported)

    def is_weighted(self) -> bool:
        return self.layout.is_weighted

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _first_bad(kjt: KeyedJaggedTensor, rows: torch.Tensor, tables: List[str]) -> Optional[str]:
        """The error message for the first id outside its table (per feature, one min/max),
        or None."""
        values = kjt.values()
        if values.device.type == "cpu" and cpu_kernel_available():
            per_key = torch.tensor(kjt.length_per_key(), dtype=torch.long)
            if torch.ops.shark_torchrec.first_id_outside(values.contiguous(), per_key, rows) < 0:
                return None  # (the loop below names the first bad id)
        start = 0
        for j, n in enumerate(kjt.length_per_key()):
            if n:
                ids = values[start:start + n]
                lo, hi = torch.aminmax(ids)
                if int(lo) < 0 or int(hi) >= int(rows[j]):
                    bad = ids[(ids < 0) | (ids >= int(rows[j]))][0]
                    return (f"feature {kjt.keys()[j]!r}: id {int(bad)} is outside table {tables[j]!r} "
                            f"({int(rows[j])} rows)")
            start += n
        return None

    @torch.no_grad()
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of this rank's batch (a collective: every rank calls it)."""
        B = features.stride()
        # every column is written below: by its shards (the first in rank order copies, later
        # row-range partial sums add) or by its data-parallel table
        out = torch.empty(B, self._width, device=features.values().device)
        plan = self._plan
        # a malformed batch is found before anything is sent (every rank learns of it below)
        malformed = jagged_error(features, self.layout.is_weighted)
        if malformed is None:
            features = contiguous_jagged(features)  # (ops below read them by data pointer)
            if not self.layout.is_weighted:
                features = without_weights(features)  # ignored, as TorchRec's collections do
        if self._routed_slots:
            self._forward_routed(features, B, out, malformed)
        elif malformed is not None:
            raise ValueError(f"{type(self).__name__}: {malformed}")
        if self._rep_slots:
            kjt = select_features(features, plan["rep_features"])
            message = self._first_bad(kjt, plan["rep_rows"], plan["rep_tables"]) if self.check_ids else None
            if message:  # (read here only: no other rank waits for this rank's replicated rows)
                raise ValueError(message)
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
        if out.dtype != self.output_dtype:
            out = out.to(self.output_dtype)
        return KeyedTensor(keys=list(self._keys), length_per_key=list(self._dims), values=out)

    def _scratch(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D buffer of ``numel`` elements kept from one forward to the next (grown when a
        batch needs more): the pooled blocks a rank sends back and the blocks it receives are
        several MiB per batch on big tables, and a fresh allocation of that size costs its page
        faults in every call.  Only the forward's own steps use them (a forward is a
        collective, so two never overlap on one rank); nothing returned aliases them."""
        buf = self._scratch_buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._scratch_buffers[name] = buf
        return buf[:numel]

    def _forward_routed(self, features: KeyedJaggedTensor, B: int, out: torch.Tensor,
                        malformed: Optional[str]) -> None:
        plan, comm = self._plan, self.comm
        # A malformed batch or a bad id is found before anything is sent, and every rank learns
        # of it in the first exchange: all raise together rather than leave the others waiting.
        if malformed is not None:
            message = f"{type(self).__name__}: {malformed}"
            features = KeyedJaggedTensor(keys=features.keys(), values=torch.zeros(0, dtype=torch.long),
                                         lengths=torch.zeros(len(features.keys()) * B, dtype=torch.long),
                                         stride=B)  # (nothing is sent; only the shapes matter)
            kjt = select_features(features, plan["features"])
        else:
            kjt = select_features(features, plan["features"])
            message = self._first_bad(kjt, plan["rows"], plan["tables"]) if self.check_ids else None
        # One dtype on every rank (what one sends, another reads): int32 where every routed
        # table has fewer than 2**31 rows, so every valid id fits; half the bytes of int64 on
        # the wire and through bucketize and permute (ids are checked above unless the user
        # turned the check off and vouched for them).
        wire = plan["wire_dtype"]
        values, lengths, weights = kjt.values().to(wire), kjt.lengths().to(wire), kjt.weights_or_none()
        F, R = len(plan["features"]), plan["R"]
        if R > 1 and message is None:
            lengths, values, weights, _, _ = torch.ops.fbgemm.block_bucketize_sparse_features(
                lengths, values, False, False, plan["block_sizes"].to(values.dtype), R, weights, None, -1,
                [p.to(values.dtype) for p in plan["pos"]])
        elif R > 1:  # (not sent: only the lengths' shapes matter)
            lengths = lengths.new_zeros(R * F * B)
        # segments (row group, slot) -> one per (rank, local feature), in rank order
        lengths, values, weights = torch.ops.fbgemm.permute_2D_sparse_data(
            plan["permute"], lengths.view(R * F, B), values, weights)
        counts = plan["count"]
        seg_sums = lengths.sum(1) if B else torch.zeros(len(plan["permute"]), dtype=lengths.dtype)
        n_values = [int(x.sum()) for x in torch.split(seg_sums, counts)]
        meta = comm.exchange([torch.tensor([n, B, message is not None], dtype=torch.long) for n in n_values],
                             [3] * comm.world)
        if message is not None:
            raise ValueError(message)
        failed = [r for r, m in enumerate(meta) if int(m[2])]
        if failed:
            raise ValueError(f"rank {failed[0]}'s batch was refused: malformed or an id outside its table "
                             "(that rank's error says which)")
        src_values = [int(m[0]) for m in meta]
        src_B = [int(m[1]) for m in meta]
        mine = len(plan["local_keys"])
        n_lengths = [mine * b for b in src_B]
        sends = [(lengths.reshape(-1), [c * B for c in counts], n_lengths,
                  self._scratch("lengths", sum(n_lengths), lengths.dtype, comm.device)),
                 (values, n_values, src_values, self._scratch("values", sum(src_values), values.dtype, comm.device))]
        if self.layout.is_weighted:
            w = weights if weights is not None else torch.ones(values.numel(), device=values.device)
            sends.append((w.float(), n_values, src_values,
                          self._scratch("weights", sum(src_values), torch.float32, comm.device)))
        got = comm.exchange_flat_many(sends)  # in flight together
        got_lengths, got_values = got[0], got[1]
        got_weights = got[2] if self.layout.is_weighted else None
        width = int(plan["cols"][comm.rank].numel())
        pooled = self._scratch("pooled", sum(src_B) * width, torch.float32, out.device).view(sum(src_B), width)
        lo = vo = bo = 0
        for s in range(comm.world):
            if mine and src_B[s]:
                part = KeyedJaggedTensor(keys=plan["local_keys"], values=got_values[vo:vo + src_values[s]],
                                         lengths=got_lengths[lo:lo + mine * src_B[s]],
                                         weights=None if got_weights is None else got_weights[vo:vo + src_values[s]],
                                         stride=src_B[s])
                self.routed.pooled_into(part, pooled[bo:bo + src_B[s]])
            lo += mine * src_B[s]
            vo += src_values[s]
            bo += src_B[s]
        widths = [int(c.numel()) for c in plan["cols"]]
        back = comm.exchange_flat(pooled.view(-1), [b * width for b in src_B], [B * w for w in widths],
                                  self._scratch("back", B * sum(widths), torch.float32, comm.device))
        if B:
            self._place_blocks(back, widths, B, out)

    def _place_blocks(self, back: torch.Tensor, widths: List[int], B: int, out: torch.Tensor) -> None:
        """The pooled blocks every rank sent back (rank by rank, ``B x widths[d]`` each) into
        their output columns: the first writer of a column copies, row-range partial sums add."""
        start = 0
        for d, runs in enumerate(self._plan["runs"]):
            block = back[start:start + B * widths[d]].view(B, widths[d])
            start += B * widths[d]
            for dst, src, n, add in runs:
                if add:
                    out[:, dst:dst + n] += block[:, src:src + n]
                else:
                    out[:, dst:dst + n] = block[:, src:src + n]
