"""Finished stages of a job, each keyed by its inputs.

A job (the SHARK pipeline) runs stages one after the other under ``OUT``; each finished stage
leaves ``OUT/<stage>/done.json``.  A stage's *key* is a hash of the inputs it reads (a
JSON-able mapping: its settings) and of the keys of the stages it builds on, so a finished
stage is reused only by a run that would compute the same thing: a run started again with
other settings reruns the first stage whose inputs changed, and every stage after it (their
keys change with it), logging which inputs changed.

``done.json`` is written atomically (a temporary file renamed over it), by one process, and
holds paths relative to ``OUT`` only (:meth:`StageStore.rel`), so a copied run directory reads
its own files.  A damaged record (not JSON, not a record, written by another version) is an
error naming the file, never a raw traceback or a silent rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch.distributed as dist

from shark_torchrec.errors import SharkInputError

logger = logging.getLogger(__name__)

RECORD_FORMAT = "shark-stage/1"


class StageRecordError(SharkInputError, ValueError):
    """A stage's ``done.json`` that cannot be read as a record (the message names it)."""


class StageStore:
    """The ``done.json`` records of the stages under ``out``.

    Args:
        out: the job's output directory.
        is_main: whether this process writes the records (rank 0); every process reads them.
    """

    def __init__(self, out: str, is_main: bool = True) -> None:
        self.out = out
        self.is_main = is_main

    # ------------------------------------------------------------------ keys
    @staticmethod
    def key(inputs: Mapping[str, Any], upstream: Sequence[str] = ()) -> str:
        """The stage key: a hash of its inputs (canonical JSON) and its upstream stages' keys."""
        text = json.dumps({"inputs": _jsonable(inputs), "upstream": list(upstream)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def record_path(self, stage: str) -> str:
        return os.path.join(self.out, stage, "done.json")

    # ------------------------------------------------------------------ paths
    def rel(self, path: str) -> str:
        """``path`` (a file the stage wrote under ``out``) relative to ``out``, for a record."""
        rel = os.path.relpath(path, self.out)
        if rel.startswith(os.pardir):
            raise ValueError(f"{path} is outside the run directory {self.out}")
        return rel

    def resolve(self, rel: str) -> str:
        """A path from a record, under this ``out``."""
        return os.path.join(self.out, rel)

    # ------------------------------------------------------------------ records
    def read(self, stage: str) -> Optional[Dict[str, Any]]:
        """The record of ``stage`` as written (``None`` when it has not finished); a damaged
        one raises :class:`StageRecordError` naming the file."""
        path = self.record_path(stage)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StageRecordError(f"{path}: damaged stage record ({e}); delete {os.path.dirname(path)} "
                             f"to run the {stage!r} stage again") from None
        if not (isinstance(record, dict) and record.get("format") == RECORD_FORMAT
                and isinstance(record.get("key"), str) and isinstance(record.get("result"), dict)
                and isinstance(record.get("inputs"), dict)):
            raise StageRecordError(f"{path}: not a stage record of this version (expected format "
                             f"{RECORD_FORMAT!r} with key, inputs and result); delete "
                             f"{os.path.dirname(path)} to run the {stage!r} stage again")
        return record

    def load(self, stage: str, inputs: Mapping[str, Any], upstream: Sequence[str] = ()) -> Optional[Dict[str, Any]]:
        """The result of ``stage`` finished with these ``inputs`` after these upstream keys, or
        ``None`` (not finished, or finished with other inputs: logged, naming them; the stage
        then runs again and its new record replaces the old one)."""
        record = self.read(stage)
        if record is None:
            return None
        if record["key"] == self.key(inputs, upstream):
            return record["result"]
        now, before = _jsonable(inputs), record["inputs"]
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        listed = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        why = f"its inputs changed: {listed}" if changed else "a stage before it was run again"
        if self.is_main:
            logger.warning("stage %r in %s was finished with other inputs; running it again (%s)",
                           stage, self.out, why)
        return None

    def save(self, stage: str, inputs: Mapping[str, Any], upstream: Sequence[str], result: Mapping[str, Any]) -> str:
        """Write the record of a finished stage (atomically, on the main process; every
        process waits for it) and return its key."""
        key = self.key(inputs, upstream)
        if self.is_main:
            path = self.record_path(stage)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            record = {"format": RECORD_FORMAT, "stage": stage, "key": key, "upstream": list(upstream),
                      "inputs": _jsonable(inputs), "result": dict(result)}
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        if dist.is_initialized():
            dist.barrier()
        return key


def file_digest(path: str) -> str:
    """A hash of a file's bytes, for stage inputs that name a file (a schema, an overrides
    file, a pruning plan): editing the file changes the key, so a stage that read it runs again
    instead of being reused with the old contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digests(**paths: Optional[str]) -> Dict[str, str]:
    """``{NAME_sha256: digest}`` of the files given (``None``: a flag not set, left out, so a
    key without the file stays what it was)."""
    return {f"{name}_sha256": file_digest(path) for name, path in paths.items() if path}


def data_files(spec: Any) -> Dict[str, Any]:
    """``{"data_files": [[path, bytes, mtime_ns], ...]}`` of the click-log files a
    :class:`~shark_torchrec.training.datasets.DataSpec` reads (its train, dev and test files,
    each once; ``{}`` for generated data, so such keys stay what they were): a file replaced,
    edited, truncated or added to ``--data_path`` changes the key of the stage that trained on
    it, so its stale result is not reused.  Size and modification time, not a hash of the
    contents: the logs of an industrial model are terabytes, read once per run at most."""
    paths = sorted({*spec.train_files, *spec.test_files, *spec.dev_files})
    if not paths:
        return {}
    stats = []
    for path in paths:
        st = os.stat(path)
        stats.append([path, st.st_size, st.st_mtime_ns])
    return {"data_files": stats}


def source_run(out: str) -> Dict[str, Any]:
    """What identifies the model a job starts from in another run's directory (``--from_run``,
    ``--init_from``): the newest checkpoint's name and, where that run keeps a record of its
    training stage, that stage's key.  A source trained again (with other settings, or further)
    changes it, so a stage built on the old model is not reused."""
    latest, checkpoint = os.path.join(out, "checkpoints", "latest"), None
    if os.path.isfile(latest):
        with open(latest) as f:
            checkpoint = f.read().strip()
    record = StageStore(out).read("train")
    return {"checkpoint": checkpoint, "train_key": record["key"] if record else None}


class StageRunner:
    """The stages of one job, in order, and their records under ``out`` (a
    :class:`StageStore`): every job (the pipeline's three stages, ``train_dlrm.py``'s and
    ``prune_dlrm.py``'s one) runs its stages through one.

    A stage's key is a hash of its declared inputs and of the key of the stage before it.
    :meth:`finished` gives the record of a stage finished with the same key, so the job skips
    it; else ``None`` (logged, naming the inputs that changed), and the job runs it and every
    stage after it (their records are stale even where their own inputs match).

    Args:
        out: the job's output directory.
        inputs: ``{stage: its inputs}`` in the order the stages run.
        is_main: whether this process writes the records.
    """

    def __init__(self, out: str, inputs: Mapping[str, Mapping[str, Any]], is_main: bool = True) -> None:
        self.store = StageStore(out, is_main)
        self.stages = list(inputs)
        self.inputs = dict(inputs)
        self.keys = chain_keys(inputs)
        self.upstream = {s: ([self.keys[self.stages[i - 1]]] if i else []) for i, s in enumerate(self.stages)}
        self._records = {s: self.store.load(s, self.inputs[s], self.upstream[s]) for s in self.stages}
        self._ran: List[str] = []  # stages this process ran: the stages after them run too

    def finished(self, stage: str) -> Optional[Dict[str, Any]]:
        """The stage's result if it finished with these inputs and no stage before it ran now;
        else ``None``, and the stage counts as run from here on."""
        i = self.stages.index(stage)
        record = None if any(self.stages.index(r) < i for r in self._ran) else self._records[stage]
        if record is None:
            if not self._ran:
                self._invalidate(self.stages[i:])
            self._ran.append(stage)
        return record

    def _invalidate(self, stages: Sequence[str]) -> None:
        """Remove the records of ``stages`` (a stage about to run and those after it) before the
        stage writes anything: it rewrites its files in place (checkpoints, row counts, plans,
        the export), so a run killed half-way must not leave an old record that a run with the
        old settings would then trust over the new files.  Collective (every process waits)."""
        if self.store.is_main:
            for stage in stages:
                path = self.store.record_path(stage)
                if os.path.isfile(path):
                    os.remove(path)
                    logger.info("removed %s: the %r stage runs now", path, stage)
                _unlink_shared(os.path.dirname(path))
        if dist.is_initialized():
            dist.barrier()

    def invalidate(self, stage: str) -> None:
        """Run ``stage`` again although its record matched (and the stages after it): its
        record removed, its files' links to another run broken.  Collective."""
        i = self.stages.index(stage)
        self._invalidate(self.stages[i:])
        self._ran.append(stage)

    def all_finished(self) -> bool:
        """Whether every stage finished with these inputs before this run started."""
        return all(r is not None for r in self._records.values())

    def save(self, stage: str, result: Mapping[str, Any]) -> None:
        """Record ``stage`` as finished with ``result`` (paths in it relative to ``out``:
        :meth:`StageStore.rel`)."""
        self.store.save(stage, self.inputs[stage], self.upstream[stage], result)


def _unlink_shared(directory: str) -> None:
    """Remove the files under ``directory`` that are hard links shared with another run's
    (:meth:`StageSharing.link`), before a stage of other inputs writes there: it writes some
    files in place (``torch.save`` to a path, a plan opened for writing, checkpoint shards),
    which rewrote the other run's finished stage under its unchanged record."""
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if os.stat(path, follow_symlinks=False).st_nlink > 1:
                os.remove(path)


def chain_keys(inputs: Mapping[str, Mapping[str, Any]]) -> Dict[str, str]:
    """``{stage: key}`` of stages run in the order of ``inputs``, each keyed by its inputs and
    the key of the stage before it."""
    keys: Dict[str, str] = {}
    upstream: List[str] = []
    for stage, stage_inputs in inputs.items():
        keys[stage] = StageStore.key(stage_inputs, upstream)
        upstream = [keys[stage]]
    return keys


class StageSharing:
    """Finished stages shared between the runs of one job that a tool starts (a sweep, a
    frontier): before a run starts, every stage another run finished *with the same key* (the
    same inputs after the same upstream stages) is hard-linked into its directory, so a grid of
    runs computes each distinct stage once.  Which stages can be shared follows from the keys
    alone, not from lists of flags; and the job still checks every linked record's key, so a
    shared stage is never a stale one.

    Args:
        stages: the job's stages, in order.
    """

    def __init__(self, stages: Sequence[str]) -> None:
        self.stages = list(stages)
        self._where: Dict[str, str] = {}  # stage key -> a run directory holding that stage finished

    def link(self, run_dir: str, keys: Mapping[str, str]) -> List[str]:
        """Link into ``run_dir`` the finished stages of earlier runs whose keys are ``keys[stage]``
        (a stage ``run_dir`` already finished with its key is kept); returns the stages linked."""
        store, linked = StageStore(run_dir), []
        for stage in self.stages:
            src = self._where.get(keys[stage])
            if src is None or os.path.abspath(src) == os.path.abspath(run_dir) or self._holds(store, stage, keys[stage]):
                continue
            shutil.rmtree(os.path.join(run_dir, stage), ignore_errors=True)
            os.makedirs(run_dir, exist_ok=True)
            shutil.copytree(os.path.join(src, stage), os.path.join(run_dir, stage), copy_function=os.link)
            linked.append(stage)
        return linked

    def finished(self, run_dir: str, keys: Mapping[str, str]) -> None:
        """Note the stages ``run_dir`` holds finished with ``keys`` (after its run), for the runs
        after it."""
        store = StageStore(run_dir)
        for stage in self.stages:
            if self._holds(store, stage, keys[stage]):
                self._where.setdefault(keys[stage], run_dir)

    @staticmethod
    def _holds(store: StageStore, stage: str, key: str) -> bool:
        record = store.read(stage)
        return record is not None and record["key"] == key


def _jsonable(inputs: Mapping[str, Any]) -> Dict[str, Any]:
    """``inputs`` as plain JSON values (tuples become lists), keys sorted."""
    return json.loads(json.dumps(dict(inputs), sort_keys=True, default=str))
