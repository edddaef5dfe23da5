"""SHARK's F-Permutation: field importance from the gradients of ordinary training steps.

For every feature ``f`` and sample ``n`` with pooled embedding ``e[n,f]`` (the slice of the
``KeyedTensor`` an ``EmbeddingBagCollection`` returns) and per-sample gradient
``g[n,f] = dℓ_n / de[n,f]``, the tracker accumulates (``shark-method.md`` section 1)::

    S_f = (1 / N_seen) · Σ_n | < g[n,f] , b[n,f] − e[n,f] > |

with the baseline ``b`` one of:

* ``"mean"``: the mean of ``e[·,f]`` over the current global batch (all ranks), i.e. the
  expectation of ``e[π(n),f]`` over the permutations ``π`` of the batch;
* ``"shuffle"``: ``e[π(n),f]`` for a random permutation ``π`` of the *global* batch (drawn
  from ``(seed, step)``, so every world size draws the same one);
* ``"zero"``: ``0``, i.e. ``|<g, e>|``, the Taylor estimate of removing the field.

Per-sample gradients: with ``loss_reduction="mean"`` (TorchRec's ``DLRMTrain``, any
``BCEWithLogitsLoss()``), the gradient the hook sees is ``1/B`` of the per-sample one, ``B``
being the batch the loss was averaged over.  In a ``DistributedModelParallel`` model the hook
on the sharded collection sees the gradient of the rank's *local* mean loss (the division by
the world size happens later, in TorchRec's all-to-all backward), so ``B`` is the local batch.
Either way the score does not depend on batch size or world size.

A field contributes only in batches where its pooled embedding varies across the global
batch: a field whose input never varies carries no information (every baseline would at best
measure a constant offset that the model's biases absorb), so it scores exactly 0 under every
baseline.  Without this gate, ``zero`` scores a constant field by ``|<g, e>|``, which is large
because every sample's gradient reaches its one row; and a running mean over all past batches
(this tracker's earlier ``mean`` baseline) drifts away from the constant row as training moves
it, so ``mean`` scored constant fields above informative ones on real logs.  The gate is per
global batch: under ``mean`` and ``shuffle`` a field constant within a batch contributes 0
there anyway (its baseline is its own value), so only ``zero`` depends on it — a field of few
values, often constant within small batches, scores less with them.  A global batch of one
sample varies in nothing: such steps score nothing (logged).

Non-finite contributions (NaN/Inf gradients or embeddings) are skipped per (sample, feature)
and counted in :attr:`TaylorFieldImportance.skipped` (and logged); they never enter a score.
Under ``mean`` a non-finite embedding also makes its field's batch mean non-finite, so that
batch's every contribution of the field is skipped (and counted) with it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedTensor

from shark_torchrec.importance.background import Background
from shark_torchrec.sharded.comm import Comm
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.importance.base import (
    FieldImportance,
    _strip,
    collection_tables,
    embedding_collections,
)

logger = logging.getLogger(__name__)

BASELINES = ("mean", "shuffle", "zero")


def _fused(*tensors: torch.Tensor) -> bool:
    """Whether the tracker's C++ kernels apply: float32 CPU tensors, kernels built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and cpu_kernel_available()


