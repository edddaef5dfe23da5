"""Pruning a sharded DLRM (a :class:`~shark_torchrec.training.DLRMTrainer`) and the
iterative schedule: R rounds of (score M batches → drop → fine-tune S steps).

The pruned model is planned and sharded anew (fewer tables, so the planner may place them
differently).  Its dense layers come from :func:`~shark_torchrec.pruning.prune_dlrm` applied to
the old dense weights (replicated on every rank); its surviving tables are read from a
``torch.distributed.checkpoint`` of the old model, which reshards them to the new placement
without ever gathering a whole table.  The optimizer state is carried over the same way: the
fused embedding optimizer's state of the surviving tables from the checkpoint, and the dense
optimizer's state (Adagrad sums, Adam moments) pruned exactly like the weights it belongs to.
(A fresh Adagrad state takes steps of about the learning rate on every weight at once: on the
synthetic default, fine-tuning the pruned model from fresh state cost 0.0085 test AUC where
the same model without fine-tuning lost nothing.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch

from shark_torchrec.importance import TaylorFieldImportance
from shark_torchrec.pruning.apply import prune_dlrm
from shark_torchrec.pruning.plan import PlanError, PruningPlan, choose_plan
from shark_torchrec.training.model import DLRMConfig, build_dlrm_train
from shark_torchrec.training.trainer import DLRMTrainer

logger = logging.getLogger(__name__)


def pruned_config(config: DLRMConfig, plan: PruningPlan, mean_filled: bool = False) -> DLRMConfig:
    """The DLRM config without the tables of the fields ``plan`` drops; with ``mean_filled``
    (pruning by mean replacement) they stay in the interaction, reading constants."""
    plan.validate(config.tables())
    if config.mean_filled and not mean_filled:
        raise ValueError(f"fields {config.mean_filled} of this model already read their means: "
                         "prune it further by mean replacement too")
    kept = [(f, n) for f, n in zip(config.feature_names, config.num_embeddings_per_feature)
            if f not in set(plan.dropped_features)]
    fields = list(config.interaction_features or config.feature_names)
    return dataclasses.replace(
        config,
        feature_names=[f for f, _ in kept],
        num_embeddings_per_feature=[n for _, n in kept],
        # (none when nothing is filled: the model is then a plain DLRM)
        interaction_features=fields if mean_filled and len(kept) < len(fields) else (),
    )


def _dense_state(trainer: DLRMTrainer) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in trainer.model.state_dict().items():
        if isinstance(value, ShardedTensor) or ".embedding_bags." in key:
            continue
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def prune_trainer(
    trainer: DLRMTrainer,
    plan: PruningPlan,
    checkpoint_path: str,
    batch_size: int,
    seed: int = 0,
    means: Optional[Dict[str, torch.Tensor]] = None,
) -> DLRMTrainer:
    """A new sharded trainer for the pruned model, weights carried over.

    Args:
        trainer: the trainer of the model to prune.
        plan: the pruning plan (validated against the model).
        checkpoint_path: a DCP checkpoint of ``trainer.state_dict()`` (as written by
            :class:`~shark_torchrec.training.CheckpointManager`) holding the current weights.
        batch_size: per-rank batch size (for the planner).
        seed: seeds nothing that survives (every weight is carried over), kept for the planner.
        means: each dropped field's mean pooled embedding (:meth:`DLRMTrainer.field_means`):
            prune by mean replacement (:func:`~shark_torchrec.pruning.prune_dlrm`).
    """
    config = trainer.model_config
    new_config = pruned_config(config, plan, mean_filled=means is not None)
    # Old model skeleton: dense layers with the trained weights, tables on meta.
    skeleton = build_dlrm_train(config, trainer.env.device, seed)
    missing, unexpected = skeleton.load_state_dict(_dense_state(trainer), strict=False)
    if unexpected or any(".embedding_bags." not in k for k in missing):
        raise RuntimeError(f"dense state mismatch: missing {missing}, unexpected {unexpected}")
    pruned = prune_dlrm(skeleton, plan, means)
    # Planned under the old trainer's rules (constraints of the kept tables, sharders, reservation).
    new = DLRMTrainer(new_config, trainer.optim_config, trainer.env, batch_size, seed=seed,
                      model=pruned, **trainer.planning_options([t.name for t in new_config.tables()]))
    tables = {k: v for k, v in new.model.state_dict().items() if ".embedding_bags." in k}
    state = {"model": tables}
    dcp.load(state, checkpoint_id=checkpoint_path)
    new.model.load_state_dict(state["model"], strict=False)
    _carry_optimizer_state(trainer, new, plan, checkpoint_path, means)
    return new


def _carry_optimizer_state(old: DLRMTrainer, new: DLRMTrainer, plan: PruningPlan,
                           checkpoint_path: str, means: Optional[Dict[str, torch.Tensor]]) -> None:
    """The pruned trainer's optimizer state from the old one's (see the module docstring)."""
    new_state = new.optimizer.state_dict()
    per_param = new_state["state"]
    # Fused embedding optimizer: same table names and shapes; DCP reshards to the new plan.
    # (A collective: every rank calls it, also one that holds no table of the new plan.)
    tables = {k: v for k, v in per_param.items() if ".embedding_bags." in k}
    loaded = {"optim": {"state": tables}}
    dcp.load(loaded, checkpoint_id=checkpoint_path)
    per_param.update(loaded["optim"]["state"])
    # Dense optimizer: each state tensor shaped like its parameter is pruned like the parameter,
    # by running prune_dlrm on a skeleton whose parameters are that state.
    old_state = old.optimizer.state_dict()["state"]
    dense_keys = [k for k in per_param if ".embedding_bags." not in k]
    names = {n for k in dense_keys for n, v in old_state.get(k, {}).items()
             if isinstance(v, torch.Tensor) and v.dim() > 0}
    for name in sorted(names):
        skeleton = build_dlrm_train(old.model_config, old.env.device, 0)
        values = {k: old_state[k][name] for k in old_state if ".embedding_bags." not in k and name in old_state[k]}
        with torch.no_grad():
            missing, unexpected = skeleton.load_state_dict(values, strict=False)
            buffers = {k for k, _ in skeleton.named_buffers()}  # (state exists for parameters only)
            if unexpected or any(".embedding_bags." not in k and k not in buffers for k in missing):
                raise RuntimeError(f"optimizer state {name!r} does not match the dense "
                                   f"parameters: missing {missing}, unexpected {unexpected}")
            pruned = prune_dlrm(skeleton, plan, means).state_dict()
        for k in dense_keys:
            if name in per_param[k]:
                per_param[k][name] = pruned[k].to(per_param[k][name].device)
    for k in dense_keys:  # scalar state (Adagrad/Adam step counts) carries over as it is
        for n, v in old_state.get(k, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() == 0 and n in per_param[k]:
                per_param[k][n] = v.clone()
    new.optimizer.load_state_dict(new_state)


@dataclasses.dataclass
class PruningRound:
    """What one round of iterative pruning did."""

    round: int
    scores: Dict[str, float]
    plan: PruningPlan
    scoring_seconds: float
    finetune_steps: int


def iterative_prune(
    trainer: DLRMTrainer,
    batches: Iterator[Batch],
    rounds: int,
    score_batches: int,
    finetune_steps: int,
    keep_fields: int,
    work_dir: str,
    batch_size: int,
    baseline: str = "mean",
    protected: Sequence[str] = (),
    seed: int = 0,
    on_round: Optional[Callable[[PruningRound, DLRMTrainer], None]] = None,
    mean_batches: Optional[int] = None,
) -> DLRMTrainer:
    """R rounds of: train ``score_batches`` steps with a SHARK tracker attached → drop fields
    (the count kept shrinks evenly from the current one to ``keep_fields`` over the rounds) →
    fine-tune ``finetune_steps`` steps.  Returns the final (pruned, fine-tuned) trainer.

    ``batches`` is one iterator of training batches consumed by every phase (scoring steps are
    ordinary training steps).  Each round checkpoints the model under ``work_dir`` (the new
    model's tables are read from it).  With ``mean_batches``, fields are pruned by mean
    replacement, each dropped field's mean taken over the next ``mean_batches`` batches.
    """
    from shark_torchrec.training.checkpoint import CheckpointManager

    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    unknown = [p for p in protected if p not in trainer.features]
    if unknown:  # (checked once: a misspelt name would leave its field unprotected)
        raise PlanError(f"protected names unknown fields {unknown} (fields: {list(trainer.features)})")
    start = len(trainer.features)
    if not 1 <= keep_fields <= start:
        raise ValueError(f"keep_fields must be in [1, {start}], got {keep_fields}")
    for r in range(1, rounds + 1):
        target = start - round((start - keep_fields) * r / rounds)
        tracker = TaylorFieldImportance(trainer.model, baseline=baseline, seed=seed + r)
        t0 = time.perf_counter()
        with tracker:
            steps = trainer.train(batches, max_steps=score_batches, desc=f"round {r}: score")
        if steps < score_batches:
            raise RuntimeError(f"round {r}: the data ran out while scoring ({steps} batches)")
        scores = tracker.scores()
        scoring_seconds = time.perf_counter() - t0
        plan = choose_plan(scores, trainer.model_config.tables(), keep=target,
                           protected=list(protected), method=tracker.name)
        ckpt = CheckpointManager(os.path.join(work_dir, f"round_{r}"), {"round": r})
        path = ckpt.save(trainer.state_dict(), {"global_step": r})
        logger.info("round %d: keeping %d fields, dropping %s", r, target, plan.dropped_features)
        means = trainer.field_means(batches, plan.dropped_features, mean_batches) if mean_batches else None
        trainer = prune_trainer(trainer, plan, path, batch_size, seed=seed, means=means)
        done = trainer.train(batches, max_steps=finetune_steps, desc=f"round {r}: fine-tune")
        result = PruningRound(r, scores, plan, scoring_seconds, done)
        if on_round is not None:
            on_round(result, trainer)
    return trainer
