"""Epochs of training that checkpoint every N steps and resume mid-epoch to the same result.

One loop for every job that trains (``recipes/train_dlrm.py``, the SHARK pipeline's train and
fine-tune stages): a kill hours into a long training run restarts from its last checkpoint,
not from scratch.  A checkpoint holds the model and optimizer state (DCP, every rank its
shards), the field-importance tracker's totals, each rank's row-priority counters (files
beside it) and the progress (epoch, step within the epoch, steps, examples, the evaluation
history).  Resuming restores all of them and starts the epoch's data at the next batch, so a
resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.trainer import DLRMTrainer

logger = logging.getLogger(__name__)

#: the row-priority counters' files inside a checkpoint directory
ROW_COUNTS_DIR = "row_counts"


def new_progress(**extra: Any) -> Dict[str, Any]:
    """A run's progress before its first step (``extra``: job fields kept with it)."""
    return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "train_examples": 0,
            "train_seconds": 0.0, "history": [], **extra}


def checkpoint_matches(path: str, match: Optional[Dict[str, Any]]) -> bool:
    """Whether the checkpoint at ``path`` holds the progress fields ``match`` (e.g. the key of
    the stage it belongs to)."""
    progress = CheckpointManager.progress_of(path)
    return all(progress.get(k) == v for k, v in (match or {}).items())


class TrainingLoop:
    """``epochs`` passes of ``trainer`` over the batches ``batches(epoch, start_batch)`` gives,
    checkpointed by ``ckpt`` every ``checkpoint_every`` steps (0: never mid-epoch) and at the
    end of every epoch.

    Args:
        importance: a :class:`~shark_torchrec.importance.TaylorFieldImportance` attached while
            training; its totals are checkpointed.
        row_priority: a :class:`~shark_torchrec.importance.RowPriority` attached while
            training; each rank's counters are checkpointed beside the model.
        evaluate: called at the end of every epoch; its metrics join ``progress["history"]``.
        global_batch: examples per step over all ranks.
        progress: the progress fields to start from (:func:`new_progress`; also where a
            job keeps fields of its own, which then must match on resume).
    """

    def __init__(self, trainer: DLRMTrainer, ckpt: CheckpointManager,
                 batches: Callable[[int, int], Iterable[Batch]], epochs: int, global_batch: int,
                 checkpoint_every: int = 0, importance: Any = None, row_priority: Any = None,
                 evaluate: Optional[Callable[[], Dict[str, Any]]] = None,
                 progress: Optional[Dict[str, Any]] = None, desc: str = "epoch") -> None:
        self.trainer = trainer
        self.ckpt = ckpt
        self.batches = batches
        self.epochs = epochs
        self.global_batch = global_batch
        self.checkpoint_every = checkpoint_every
        self.importance = importance
        self.row_priority = row_priority
        self.evaluate = evaluate
        self.desc = desc
        self.progress = progress if progress is not None else new_progress()
        self._saved_at = -1
        self.last_checkpoint: Optional[str] = None

    # ------------------------------------------------------------------ state
    def _state(self, to_load: bool = False) -> Dict[str, Any]:
        state = self.trainer.state_dict_to_load() if to_load else self.trainer.state_dict()
        if self.importance is not None:
            state["importance"] = self.importance.state_dict()
        return state

    def save(self) -> str:
        """Checkpoint now (a collective); returns the checkpoint's path."""
        path = self.ckpt.save(self._state(), dict(self.progress))
        if self.row_priority is not None:
            self.row_priority.save(os.path.join(path, ROW_COUNTS_DIR))
        self._saved_at = self.progress["global_step"]
        self.last_checkpoint = path
        return path

    def resume(self, path: Optional[str] = None, match: Optional[Dict[str, Any]] = None) -> bool:
        """Restore the newest checkpoint (or ``path``) if there is one whose progress holds
        the fields ``match`` (e.g. the key of the stage it belongs to); returns whether it
        resumed.  A checkpoint left by other inputs is removed (rank 0), so that it is neither
        resumed nor kept in place of the new run's."""
        path = path or self.ckpt.latest()
        if path is None:
            return False
        if not checkpoint_matches(path, match):
            progress = CheckpointManager.progress_of(path)
            logger.warning("%s: a checkpoint of other inputs (%s); starting afresh", path,
                           {k: progress.get(k) for k in match})
            if not dist.is_initialized() or dist.get_rank() == 0:
                shutil.rmtree(self.ckpt.root, ignore_errors=True)
            if dist.is_initialized():
                dist.barrier()
            return False
        state = self._state(to_load=True)
        self.progress = self.ckpt.load(state, path)  # DCP loads in place, into these tensors
        self.trainer.load_state_dict(state)
        if self.importance is not None:
            self.importance.load_state_dict(state["importance"])
        if self.row_priority is not None:
            self.row_priority.load(os.path.join(path, ROW_COUNTS_DIR))
        self._saved_at = self.progress["global_step"]
        self.last_checkpoint = path
        logger.info("resumed from %s at epoch %d, step %d of it", path, self.progress["epoch"],
                    self.progress["step_in_epoch"])
        return True

    # ------------------------------------------------------------------ training
    def run(self, max_steps: Optional[int] = None) -> bool:
        """Train until every epoch is done (returns True) or ``max_steps`` steps in all have
        run (returns False; checkpointed, resumable)."""
        p = self.progress
        while p["epoch"] < self.epochs:
            remaining = None if max_steps is None else max_steps - p["global_step"]
            if remaining is None or remaining > 0:
                self._epoch(remaining)
            if max_steps is not None and p["global_step"] >= max_steps:
                # (an epoch whose last step was the last allowed one ends on resume)
                if self._saved_at != p["global_step"]:
                    self.save()
                return False
            if self.evaluate is not None:
                metrics = dict(self.evaluate())
                metrics["epoch"] = p["epoch"]
                p["history"].append(metrics)
                logger.info("epoch %d: %s", p["epoch"], metrics)
            p["epoch"] += 1
            p["step_in_epoch"] = 0
            self.save()
        if self.last_checkpoint is None:  # (no epoch left to run: the state as it is)
            self.save()
        return True

    def _epoch(self, remaining: Optional[int]) -> None:
        p = self.progress
        step_t0 = [time.perf_counter()]

        def on_step(_: int, loss: torch.Tensor) -> None:
            now = time.perf_counter()
            p["train_seconds"] += now - step_t0[0]
            step_t0[0] = now
            p["step_in_epoch"] += 1
            p["global_step"] += 1
            p["train_examples"] += self.global_batch
            if self.checkpoint_every and p["global_step"] % self.checkpoint_every == 0:
                self.save()
                step_t0[0] = time.perf_counter()  # checkpoint time is not training time

        data = self.batches(p["epoch"], p["step_in_epoch"])
        try:
            total: Optional[int] = len(data)  # (a DataLoader over a streamed file has none)
        except TypeError:
            total = None
        attached: List[Any] = []
        try:
            if self.importance is not None:
                attached.append(self.importance.attach())
            if self.row_priority is not None:
                attached.append(self.row_priority.attach(self.trainer.model))
            self.trainer.train(data, max_steps=remaining, on_step=on_step, total=total,
                               desc=f"{self.desc} {p['epoch']}")
        finally:
            for tracker in attached:
                tracker.detach()