def _column_stats(e: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(column sums in float64, minima, maxima) of a step's pooled embeddings [B, C]."""
    if e.shape[0] and _fused(e):
        return torch.ops.shark_torchrec.column_stats(e.contiguous())
    if e.shape[0] == 0:
        C = e.shape[1]
        return (torch.zeros(C, dtype=torch.float64, device=e.device),
                torch.full((C,), float("inf"), device=e.device), torch.full((C,), float("-inf"), device=e.device))
    return e.sum(0, dtype=torch.float64), e.amin(0), e.amax(0)


class _Accumulator:
    """Per-collection running sums (float64), kept per rank until :meth:`scores` reduces."""

    def __init__(self, features: List[str], dim_per_feature: List[int]) -> None:
        self.features = features
        self.dims = dim_per_feature
        F = len(features)
        self.score_sum = torch.zeros(F, dtype=torch.float64)
        self.count = torch.zeros(F, dtype=torch.float64)
        self.skipped = torch.zeros(F, dtype=torch.float64)
        self.grad_sq_sum = torch.zeros(F, dtype=torch.float64)  # Σ_n ‖g[n,f]‖² (finite samples)
        self.steps = 0
        self.layouts: Dict[tuple, "_Layout"] = {}  # by output (keys, dims)


class _Layout:
    """How the columns of a collection's output map onto the tracker's features."""

    def __init__(self, acc: _Accumulator, keys: List[str], lengths: List[int]) -> None:
        index = {f: i for i, f in enumerate(acc.features)}
        unknown = sorted(set(keys) - set(index))
        if unknown:
            raise KeyError(f"output features {unknown} are not in the collection's tables")
        self.out_features = torch.tensor([index[k] for k in keys])
        self.num_out = len(keys)
        # Equal dims (the usual case, and DLRM's) allow a fused batched dot product.
        self.dim = lengths[0] if len(set(lengths)) == 1 else None
        self.col_to_out = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor(lengths))


