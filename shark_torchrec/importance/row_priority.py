"""SHARK's F-Quantization priorities: how much every embedding row matters, from training.

Every row ``v`` of every table keeps a priority (``shark-method.md`` section 2)::

    p[v] ← γ^(Δt) · p[v] + Σ_{occurrences of v in the batch} (α if label = 1 else β)

updated once per training step from the step's ids and labels.  Defaults (ours; the paper gives
none): ``α = 1`` for an occurrence in a positive sample, ``β = 0.2`` in a negative one (a click
counts five times an impression without one), and ``γ = 0.9999`` per step (a half-life of about
6,900 steps).  Ids of a bag with per-id weights count once each (weights are not used).

The decay is applied through one global scale, never row by row: increments at step ``t`` are
stored multiplied by ``γ^-t`` and read back multiplied by ``γ^T``.  When that scale grows past
``e^60`` every stored value is renormalised once (with ``γ = 0.9999``: every 600,000 steps).

**Sharded.**  Each table's rows are split evenly over the ranks of the process group, and a
rank keeps only its own rows: 8 bytes per row and channel (float64), divided by the world size.  Every
rank buffers the ids of its own batches and, every ``flush_every`` steps, sends them (with
their increments) to the ranks that own their rows (one ``all_to_all``).  After a flush the
priorities equal a single-process run on the same global batches.  :meth:`rows` answers any
rank's request for any rows (the tier assignment asks for the rows it decides);
:meth:`save` / :meth:`load` write and read each rank's part, on any number of ranks.

Several ``(α, β, γ)`` channels can share one tracker (one pass over the ids, one exchange):
``RowPriority(tables, channels={"positive": (1, 0, γ), "negative": (0, 1, γ)})`` keeps the
counts any ``α · positive + β · negative`` is made of (see :meth:`rows`).

``update`` (and :meth:`attach`'s hook) is a collective every ``flush_every`` steps: every rank
updates at every training step, as data-parallel training does.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.importance.background import Background
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.sharded.comm import Comm

_RENORMALISE_AT = 60.0  # log of the stored scale at which values are renormalised
_STATE_FORMAT = "shark-torchrec/row-priority/v2"


def owned_rows(rows: int, world: int, rank: int) -> Tuple[int, int]:
    """``[start, end)`` of the rows of a table of ``rows`` rows that ``rank`` of ``world`` keeps."""
    return rows * rank // world, rows * (rank + 1) // world


class RowPriority:
    """Per-row priorities of a model's embedding tables, accumulated while training, sharded
    over the ranks (see the module docstring).

    Args:
        tables: the tables to track (e.g. ``ebc.embedding_bag_configs()``).
        alpha: increment for an occurrence in a positive sample.
        beta: increment for an occurrence in a negative sample.
        gamma: decay per step, in ``(0, 1]``.
        process_group: the group rows are sharded over (default: the world, when
            ``torch.distributed`` is initialised).
        channels: ``{name: (alpha, beta, gamma)}`` to keep several priorities at once (then
            ``alpha``, ``beta``, ``gamma`` are not used); default one channel ``"priority"``.
        flush_every: steps between two exchanges of the buffered ids.
        background: add each step's counts on a worker thread while the step goes on
            (:mod:`~shark_torchrec.importance.background`; ids are still checked at once);
            ``False``: in :meth:`update`.  The results are the same.

    Use :meth:`update` with every training batch, or :meth:`attach` it to the module that
    receives the ``Batch`` (TorchRec's ``DLRMTrain``, or the DMP model wrapping it).
    """

    #: bytes per row and channel, over all ranks (each keeps its share): float64 counts, as each
    #: occurrence adds one increment (float32 stopped counting a hot row at 2^24 occurrences,
    #: and rounded each decayed increment to its count's spacing well before)
    bytes_per_row = 8

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        alpha: float = 1.0,
        beta: float = 0.2,
        gamma: float = 0.9999,
        process_group: Optional[Any] = None,
        channels: Optional[Mapping[str, Tuple[float, float, float]]] = None,
        flush_every: int = 32,
        background: bool = True,
    ) -> None:
        channels = dict(channels) if channels else {"priority": (alpha, beta, gamma)}
        for name, (a, b, g) in channels.items():
            if not (a >= 0 and b >= 0 and a + b > 0):
                raise ValueError(f"alpha and beta must be >= 0, not both 0 (got {a}, {b}, channel {name!r})")
            if not 0 < g <= 1:
                raise ValueError(f"gamma must be in (0, 1], got {g} (channel {name!r})")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.channels = {n: (float(a), float(b), float(g)) for n, (a, b, g) in channels.items()}
        self._names = list(self.channels)
        self.alpha, self.beta, self.gamma = self.channels[self._names[0]]
        self.tables = list(tables)
        self.flush_every = flush_every
        self.comm = Comm(process_group)
        self._feature_table: Dict[str, str] = {}
        self._rows: Dict[str, int] = {}
        for t in self.tables:
            self._rows[t.name] = t.num_embeddings
            for f in t.feature_names:
                if f in self._feature_table:
                    raise ValueError(f"feature {f!r} is served by two tables")
                self._feature_table[f] = t.name
        W, r = self.comm.world, self.comm.rank
        self._own = {t.name: owned_rows(t.num_embeddings, W, r) for t in self.tables}
        # Global row index: tables one after the other.  Segment (t, q) is rank q's share of
        # table t; a row's segment gives its owner (q) and its place in the owner's flat
        # storage (every table's owned rows one after the other).
        self._base = {}
        bounds, local_offset, base, offset = [], [], 0, 0
        for t in self.tables:
            self._base[t.name] = base
            for q in range(W):
                s0, e0 = owned_rows(t.num_embeddings, W, q)
                bounds.append(base + s0)
                if q == r:
                    local_offset.append(offset - base - s0)  # local = global + this
                else:
                    local_offset.append(0)
            offset += self._own[t.name][1] - self._own[t.name][0]
            base += t.num_embeddings
        self._bounds = torch.tensor(bounds, dtype=torch.long)
        self._local_offset = torch.tensor(local_offset, dtype=torch.long)
        # this rank's rows × channels, a row's channels side by side (one cache line per update)
        self._counts = torch.zeros(offset, len(self._names), dtype=torch.float64)
        self._log_scale = {c: 0.0 for c in self._names}
        self.step = 0
        # buffered (global rows, labels, step in the buffer) of this rank's batches
        self._buffer: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._buffer_scales: List[List[float]] = []
        self._handle = None
        #: wall time spent in :meth:`update` on this rank (its direct cost, flushes included)
        self.seconds = 0.0
        self._background = Background(background)

    @property
    def _values(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """``{channel: {table: this rank's rows}}`` (views of the storage)."""
        out = {}
        for k, c in enumerate(self._names):
            views, offset = {}, 0
            for t in self.tables:
                n = self._own[t.name][1] - self._own[t.name][0]
                views[t.name] = self._counts[offset:offset + n, k]
                offset += n
            out[c] = views
        return out

    @property
    def memory_bytes(self) -> int:
        """Bytes this rank holds for the priorities (its rows, every channel)."""
        return self._counts.numel() * self._counts.element_size()

    # ------------------------------------------------------------------ updates
    def update(self, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> None:
        """Add one training step: ``kjt`` (this rank's batch) and its 0/1 ``labels``."""
        t0 = time.perf_counter()
        try:
            self._update(kjt, labels)
        finally:
            self.seconds += time.perf_counter() - t0

    def _update(self, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> None:
        B = kjt.stride()
        if labels.numel() != B:
            raise ValueError(f"{labels.numel()} labels for a batch of {B}")
        keys = kjt.keys()
        tracked = [i for i, k in enumerate(keys) if k in self._feature_table]
        if tracked and len(tracked) != len(keys):
            kjt = kjt.permute(tracked)
        if tracked:  # before anything changes: a refused batch leaves the counts as they were
            self._check_ids(kjt)
        # This step's decay first (old values × γ), then its increments at full weight: with
        # values stored × γ^-t, that is one more factor γ^-1 on the stored scale.
        for c, (_, _, g) in self.channels.items():
            if g < 1:
                self._log_scale[c] -= math.log(g)
        positive = labels.detach().reshape(-1).cpu() > 0.5
        scales = [self._log_scale[c] for c in self._names]
        self.step += 1
        if self.comm.world == 1 and tracked and cpu_kernel_available():
            # every row is this rank's: added at once from the batch, nothing buffered
            key_base = torch.tensor([self._base[self._feature_table[k]] for k in kjt.keys()], dtype=torch.long)
            # copies: the worker reads them after this step, and a loader may reuse its buffers
            values, lengths = kjt.values().cpu().clone(), kjt.lengths().cpu().clone()
            w = self._increments([scales])
            self._background.submit(lambda: torch.ops.shark_torchrec.row_counts_add_batch(
                self._counts, values, lengths, key_base, positive.contiguous(), w))
        else:
            if tracked:
                rows, labels_of_id = self._global_rows(kjt, positive, B)
            else:
                rows, labels_of_id = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
            if self.comm.world == 1:
                self._add(rows, labels_of_id, torch.zeros(rows.numel(), dtype=torch.long), [scales])
            else:
                self._buffer.append((rows, labels_of_id))
                self._buffer_scales.append(scales)
        renormalise = any(s > _RENORMALISE_AT for s in self._log_scale.values())
        if renormalise:
            self._background.drain()  # the counts added at the old scale first
        if len(self._buffer) >= self.flush_every or renormalise:
            self._flush()
        if renormalise:
            for k, c in enumerate(self._names):
                self._counts[:, k].mul_(math.exp(-self._log_scale[c]))
                self._log_scale[c] = 0.0

    def _increments(self, scales: List[List[float]]) -> torch.Tensor:
        """float64 [steps, 2, channels]: (α, then β) × the stored scale of each step."""
        ab = torch.tensor([[a, b] for a, b, _ in self.channels.values()], dtype=torch.float64)  # [C, 2]
        return (torch.exp(torch.tensor(scales, dtype=torch.float64)).unsqueeze(1)
                * ab.t().unsqueeze(0)).contiguous()

    def _add(self, local: torch.Tensor, positive: torch.Tensor, step: torch.Tensor, scales: List[List[float]]) -> None:
        """counts[local[i]] += (α | β) × the stored scale of step[i], every channel."""
        if local.numel() == 0:
            return
        w = self._increments(scales)
        if cpu_kernel_available():
            torch.ops.shark_torchrec.row_counts_add(self._counts, local.contiguous(), positive.contiguous(),
                                                    step.contiguous(), w)
            return
        inc = w[step, (~positive).long()]  # [n, C]
        self._counts.index_add_(0, local, inc)

    def _check_ids(self, kjt: KeyedJaggedTensor) -> None:
        """Raise naming the feature, the id and the table of the first id outside its table."""
        keys = kjt.keys()
        values = kjt.values().cpu()
        per_key = torch.tensor(kjt.length_per_key(), dtype=torch.long)
        rows = torch.tensor([self._rows[self._feature_table[k]] for k in keys], dtype=torch.long)
        if cpu_kernel_available():
            bad = torch.ops.shark_torchrec.first_id_outside(values.contiguous(), per_key, rows)
        else:
            key_of = torch.repeat_interleave(torch.arange(len(keys)), per_key)
            wrong = (values.long() < 0) | (values.long() >= rows[key_of])
            bad = int(wrong.nonzero()[0]) if bool(wrong.any()) else -1
        if bad >= 0:
            j = int(torch.searchsorted(torch.cumsum(per_key, 0), torch.tensor([bad]), right=True)[0])
            table = self._feature_table[keys[j]]
            raise ValueError(f"feature {keys[j]!r}: id {int(values[bad])} is outside table {table!r} "
                             f"({self._rows[table]} rows)")

    def _global_rows(self, kjt: KeyedJaggedTensor, positive: torch.Tensor, B: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every id's global row and its sample's label: a few vector ops over all the batch's
        ids (checked against their tables by the caller)."""
        keys = kjt.keys()
        values = kjt.values().cpu()
        per_key = torch.tensor(kjt.length_per_key(), dtype=torch.long)
        base = torch.tensor([self._base[self._feature_table[k]] for k in keys], dtype=torch.long)
        n = values.numel()
        global_rows = values.long() + torch.repeat_interleave(base, per_key, output_size=n)
        lengths = kjt.lengths().cpu()
        labels = torch.repeat_interleave(positive.repeat(len(keys)), lengths, output_size=n)
        return global_rows, labels

    def _flush(self) -> None:
        """Collective: the buffered ids go to the ranks owning their rows (one exchange), which
        add their increments; and the counts handed to the worker thread are in."""
        self._background.drain()
        if not self._buffer:
            return
        rows = torch.cat([b[0] for b in self._buffer])
        labels = torch.cat([b[1] for b in self._buffer])
        step = torch.repeat_interleave(torch.arange(len(self._buffer)),
                                       torch.tensor([b[0].numel() for b in self._buffer]), output_size=rows.numel())
        scales = self._buffer_scales
        self._buffer, self._buffer_scales = [], []
        W = self.comm.world
        if W > 1:
            seg = torch.searchsorted(self._bounds, rows, right=True) - 1
            owner = seg % W
            # (ids, labels, buffer steps) per owner, in one exchange each; the owner computes
            # the increments (sending them would cost 4 bytes per channel and id)
            parts = [owner == q for q in range(W)]
            counts = [int(m.sum()) for m in parts]
            packed = torch.cat([torch.stack([rows[m], labels[m].long(), step[m]]).t().reshape(-1) for m in parts])
            sizes = self.comm.exchange([torch.tensor([c], dtype=torch.long) for c in counts], [1] * W)
            got = self.comm.exchange_flat(packed, [3 * c for c in counts], [3 * int(x) for x in sizes]).view(-1, 3)
            # every rank buffered the same steps: the scales of step i are the same everywhere
            rows, labels, step = got[:, 0].contiguous(), got[:, 1].bool(), got[:, 2]
            seg = torch.searchsorted(self._bounds, rows, right=True) - 1
        else:
            seg = torch.searchsorted(self._bounds, rows, right=True) - 1
        self._add(rows + self._local_offset[seg], labels, step, scales)

    def attach(self, module: nn.Module) -> "RowPriority":
        """Update from every training-mode forward of ``module``, which must be called with a
        TorchRec ``Batch`` (ids and labels): ``DLRMTrain``, or the DMP model wrapping it.  A
        module called otherwise (TorchRec's ``DLRM`` takes no labels) is refused — at once when
        it is recognisably one, else at its first training forward — since the priorities
        would stay zero; call :meth:`update` with each batch instead."""
        if self._handle is not None:
            raise RuntimeError("RowPriority is already attached")
        inner = module
        while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DMP, DDP
            inner = inner.module
        if isinstance(inner, DLRM):
            raise TypeError(f"RowPriority.attach: {type(inner).__name__} is called with (dense, sparse) "
                            "features and no labels, so the tracker cannot see them. Attach to the "
                            "module called with the Batch (e.g. torchrec's DLRMTrain), or call "
                            "tracker.update(kjt, labels) in the training loop.")

        def hook(mod: nn.Module, inputs: tuple) -> None:
            if not mod.training:
                return
            if not (inputs and isinstance(inputs[0], Batch)):
                raise TypeError(f"RowPriority.attach: {type(mod).__name__} was called with "
                                f"{tuple(type(a).__name__ for a in inputs)}, not a TorchRec Batch, so the "
                                "tracker sees no ids or labels. Attach to the module called with the "
                                "Batch, or call tracker.update(kjt, labels) in the training loop.")
            self.update(inputs[0].sparse_features, inputs[0].labels)

        self._handle = module.register_forward_pre_hook(hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "RowPriority":
        if self._handle is None:
            raise RuntimeError("call attach(module) first, or use update() directly")
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ results
    def _channel(self, channel: Optional[str]) -> str:
        if channel is None:
            if len(self._names) > 1:
                raise ValueError(f"name the channel: {self._names}")
            return self._names[0]
        if channel not in self.channels:
            raise KeyError(f"no channel {channel!r} (channels: {self._names})")
        return channel

    def _mixed(self, table: str, mix: Mapping[str, float]) -> torch.Tensor:
        """This rank's rows of ``table``: ``Σ coef · channel``, decayed to the current step."""
        out = torch.zeros(self._values[self._names[0]][table].numel(), dtype=torch.float64)
        for c, coef in mix.items():
            out += coef * math.exp(-self._log_scale[self._channel(c)]) * self._values[c][table].double()
        return out

    def _mix(self, mix: Optional[Mapping[str, float]]) -> Dict[str, float]:
        return {self._channel(None): 1.0} if mix is None else {self._channel(c): float(v) for c, v in mix.items()}

    def rows(self, requests: Sequence[Tuple[str, int, int]], mix: Optional[Mapping[str, float]] = None
             ) -> List[torch.Tensor]:
        """Collective: the priorities (float64) of each requested ``(table, row_offset, rows)``
        — each rank asks for its own rows (e.g. those it decides the tiers of).  ``mix``:
        ``{channel: coefficient}`` (default: the only channel)."""
        self._flush()
        mix = self._mix(mix)
        asked = self.comm.all_gather_object([(t, int(r0), int(n)) for t, r0, n in requests])
        for rank, reqs in enumerate(asked):  # (checked on every rank alike: all raise, none waits)
            for t, r0, n in reqs:
                if t not in self._rows:
                    raise KeyError(f"RowPriority.rows: rank {rank} asked for table {t!r}, not tracked "
                                   f"(tables: {sorted(self._rows)})")
                if r0 < 0 or n < 0 or r0 + n > self._rows[t]:  # (answered in part, silently, before)
                    raise ValueError(f"RowPriority.rows: rank {rank} asked for rows {r0}..{r0 + n} of table {t!r}, "
                                     f"which has {self._rows[t]}")
        sends = []
        mine = {t.name: self._mixed(t.name, mix) for t in self.tables}
        for reqs in asked:  # what each rank asked for, answered from the rows kept here
            parts = []
            for t, r0, n in reqs:
                s, e = self._own[t]
                lo, hi = max(r0, s), min(r0 + n, e)
                if lo < hi:
                    parts.append(mine[t][lo - s:hi - s])
            sends.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
        got = self.comm.exchange(sends)
        out = []
        offsets = [0] * self.comm.world
        for t, r0, n in requests:
            pieces = []
            for r in range(self.comm.world):
                s, e = owned_rows(self._rows[t], self.comm.world, r)
                lo, hi = max(r0, s), min(r0 + n, e)
                if lo < hi:
                    pieces.append(got[r][offsets[r]:offsets[r] + hi - lo])
                    offsets[r] += hi - lo
            out.append(torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64))
        return out

    def priorities(self, channel: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """``{table: float64 tensor [rows]}``: whole tables on every rank, decayed to the current
        step (a collective).  It gathers every row to every rank: for tests and small models;
        :meth:`rows` asks for some rows only."""
        tables = [t.name for t in self.tables]
        got = self.rows([(t, 0, self._rows[t]) for t in tables], {self._channel(channel): 1.0})
        return dict(zip(tables, got))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """This rank's part (a collective: buffered ids are flushed first).  Load it with
        :meth:`load_state_dict` on the same rank of a group of the same size; :meth:`save` /
        :meth:`load` reshard."""
        self._flush()
        return {"format": _STATE_FORMAT, "channels": {c: list(v) for c, v in self.channels.items()},
                "step": self.step, "log_scale": dict(self._log_scale), "world_size": self.comm.world,
                "rank": self.comm.rank, "rows": dict(self._rows),
                "values": {c: {t: v.clone() for t, v in ch.items()} for c, ch in self._values.items()}}

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a row-priority state (format {_STATE_FORMAT!r})")
        theirs = {c: tuple(float(x) for x in v) for c, v in state["channels"].items()}
        if theirs != self.channels:
            for key, i in (("alpha", 0), ("beta", 1), ("gamma", 2)):
                for c in self.channels:
                    if c in theirs and theirs[c][i] != self.channels[c][i]:
                        raise ValueError(f"row-priority state has {key}={theirs[c][i]}, this tracker "
                                         f"{self.channels[c][i]} (channel {c!r})")
            raise ValueError(f"row-priority state has channels {theirs}, this tracker {self.channels}")
        if dict(state["rows"]) != self._rows:
            raise ValueError(f"row-priority state covers tables {state['rows']}, this tracker {self._rows}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        if (state["world_size"], state["rank"]) != (self.comm.world, self.comm.rank):
            raise ValueError(f"row-priority state of rank {state['rank']} of {state['world_size']}, loaded "
                             f"on rank {self.comm.rank} of {self.comm.world}: use save() / load() to reshard")
        self._background.discard()  # (the sums are replaced: an earlier failed step no longer counts)
        self._buffer, self._buffer_scales = [], []
        for c, ch in state["values"].items():
            views = self._values[c]
            for t, v in ch.items():
                views[t].copy_(v.double())
        self.step = int(state["step"])
        self._log_scale = {c: float(v) for c, v in state["log_scale"].items()}

    def save(self, directory: str) -> None:
        """Collective: every rank writes its part to ``directory`` (``rank-<r>.pt``)."""
        state = self.state_dict()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank-{self.comm.rank:05d}.pt")
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        self.comm.barrier()

    def load(self, directory: str) -> None:
        """Read a :meth:`save`\\ d directory written by any number of ranks: this rank reads
        the parts holding its rows (memory-mapped)."""
        self._background.drain()
        first = os.path.join(directory, f"rank-{0:05d}.pt")
        if not os.path.isfile(first):
            raise FileNotFoundError(f"{directory}: no row-priority parts (rank-00000.pt)")
        head = torch.load(first, map_location="cpu", weights_only=True, mmap=True)
        self._check_state(head)
        W0 = int(head["world_size"])
        parts = {0: head}
        self._buffer, self._buffer_scales = [], []
        for c in self._names:
            for t in self.tables:
                s, e = self._own[t.name]
                out = torch.zeros(e - s, dtype=torch.float64)
                for r in range(W0):
                    s0, e0 = owned_rows(t.num_embeddings, W0, r)
                    lo, hi = max(s, s0), min(e, e0)
                    if lo < hi:
                        if r not in parts:
                            path = os.path.join(directory, f"rank-{r:05d}.pt")
                            if not os.path.isfile(path):
                                raise FileNotFoundError(f"{path}: missing part of the row priorities")
                            parts[r] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                        out[lo - s:hi - s] = parts[r]["values"][c][t.name][lo - s0:hi - s0]
                self._values[c][t.name].copy_(out)
        self.step = int(head["step"])
        self._log_scale = {c: float(v) for c, v in head["log_scale"].items()}

