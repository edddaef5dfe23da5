"""Checkpoints of the whole training state with ``torch.distributed.checkpoint`` (DCP).

A checkpoint holds the sharded model (``ShardedTensor`` embedding shards, dense layers),
the combined optimizer's state (the fused TBE optimizer's sharded state included) and the
training progress.  Every rank writes its own shards; DCP's metadata lets a checkpoint be
loaded under another sharding plan or world size.

Layout under ``root``::

    step_00000120/        DCP files (one per rank) + .metadata
    step_00000120/meta.json  progress and the config fingerprint (written by rank 0)
    step_00000120.1/      the same step saved again (an epoch's end right after a save)
    latest                the name of the newest complete checkpoint

``latest`` is rewritten only after every rank has finished writing, so an interrupted save
never becomes the one that is resumed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from shark_torchrec.errors import SharkInputError

logger = logging.getLogger(__name__)


class CheckpointError(SharkInputError, RuntimeError):
    """A checkpoint that cannot be loaded into this run (the message says why)."""


class CheckpointManager:
    """Save and restore ``{"model", "optim"}`` state plus JSON progress under ``root``.

    Args:
        root: checkpoint directory (shared by all ranks).
        fingerprint: a JSON-serialisable description of the model; loading a checkpoint
            whose fingerprint differs raises :class:`CheckpointError` naming the differences.
        keep: number of checkpoints kept (older ones are deleted by rank 0).
    """

    def __init__(self, root: str, fingerprint: Dict[str, Any], keep: int = 2) -> None:
        self.root = root
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.keep = keep

    def _rank0(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or ``None``."""
        pointer = os.path.join(self.root, "latest")
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(self.root, name)
        if not os.path.isfile(os.path.join(path, "meta.json")):
            raise CheckpointError(f"{pointer} names {name!r}, which has no meta.json")
        return path

    def save(self, state: Dict[str, Any], progress: Dict[str, Any]) -> str:
        """Write ``state`` (model/optimizer state dicts) and ``progress`` as a new checkpoint."""
        step = f"step_{int(progress['global_step']):08d}"
        name, again = step, 0
        # A step saved before (mid-epoch, then again at the epoch's end) gets a directory of its
        # own: rewriting the one ``latest`` names in place would leave it half-written if the
        # save were interrupted.  (Every rank chooses before rank 0 creates it.)
        while os.path.exists(os.path.join(self.root, name)):
            again += 1
            name = f"{step}.{again}"
        path = os.path.join(self.root, name)
        self._barrier()
        if self._rank0():
            os.makedirs(path, exist_ok=True)
        self._barrier()
        dcp.save(state, checkpoint_id=path)
        if self._rank0():
            meta = os.path.join(path, "meta.json")
            with open(meta + ".tmp", "w") as f:
                json.dump({"progress": progress, "fingerprint": self.fingerprint}, f, indent=1)
            os.replace(meta + ".tmp", meta)
            tmp = os.path.join(self.root, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(name)
            os.replace(tmp, os.path.join(self.root, "latest"))
            self._prune(keep_name=name)
        self._barrier()
        logger.info("saved checkpoint %s", path)
        return path

    def _prune(self, keep_name: str) -> None:
        names = sorted(n for n in os.listdir(self.root) if n.startswith("step_"))
        for n in names[: max(0, len(names) - self.keep)]:
            if n != keep_name:
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    @staticmethod
    def progress_of(path: str) -> Dict[str, Any]:
        """The progress saved with the checkpoint at ``path`` (no state loaded)."""
        meta_file = os.path.join(path, "meta.json")
        try:
            with open(meta_file) as f:
                return json.load(f)["progress"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_file}: cannot read checkpoint metadata: {e}") from e

    def load(self, state: Dict[str, Any], path: Optional[str] = None) -> Dict[str, Any]:
        """Load into ``state`` in place (its structure must match) and return the progress."""
        path = path or self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint under {self.root}")
        meta_file = os.path.join(path, "meta.json")
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_file}: cannot read checkpoint metadata: {e}") from e
        theirs = meta.get("fingerprint", {})
        if theirs != self.fingerprint:
            diffs = sorted(
                k for k in set(theirs) | set(self.fingerprint)
                if theirs.get(k) != self.fingerprint.get(k)
            )
            detail = ", ".join(
                f"{k}: checkpoint {theirs.get(k)!r} vs run {self.fingerprint.get(k)!r}" for k in diffs
            )
            raise CheckpointError(f"{path} was written by a different model ({detail})")
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # DCP raises CheckpointException wrapping per-rank failures
            raise CheckpointError(f"{path}: cannot load the training state: {e}") from e
        return meta["progress"]