class TaylorFieldImportance(FieldImportance):
    """Accumulates SHARK's Taylor field importance during training.

    Attach it to a model (plain, or wrapped in ``DistributedModelParallel``) and train as
    usual; every training forward/backward through an ``EmbeddingBagCollection`` adds to the
    scores.  Hooks exist only while attached::

        tracker = TaylorFieldImportance(dmp_model, baseline="mean")
        with tracker:                      # registers hooks; always removes them
            for batch in loader:
                train_step(batch)
        print(tracker.scores())            # collective under torch.distributed

    Args:
        model: the model; every plain or sharded ``EmbeddingBagCollection`` in it is tracked.
            A sharded model must already be wrapped (hooks on an unsharded collection are
            lost when DMP swaps it for the sharded one).
        baseline: ``"mean"``, ``"shuffle"`` or ``"zero"`` (see the module docstring).
        loss_reduction: ``"mean"`` if the loss averages over the batch, ``"sum"`` if it sums.
        seed: seeds the ``shuffle`` permutations.
        process_group: the group scores are reduced over (default: the world, when
            ``torch.distributed`` is initialised).
        background: accumulate each step's sums on a worker thread while the step goes on
            (CPU tensors; :mod:`~shark_torchrec.importance.background`); ``False``: in the
            gradient hook.  The results are the same.  With ``mean`` and ``zero`` the worker
            also makes the step's pass over the pooled embeddings (column sums and ranges) and,
            distributed, gathers them over a gloo group of the tracker's ranks of its own
            (created at the first tracked forward).
    """

    def __init__(
        self,
        model: nn.Module,
        baseline: str = "mean",
        loss_reduction: str = "mean",
        seed: int = 0,
        process_group: Optional[Any] = None,
        background: bool = True,
    ) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.baseline = baseline
        self.name = f"shark-{baseline}"
        self.loss_reduction = loss_reduction
        self.seed = seed
        self._pg = process_group
        self._modules = embedding_collections(model)
        self._acc: Dict[str, _Accumulator] = {}
        for path, module in self._modules.items():
            tables = collection_tables(module)
            # (TorchRec's output names: a feature several tables read is "<feature>@<table>",
            # once per table, each scored apart)
            feats = [n for names in get_embedding_names_by_table(tables) for n in names]
            dims = [t.embedding_dim for t in tables for _ in t.feature_names]
            self._acc[path] = _Accumulator(feats, dims)
        self._handles: List[Any] = []
        self._background = Background(background)
        self._generation = 0  # tensor hooks of a detached generation do nothing
        #: wall time spent in this tracker's hooks on this rank (its direct cost)
        self.hook_seconds = 0.0
        self._warned_single = False  # (a global batch of one sample: logged once)
        self._stats_pg: Optional[Any] = None  # (:meth:`_stats_group`)

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> "TaylorFieldImportance":
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            self._generation += 1
            for path, module in self._modules.items():
                self._handles.append(
                    module.register_forward_hook(self._make_forward_hook(path, self._generation))
                )
        return self

    def detach(self) -> None:
        """Remove every hook; gradients of forwards already taken are ignored."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._generation += 1

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "TaylorFieldImportance":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ distributed helpers
    def _world(self) -> int:
        if not dist.is_initialized():
            return 1
        return dist.get_world_size(self._pg)

    def _all_reduce(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self._world() == 1:
            return t
        moved = t.to(device)
        dist.all_reduce(moved, group=self._pg)
        return moved.to(t.device)

    # ------------------------------------------------------------------ hooks
    def _make_forward_hook(self, path: str, generation: int):
        def hook(module: nn.Module, inputs: Tuple, output: Any) -> Any:
            # A sharded collection returns an awaitable: wait for it and hand the KeyedTensor
            # on (returning it is required: downstream must not wait a second time).
            kt = output.wait() if isinstance(output, Awaitable) else output
            if not isinstance(kt, KeyedTensor):
                raise TypeError(f"{path}: expected a KeyedTensor output, got {type(kt)}")
            values = kt.values()
            if torch.is_grad_enabled() and values.requires_grad and self._generation == generation:
                t0 = time.perf_counter()
                self._on_forward(path, kt, generation)
                self.hook_seconds += time.perf_counter() - t0
            return kt

        return hook

    def _on_forward(self, path: str, kt: KeyedTensor, generation: int) -> None:
        acc = self._acc[path]
        key = (tuple(kt.keys()), tuple(kt.length_per_key()))
        layout = acc.layouts.get(key)
        if layout is None:  # output order can differ from the config order (sharded)
            layout = acc.layouts[key] = _Layout(acc, kt.keys(), kt.length_per_key())
        e = kt.values().detach()
        step = acc.steps
        acc.steps += 1
        if self._deferred(e):
            # The whole step on the worker thread: the batch statistics too, gathered over the
            # tracker's own process group (:meth:`_stats_group`).  The same operations on the same
            # tensors as inline: the same sums.
            group = self._stats_group() if self._world() > 1 else None

            def stats():
                return self._global_stats(e, _column_stats(e), group)()

            shuffled = None
        else:
            # One pass over the batch (column sums, minima, maxima) and one collective, started
            # here and waited for after the backward (the forward goes on meanwhile).
            stats = self._global_stats(e, _column_stats(e))
            shuffled = self._shuffled(step, e, stats()) if self.baseline == "shuffle" else None

        def grad_hook(g: torch.Tensor) -> None:
            if self._generation == generation:
                t0 = time.perf_counter()
                if g.is_cuda:  # (on the step's own stream)
                    self._score(acc, e, g, layout, step, stats(), shuffled)
                else:  # reads g, e and the baseline only; writes only the tracker's sums
                    self._background.submit(lambda: self._score(acc, e, g, layout, step, stats(), shuffled))
                self.hook_seconds += time.perf_counter() - t0

        kt.values().register_hook(grad_hook)

    def _deferred(self, e: torch.Tensor) -> bool:
        """Whether a step's batch statistics are left to the worker thread as well (CPU, the
        worker on, a baseline that needs nothing before the backward: ``mean`` or ``zero``).
        Their pass over the pooled embeddings was most of what the hooks cost the training
        thread (2.4 of 3.4 ms a step in ``tools/bench_importance_overhead.py``)."""
        return self._background.enabled and e.device.type == "cpu" and self.baseline != "shuffle"

    def _stats_group(self) -> Any:
        """The process group the worker thread gathers each step's batch statistics over: a gloo
        group of the tracker's ranks, its own (created once, at the first tracked forward, by
        every rank of the tracker's group), so that those collectives, made on the worker thread
        in step order, never interleave with the training thread's on other groups."""
        if self._stats_pg is None:
            ranks = dist.get_process_group_ranks(self._pg if self._pg is not None else dist.group.WORLD)
            self._stats_pg = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)
        return self._stats_pg

    def _score(self, acc: _Accumulator, e: torch.Tensor, g: torch.Tensor, layout: _Layout, step: int,
               stats: Tuple, shuffled: Optional[torch.Tensor] = None) -> None:
        """One step's contribution to the sums, from its batch statistics (:meth:`_global_stats`)."""
        sums, count, hi, lo, _ = stats
        if count <= 1 and not self._warned_single:
            self._warned_single = True
            logger.warning("importance: a global batch of %d sample(s): no field varies within it, "
                           "so such steps score nothing (train with larger batches)", int(count))
        varies = self._varies(layout, hi, lo, e.device)
        base = shuffled if self.baseline == "shuffle" else self._mean(sums, count, e)
        self._accumulate(acc, e, base, varies, g, layout, step)

    def _global_stats(self, e: torch.Tensor, local: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      group: Optional[Any] = None):
        """A function returning ``(column sums, samples, column maxima, column minima, samples
        per rank)`` over the global batch: one ``all_gather`` of this rank's (over ``group``,
        default the tracker's), started now and waited for on the first call."""
        sums, lo, hi = local
        B = e.shape[0]
        C = sums.numel()
        packed = torch.cat([sums.double().cpu(), torch.tensor([float(B)], dtype=torch.float64),
                            hi.double().cpu(), lo.double().cpu()])
        W = self._world()
        if W == 1:
            result = (packed[:C], float(B), packed[C + 1:2 * C + 1], packed[2 * C + 1:], [B])
            return lambda: result
        parts = [torch.empty_like(packed) for _ in range(W)]
        work = dist.all_gather(parts, packed, group=group if group is not None else self._pg, async_op=True)
        done: List[Any] = []

        def wait():
            if not done:
                work.wait()
                rows = torch.stack(parts)
                sizes = [int(x) for x in rows[:, C].tolist()]
                done.append((rows[:, :C].sum(0), float(sum(sizes)), rows[:, C + 1:2 * C + 1].amax(0),
                             rows[:, 2 * C + 1:].amin(0), sizes))
            return done[0]

        return wait

    def _mean(self, sums: torch.Tensor, count: float, e: torch.Tensor) -> Optional[torch.Tensor]:
        """The ``mean`` baseline: the global batch's own mean (not a mean over past batches: the
        rows move while training, and a stale mean would score the drift); None for ``zero``."""
        if self.baseline == "zero":
            return None
        mean = sums / max(count, 1.0)
        return mean.to(device=e.device, dtype=e.dtype).unsqueeze(0)

    def _shuffled(self, step: int, e: torch.Tensor, stats) -> torch.Tensor:
        """The ``shuffle`` baseline: each sample's embedding swapped for that of a random other
        sample of the global batch (the same permutation for every world size).  Each rank
        receives only the rows its samples drew (one exchange), not the whole batch."""
        sizes = stats[4]
        N = sum(sizes)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        perm = torch.randperm(N, generator=gen)
        W = self._world()
        if W == 1:
            return e[perm.to(e.device)]
        rank = dist.get_rank(self._pg)
        starts = [sum(sizes[:r]) for r in range(W)]
        ends = torch.tensor([starts[r] + sizes[r] for r in range(W)])
        mine = perm[starts[rank]:starts[rank] + sizes[rank]]
        owner_of_mine = torch.searchsorted(ends, mine, right=True)
        sends, recv_sizes = [], []
        for r in range(W):  # what rank r's samples drew from this rank's rows (all ranks know perm)
            theirs = perm[starts[r]:starts[r] + sizes[r]]
            asked = theirs[torch.searchsorted(ends, theirs, right=True) == rank] - starts[rank]
            sends.append(e[asked.to(e.device)].reshape(-1).cpu())
            recv_sizes.append(int((owner_of_mine == r).sum()) * e.shape[1])
        got = Comm(self._pg).exchange(sends, recv_sizes)
        out = torch.empty_like(e)
        for r in range(W):  # rows from rank r, in the order this rank's samples drew them
            where = (owner_of_mine == r).nonzero().squeeze(1)
            if where.numel():
                out[where.to(e.device)] = got[r].view(-1, e.shape[1]).to(device=e.device, dtype=e.dtype)
        return out

    def _varies(self, layout: _Layout, hi: torch.Tensor, lo: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Per output feature: does its pooled embedding take more than one value over the
        global batch?  (From the global column ranges; NaN ranges count as varying, so that
        non-finite embeddings are counted as skipped.)"""
        col_varies = ~(hi - lo == 0)
        if layout.dim is not None:
            return col_varies.view(layout.num_out, layout.dim).any(1).to(device)
        per_out = torch.zeros(layout.num_out)
        per_out.index_add_(0, layout.col_to_out, col_varies.float())
        return (per_out > 0).to(device)

    def _accumulate(
        self,
        acc: _Accumulator,
        e: torch.Tensor,
        base: Optional[torch.Tensor],
        varies: torch.Tensor,
        g: torch.Tensor,
        layout: _Layout,
        step: int,
    ) -> None:
        B = g.shape[0]
        g = g.detach()
        # per-sample gradients: a loss averaged over the batch scaled them by 1/B
        k = float(B) if self.loss_reduction == "mean" else 1.0
        if layout.dim is not None and _fused(g, e):
            # One pass over g and e (csrc/taylor_sums.cpp): per feature, the sums of |s|, the
            # finite samples and ‖g‖², with no [B, F] or [B, F*D] tensor in between.
            sums, counts, gsq_sums = torch.ops.shark_torchrec.taylor_sums(
                g.contiguous(), e.contiguous(), None if base is None else base.contiguous(), layout.dim,
                varies.to(torch.bool).contiguous())
            sums, gsq_sums = sums * k, gsq_sums * (k * k)
        else:
            # |<g, 0 - e>| = |<g, e>|: the zero baseline needs no difference tensor.
            x = e if base is None else base - e
            if layout.dim is not None:
                # Batched dot products: no [B, sum D] product tensor is materialised.
                g3 = g.reshape(B * layout.num_out, 1, layout.dim)
                s = torch.bmm(g3, x.reshape(B * layout.num_out, layout.dim, 1)).view(B, layout.num_out)
                gsq = torch.bmm(g3, g3.transpose(1, 2)).view(B, layout.num_out).double()
            else:
                s = torch.zeros(B, layout.num_out, dtype=g.dtype, device=g.device)
                s.index_add_(1, layout.col_to_out.to(g.device), g * x)
                gsq = torch.zeros(B, layout.num_out, dtype=g.dtype, device=g.device)
                gsq.index_add_(1, layout.col_to_out.to(g.device), g * g)
                gsq = gsq.double()
            s = s.double() * k
            gsq = gsq * (k * k)
            finite = torch.isfinite(s)
            zero = torch.zeros((), dtype=s.dtype, device=s.device)
            sums = torch.where(finite & varies.unsqueeze(0), s.abs(), zero).sum(0)
            counts = finite.sum(0).double()
            gsq_sums = torch.where(finite & torch.isfinite(gsq), gsq, zero).sum(0)
        acc.score_sum.index_add_(0, layout.out_features, sums.cpu())
        acc.count.index_add_(0, layout.out_features, counts.cpu())
        acc.grad_sq_sum.index_add_(0, layout.out_features, gsq_sums.cpu())
        bad = B - counts
        if bool((bad > 0).any()):
            acc.skipped.index_add_(0, layout.out_features, bad.cpu())
            logger.warning(
                "importance: skipped %d non-finite (sample, feature) contributions at step %d",
                int(bad.sum()), step,
            )

    # ------------------------------------------------------------------ results
    def _reduced(self) -> Dict[str, Tuple[torch.Tensor, ...]]:
        """Per collection, over all ranks: (score sums, counts, skipped, squared-gradient sums)."""
        self._background.drain()
        out = {}
        for path, acc in self._acc.items():
            packed = torch.cat([acc.score_sum, acc.count, acc.skipped, acc.grad_sq_sum])
            packed = self._all_reduce(packed, self._device())
            out[path] = tuple(packed.chunk(4))
        return out

    def _device(self) -> torch.device:
        if dist.is_initialized() and dist.get_backend(self._pg) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _keyed(self) -> Dict[str, Tuple[str, int]]:
        """Public feature name → (collection path, index); names are qualified with the
        collection path only where two collections share a feature name."""
        names: Dict[str, List[Tuple[str, int]]] = {}
        for path, acc in self._acc.items():
            for i, f in enumerate(acc.features):
                names.setdefault(f, []).append((path, i))
        out = {}
        for f, places in names.items():
            if len(places) == 1:
                out[f] = places[0]
            else:
                for path, i in places:
                    out[f"{path}:{f}"] = (path, i)
        return out

    def scores(self) -> Dict[str, float]:
        """``S_f`` per feature, over all ranks (a collective when distributed).  A feature
        with no finite contribution yet scores NaN."""
        red = self._reduced()
        out = {}
        for name, (path, i) in self._keyed().items():
            total, count = red[path][:2]
            out[name] = float(total[i] / count[i]) if count[i] > 0 else float("nan")
        return out

    def gradient_scales(self) -> Dict[str, float]:
        """Per feature, the mean squared norm of the per-sample gradient of the loss with
        respect to its pooled embedding, ``mean_n ‖g[n,f]‖²`` (a collective when distributed):
        how much an error in the field's embeddings moves the loss — the weight the tier
        assignment gives a row's quantization error (``RowwiseQuantConfig`` priorities scaled
        per table).  NaN for a feature with no finite contribution yet."""
        red = self._reduced()
        out = {}
        for name, (path, i) in self._keyed().items():
            count, grad_sq = red[path][1], red[path][3]
            out[name] = float(grad_sq[i] / count[i]) if count[i] > 0 else float("nan")
        return out

    @property
    def skipped(self) -> Dict[str, int]:
        """Non-finite (sample, feature) contributions skipped, per feature, over all ranks."""
        red = self._reduced()
        return {name: int(red[path][2][i]) for name, (path, i) in self._keyed().items()}

    def samples_seen(self) -> Dict[str, int]:
        red = self._reduced()
        return {name: int(red[path][1][i]) for name, (path, i) in self._keyed().items()}

    def reset(self) -> None:
        """Forget every accumulated score (the hooks stay as they are)."""
        self._background.discard()
        for path, acc in self._acc.items():
            self._acc[path] = _Accumulator(acc.features, acc.dims)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The totals over all ranks (a collective when distributed): identical on every rank,
        so it can be saved by any of them and loaded under any world size."""
        red = self._reduced()
        state: Dict[str, Any] = {"baseline": self.baseline, "collections": {}}
        for path, acc in self._acc.items():
            total, count, skipped, grad_sq = red[path]
            state["collections"][path] = {
                "features": list(acc.features),
                "score_sum": total.clone(),
                "count": count.clone(),
                "skipped": skipped.clone(),
                "grad_sq_sum": grad_sq.clone(),
                "steps": torch.tensor(acc.steps),
            }
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore totals saved by :meth:`state_dict` (on every rank)."""
        if state.get("baseline") != self.baseline:
            raise ValueError(
                f"importance state was collected with baseline {state.get('baseline')!r}, "
                f"this tracker uses {self.baseline!r}"
            )
        # (states saved before DMP's prefix was stripped name it: the same collections)
        saved = {_strip(k): v for k, v in state["collections"].items()}
        if set(saved) != set(self._acc):
            raise ValueError(
                f"importance state covers collections {sorted(saved)}, the model has "
                f"{sorted(self._acc)}"
            )
        for path, acc in self._acc.items():  # (every part checked before any is replaced)
            if list(saved[path]["features"]) != acc.features:
                raise ValueError(
                    f"importance state for {path} has features {list(saved[path]['features'])}, "
                    f"the model has {acc.features}"
                )
        self._background.discard()  # (the sums are replaced: an earlier failed step no longer counts)
        rank0 = not dist.is_initialized() or dist.get_rank(self._pg) == 0
        for path, acc in self._acc.items():
            s = saved[path]
            # Totals live on rank 0 only, so that the next reduction counts them once.
            scale = 1.0 if rank0 else 0.0
            acc.score_sum = s["score_sum"].double().cpu() * scale
            acc.count = s["count"].double().cpu() * scale
            acc.skipped = s["skipped"].double().cpu() * scale
            if "grad_sq_sum" in s:  # (absent from states saved before it was tracked)
                acc.grad_sq_sum = s["grad_sq_sum"].double().cpu() * scale
            # (states saved before the mean baseline became the batch mean also hold
            # "mean_sum"/"mean_count": nothing reads them now)
            acc.steps = int(s["steps"])
