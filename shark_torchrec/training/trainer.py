"""Training and evaluating a sharded DLRM: the engine behind ``recipes/train_dlrm.py``.

The model is TorchRec's ``DLRMTrain`` (``DLRM`` or ``DLRM_DCN`` plus BCE loss), its tables
sharded by ``DistributedModelParallel`` with a plan from ``EmbeddingShardingPlanner``.  The
embedding optimizer is fused into FBGEMM's TBE (declared with
``_apply_optimizer_in_backward`` before sharding, so the planner sees its state); the dense
layers have their own optimizer; both sit in one ``CombinedOptimizer``.

A sharded step is equivalent to an unsharded step on the global batch: DDP averages the
dense gradients and TorchRec divides the embedding gradients by the world size in the
all-to-all backward (``torchrec-cpu-facts.md`` section 3.1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from shark_torchrec.pruning.mean_fill import field_means
from shark_torchrec.training.distributed import DistEnv
from shark_torchrec.training.init import init_embedding_shards
from shark_torchrec.training.model import EBC_FQN, DLRMConfig, build_dlrm_train
from shark_torchrec.training.sharding import plan_sharding, shard_model

logger = logging.getLogger(__name__)

#: Fused (in-backward) embedding optimizers that FBGEMM runs on CPU and CUDA.
EMBEDDING_OPTIMIZERS: Dict[str, Callable] = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
DENSE_OPTIMIZERS: Dict[str, Callable] = {
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


@dataclass(frozen=True)
class OptimConfig:
    """Optimizers and learning rates.

    Attributes:
        embedding_optimizer: fused TBE optimizer, one of :data:`EMBEDDING_OPTIMIZERS`.
        dense_optimizer: one of :data:`DENSE_OPTIMIZERS`.
        learning_rate: dense learning rate.
        embedding_learning_rate: embedding learning rate (defaults to ``learning_rate``).
        eps: epsilon of the Adagrad variants.
    """

    embedding_optimizer: str = "rowwise_adagrad"
    dense_optimizer: str = "adagrad"
    learning_rate: float = 0.05
    embedding_learning_rate: Optional[float] = None
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding_optimizer must be one of {sorted(EMBEDDING_OPTIMIZERS)}, "
                f"got {self.embedding_optimizer!r}"
            )
        if self.dense_optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(
                f"dense_optimizer must be one of {sorted(DENSE_OPTIMIZERS)}, "
                f"got {self.dense_optimizer!r}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.embedding_learning_rate is not None and not self.embedding_learning_rate > 0:
            raise ValueError(f"embedding_learning_rate must be > 0, got {self.embedding_learning_rate}")

    def _kwargs(self, name: str, lr: float) -> dict:
        return {"lr": lr} if name == "sgd" else {"lr": lr, "eps": self.eps}

    def embedding_kwargs(self) -> dict:
        lr = self.learning_rate if self.embedding_learning_rate is None else self.embedding_learning_rate
        return self._kwargs(self.embedding_optimizer, lr)

    def dense_kwargs(self) -> dict:
        return self._kwargs(self.dense_optimizer, self.learning_rate)


class DLRMTrainer:
    """A DLRM sharded over the process group, with its optimizer, train step and evaluation.

    Args:
        model_config: the DLRM's shape.
        optim_config: optimizers.
        env: the process group (from :func:`~shark_torchrec.training.init_distributed`).
        model: an already built ``DLRMTrain`` matching ``model_config`` (embedding tables on the
            meta device, dense layers on ``env.device``), e.g. a pruned one; its dense weights
            are kept.  By default one is built from ``model_config`` and ``seed``.
        batch_size: per-rank batch size (the planner's estimate of the load).
        seed: seeds the dense layers and the embedding tables (placement-independent).
        constraints: optional ``ParameterConstraints`` per table, handed to the planner.
        sharders: optional sharders (default: TorchRec's ``EmbeddingBagCollectionSharder``;
            :class:`~shark_torchrec.planning.AllShardingTypesEBCSharder` adds row-wise and
            table-row-wise on CPU).
        storage_reservation: optional planner storage reservation (e.g. one that reserves the
            trackers' memory: :class:`~shark_torchrec.planning.TrackerStorageReservation`).
    """

    def __init__(
        self,
        model_config: DLRMConfig,
        optim_config: OptimConfig,
        env: DistEnv,
        batch_size: int,
        seed: int = 0,
        constraints=None,
        sharders=None,
        model: Optional[DLRMTrain] = None,
        storage_reservation=None,
    ) -> None:
        self.model_config = model_config
        self.optim_config = optim_config
        self.env = env
        self._planning = {"constraints": constraints, "sharders": sharders,
                          "storage_reservation": storage_reservation}
        self.features = list(model_config.feature_names)
        if model is None:
            model = build_dlrm_train(model_config, env.device, seed)
        ebc = model.model.sparse_arch.embedding_bag_collection
        # Declared before sharding: the TBE then fuses it, and the planner counts its state.
        # A fresh dict: sharding adds an "optimizer" key to it (torchrec-cpu-facts.md 7.11).
        _apply_optimizer_in_backward(
            EMBEDDING_OPTIMIZERS[optim_config.embedding_optimizer],
            ebc.parameters(),
            dict(optim_config.embedding_kwargs()),
        )
        self.plan = plan_sharding(model, env, batch_size, constraints, sharders, storage_reservation)
        self.model: DistributedModelParallel = shard_model(model, env, self.plan, sharders)
        init_embedding_shards(self.model, EBC_FQN, model_config.tables(), seed)
        self._optimizers = self._unfused_optimizers(optim_config)
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, *self._optimizers])

    def _unfused_optimizers(self, optim_config: OptimConfig) -> List[KeyedOptimizerWrapper]:
        """The optimizers of the parameters the fused TBE optimizer does not step: the dense
        layers (the dense optimizer), and the tables DMP shards data-parallel (plain replicated
        parameters, which the optimizer declared in backward does not reach: the embedding
        optimizer at the embedding learning rate, as the other tables)."""
        params = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        tables = {k: v for k, v in params.items() if f"{EBC_FQN}." in k}  # (under DMP's wrapper too)
        dense = {k: v for k, v in params.items() if k not in tables}
        dense_cls = DENSE_OPTIMIZERS[optim_config.dense_optimizer]
        dense_kwargs = optim_config.dense_kwargs()
        out = [KeyedOptimizerWrapper(dense, lambda ps: dense_cls(ps, **dense_kwargs))]
        if tables:
            table_cls = EMBEDDING_OPTIMIZERS[optim_config.embedding_optimizer]
            table_kwargs = optim_config.embedding_kwargs()
            out.append(KeyedOptimizerWrapper(tables, lambda ps: table_cls(ps, **table_kwargs)))
        return out

    def planning_options(self, tables: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """The planner options this trainer was built with (``constraints``, ``sharders``,
        ``storage_reservation``: keyword arguments of :class:`DLRMTrainer`), the constraints
        restricted to ``tables`` (e.g. those a pruned model keeps): what a trainer for a
        derived model is built with, so that it is planned under the same rules."""
        options = dict(self._planning)
        if tables is not None and options["constraints"] is not None:
            keep = set(tables)
            options["constraints"] = {t: c for t, c in options["constraints"].items() if t in keep}
        return options

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Dict]:
        """``{"model", "optim"}``: the sharded model's and the combined optimizer's state
        (``ShardedTensor`` shards for the embedding tables and the fused optimizer)."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def state_dict_to_load(self) -> Dict[str, Dict]:
        """The target of a checkpoint load: :meth:`state_dict` with every optimizer's state made.
        Adam makes its moments and step count at its first step, and DCP loads only the keys its
        target holds: a resumed Adam restarted from zero moments, silently.  Its state is made by
        a step of zero gradients (the parameters do not move), then overwritten by the load."""
        for opt in self._optimizers:
            if any(p.requires_grad and p not in opt.state for p in opt.params.values()):
                opt.init_state()
                for p in opt.params.values():
                    p.grad = None
        return self.state_dict()

    def load_state_dict(self, state: Dict[str, Dict]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch: Batch) -> Batch:
        kjt = batch.sparse_features
        keys = kjt.keys()
        if keys != self.features:
            # Data may carry more fields than the model (a pruned model reads the original
            # data): hand the model exactly its own features, in its order.
            index = {k: i for i, k in enumerate(keys)}
            missing = [f for f in self.features if f not in index]
            if missing:
                raise KeyError(f"the batch lacks features the model needs: {missing}")
            batch = Batch(
                dense_features=batch.dense_features,
                sparse_features=kjt.permute([index[f] for f in self.features]),
                labels=batch.labels,
            )
        return batch.to(self.env.device, non_blocking=True)

    def field_means(self, batches: Iterable[Batch], features: Sequence[str],
                    max_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Mean pooled embedding of each of ``features`` over ``batches`` (at most
        ``max_batches``), over all ranks: a collective, every rank passing its own batches
        (:func:`~shark_torchrec.pruning.mean_fill.field_means`).  What pruning by mean
        replacement fills the fields with."""
        ebc = self.model.module.model.sparse_arch.embedding_bag_collection
        with torch.no_grad():
            return field_means(ebc, (self._to_device(b).sparse_features for b in batches), features,
                               max_batches)

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on this rank's part of a global batch; returns the local loss."""
        self.model.train()
        self.optimizer.zero_grad()
        loss, _ = self.model(self._to_device(batch))
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train(
        self,
        batches: Iterable[Batch],
        max_steps: Optional[int] = None,
        on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
        total: Optional[int] = None,
        desc: str = "train",
    ) -> int:
        """Run train steps over ``batches`` (at most ``max_steps``); returns the step count.

        ``on_step(step_index, loss)`` is called after every step (checkpointing, logging).
        """
        steps = 0
        if max_steps is not None and max_steps <= 0:
            return 0
        bar = tqdm(total=total, desc=desc, disable=not self.env.is_main, dynamic_ncols=True)
        try:
            for batch in batches:
                loss = self.train_step(batch)
                steps += 1
                bar.update(1)
                if steps % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if on_step is not None:
                    on_step(steps, loss)
                # Checked after the step, so that no batch is pulled from an iterator and lost.
                if max_steps is not None and steps >= max_steps:
                    break
        finally:
            bar.close()
        return steps

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits for this rank's part of a batch."""
        self.model.eval()
        _, (_, logits, _) = self.model(self._to_device(batch))
        return logits

    @torch.no_grad()
    def evaluate(
        self, batches: Iterable[Batch], desc: str = "eval", return_predictions: bool = False
    ) -> Dict[str, Any]:
        """AUC (torchmetrics, synchronised over ranks) and log loss over all ranks' examples
        (see :func:`evaluate_model`)."""
        self.model.eval()
        return evaluate_model(lambda b: self.model(self._to_device(b)), batches, self.env, desc,
                              return_predictions)


@torch.no_grad()
def _ranking_probability(logits: torch.Tensor) -> torch.Tensor:
    """Logits mapped into [0, 1] keeping their order, for the AUC (which reads only the order):
    ``0.5 + atan(x) / pi`` in float64.  A float32 ``sigmoid`` rounds every logit above ~16.6 to
    1.0 (and torchmetrics applies one itself to values outside [0, 1]), so such rows would tie
    and the AUC differ from the paired comparison's, which ranks the logits."""
    return 0.5 + torch.atan(logits.detach().double()) / math.pi


def evaluate_model(
    forward: Callable[[Batch], Any], batches: Iterable[Batch], env: DistEnv, desc: str = "eval",
    return_predictions: bool = False,
) -> Dict[str, Any]:
    """AUC (torchmetrics, synchronised over ranks) and log loss over all ranks' examples of a
    model whose ``forward(batch)`` returns ``DLRMTrain``'s ``(loss, (loss, logits, labels))``
    for this rank's part of each batch (a sharded ``DLRMTrain`` — DMP-wrapped or with a sharded
    mixed collection — or a plain one).

    With ``return_predictions``, also ``"logits"`` and ``"labels"``: every rank's examples
    as CPU tensors in global example order (batch by batch, rank slices in rank order),
    the same on every rank — for paired comparisons of two models on the same rows.  Only the
    logits are gathered, never the model."""
    auroc = BinaryAUROC().to(env.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)  # [sum, count]
    local_logits, local_labels = [], []
    for batch in tqdm(batches, desc=desc, disable=not env.is_main, dynamic_ncols=True):
        _, (_, logits, labels) = forward(batch)
        auroc.update(_ranking_probability(logits), labels.long())
        loss_sum[0] += torch.nn.functional.binary_cross_entropy_with_logits(
            logits.double(), labels.double(), reduction="sum"
        )
        loss_sum[1] += labels.numel()
        if return_predictions:
            local_logits.append(logits.detach().float().cpu())
            local_labels.append(labels.detach().float().cpu())
    if dist.is_initialized() and env.world_size > 1:
        dist.all_reduce(loss_sum)
    examples = int(loss_sum[1].item())
    if examples == 0:
        raise RuntimeError("evaluate: the evaluation data is empty")
    out: Dict[str, Any] = {
        "auc": float(auroc.compute().item()),
        "log_loss": float((loss_sum[0] / loss_sum[1]).item()),
        "examples": examples,
    }
    if return_predictions:
        out["logits"], out["labels"] = _gather_in_order(env, local_logits, local_labels)
    return out


def _gather_in_order(env: DistEnv, logits: List[torch.Tensor], labels: List[torch.Tensor]):
    if not (dist.is_initialized() and env.world_size > 1):
        return torch.cat(logits), torch.cat(labels)
    parts: List[Any] = [None] * env.world_size
    dist.all_gather_object(parts, (logits, labels))
    n_batches = max(len(p[0]) for p in parts)
    lg, lb = [], []
    for i in range(n_batches):  # a global batch is its ranks' slices in rank order
        for rank_logits, rank_labels in parts:
            if i < len(rank_logits):
                lg.append(rank_logits[i])
                lb.append(rank_labels[i])
    return torch.cat(lg), torch.cat(lb)
