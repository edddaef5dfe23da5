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

Memory: one float32 per row per rank (4 bytes per row); readout reduces over ranks.  Under
``DistributedModelParallel`` every rank updates from its local batch; after reduction the
priorities equal a single-process run on the same global batches.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

_RENORMALISE_AT = 60.0  # log of the stored scale at which values are renormalised


class RowPriority:
    """Per-row priorities of a model's embedding tables, accumulated while training.

    Args:
        tables: the tables to track (e.g. ``ebc.embedding_bag_configs()``).
        alpha: increment for an occurrence in a positive sample.
        beta: increment for an occurrence in a negative sample.
        gamma: decay per step, in ``(0, 1]``.
        process_group: the group priorities are reduced over (default: the world, when
            ``torch.distributed`` is initialised).

    Use :meth:`update` with every training batch, or :meth:`attach` it to the module that
    receives the ``Batch`` (TorchRec's ``DLRMTrain``, or the DMP model wrapping it).
    """

    bytes_per_row = 4

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        alpha: float = 1.0,
        beta: float = 0.2,
        gamma: float = 0.9999,
        process_group: Optional[Any] = None,
    ) -> None:
        if not (alpha >= 0 and beta >= 0 and alpha + beta > 0):
            raise ValueError(f"alpha and beta must be >= 0, not both 0 (got {alpha}, {beta})")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.tables = list(tables)
        self._pg = process_group
        self._feature_table: Dict[str, str] = {}
        self._rows: Dict[str, int] = {}
        for t in self.tables:
            self._rows[t.name] = t.num_embeddings
            for f in t.feature_names:
                if f in self._feature_table:
                    raise ValueError(f"feature {f!r} is served by two tables")
                self._feature_table[f] = t.name
        self._values = {t.name: torch.zeros(t.num_embeddings, dtype=torch.float32) for t in self.tables}
        self.step = 0
        self._log_scale = 0.0  # log of the factor increments are stored with (γ^-t, renormalised)
        self._handle = None

    @property
    def memory_bytes(self) -> int:
        """Bytes this rank holds for the priorities (``bytes_per_row`` × rows)."""
        return sum(v.numel() * v.element_size() for v in self._values.values())

    # ------------------------------------------------------------------ updates
    def update(self, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> None:
        """Add one training step: ``kjt`` (this rank's batch) and its 0/1 ``labels``."""
        B = kjt.stride()
        if labels.numel() != B:
            raise ValueError(f"{labels.numel()} labels for a batch of {B}")
        # This step's decay first (old values × γ), then its increments at full weight: with
        # values stored × γ^-t, that is one more factor γ^-1 on the stored scale.
        if self.gamma < 1:
            self._log_scale -= math.log(self.gamma)
        scale = math.exp(self._log_scale)
        pos = labels.detach().reshape(-1).to("cpu", torch.float64) > 0.5
        per_sample = torch.where(pos, self.alpha, self.beta) * scale
        lengths = kjt.lengths().cpu()
        values = kjt.values().cpu().long()
        per_key = kjt.length_per_key()
        start = 0
        for i, key in enumerate(kjt.keys()):
            n = per_key[i]
            table = self._feature_table.get(key)
            if table is not None and n:
                ids = values[start : start + n]
                rows = self._rows[table]
                bad = (ids < 0) | (ids >= rows)
                if bool(bad.any()):
                    raise ValueError(
                        f"feature {key!r}: id {int(ids[bad][0])} is outside table {table!r} "
                        f"({rows} rows)"
                    )
                inc = torch.repeat_interleave(per_sample, lengths[i * B : (i + 1) * B])
                self._values[table].index_add_(0, ids, inc.to(torch.float32))
            start += n
        self.step += 1
        if self._log_scale > _RENORMALISE_AT:
            factor = math.exp(-self._log_scale)
            for v in self._values.values():
                v.mul_(factor)
            self._log_scale = 0.0

    def attach(self, module: nn.Module) -> "RowPriority":
        """Update from every training-mode forward of ``module`` (which takes a ``Batch``)."""
        if self._handle is not None:
            raise RuntimeError("RowPriority is already attached")

        def hook(mod: nn.Module, args: tuple) -> None:
            if mod.training and args and isinstance(args[0], Batch):
                self.update(args[0].sparse_features, args[0].labels)

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
    def _reduced(self) -> Dict[str, torch.Tensor]:
        out = {}
        world = dist.get_world_size(self._pg) if dist.is_initialized() else 1
        for name, v in self._values.items():
            total = v.double()
            if world > 1:
                dev = torch.device("cuda", torch.cuda.current_device()) \
                    if dist.get_backend(self._pg) == "nccl" else torch.device("cpu")
                total = total.to(dev)
                dist.all_reduce(total, group=self._pg)
                total = total.cpu()
            out[name] = total
        return out

    def priorities(self) -> Dict[str, torch.Tensor]:
        """``{table: float64 tensor [rows]}`` over all ranks, decayed to the current step
        (a collective under torch.distributed)."""
        factor = math.exp(-self._log_scale)
        return {name: v * factor for name, v in self._reduced().items()}

    def state_dict(self) -> Dict[str, Any]:
        """Totals over all ranks (a collective), identical on every rank."""
        return {
            "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
            "step": torch.tensor(self.step), "log_scale": torch.tensor(self._log_scale, dtype=torch.float64),
            "values": {k: v.float() for k, v in self._reduced().items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("alpha", "beta", "gamma"):
            if float(state[key]) != getattr(self, key):
                raise ValueError(
                    f"row-priority state has {key}={state[key]}, this tracker {getattr(self, key)}"
                )
        values = state["values"]
        if set(values) != set(self._values):
            raise ValueError(f"row-priority state covers tables {sorted(values)}, "
                             f"this tracker {sorted(self._values)}")
        rank0 = not dist.is_initialized() or dist.get_rank(self._pg) == 0
        for name, v in values.items():
            if v.numel() != self._rows[name]:
                raise ValueError(f"row-priority state for {name!r} has {v.numel()} rows, "
                                 f"the table has {self._rows[name]}")
            self._values[name] = v.float().clone() if rank0 else torch.zeros_like(self._values[name])
        self.step = int(state["step"])
        self._log_scale = float(state["log_scale"])
