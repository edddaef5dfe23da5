"""The SHARK pipeline behind ``recipes/shark_dlrm.py``: train → prune fields → fine-tune →
row-wise mixed precision → evaluate every stage → export.

Stages run under one process group (``torchrun`` or one plain process) and each writes
``OUT/<stage>/done.json`` when it has finished, keyed by the flags it reads and the stages before
it (:func:`stage_inputs`, :mod:`shark_torchrec.stages`); a run started again with the same
``--out`` skips the finished stages whose keys match and loads their outputs, so an interrupted
run resumes from the last finished stage and ends with the same result, and a run with other
flags reruns the stages they reach.

* ``train``: the DLRM trains with a SHARK field-importance tracker and a row-priority tracker
  attached (ordinary steps: the trackers only read); its checkpoint, field scores and row
  priorities are saved.
* ``prune``: fields are dropped by their scores (``--keep_fields`` or ``--drop_fraction``), the
  smaller model is sharded anew with the surviving weights and fine-tuned on the last
  ``--finetune_fraction`` of the train split, which training did not see.
* ``quantize``: the pruned model's tables are converted where their shards lie
  (:mod:`shark_torchrec.quantize_stage`: each rank its own shards, with the row priorities of
  the rows it decides; ``--quant_budget_fraction`` of the pruned tables' fp32 bytes over all
  ranks), every stage is evaluated sharded, and the model is exported, each rank writing its
  part (``OUT/model/``, :mod:`shark_torchrec.sharded.export`).  No table is gathered.

The report (``OUT/report.json``, ``OUT/report.md`` and PNG plots, :mod:`shark_torchrec.report`)
gives every stage's AUC and log loss, the embedding bytes before and after, and the compressed
lookup's throughput against the uncompressed collection's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
from tqdm import tqdm

from shark_torchrec.importance import (
    PermutationImportance,
    RandomImportance,
    RowPriority,
    TaylorFieldImportance,
    dlrm_per_sample_loss,
)
from shark_torchrec.pruning import PruningPlan, choose_plan
from shark_torchrec.planning.overrides import load_overrides, sharding_digest
from shark_torchrec.pruning.sharded import iterative_prune, prune_trainer, pruned_config
from shark_torchrec.quant import RowwiseQuantConfig
from shark_torchrec.quant.config import SHARED_SAMPLE_ROWS
from shark_torchrec.quant.layout import serving_row_alignment
from shark_torchrec.run_config import PipelineRun, QuantSection, flat
from shark_torchrec.sharded.assign import TIER_POLICY
from shark_torchrec.stages import StageRecordError, StageRunner, chain_keys, data_files, file_digests, source_run
from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.loop import TrainingLoop, checkpoint_matches, new_progress
from shark_torchrec.training.distributed import DistEnv, run_job
from shark_torchrec.training.datasets import require_rows
from shark_torchrec.training.train_dlrm import (
    build_trainer,
    data_spec_from,
    fingerprint,
    model_config_from,
    optim_config_from,
    test_batches,
)
from shark_torchrec.training.trainer import DLRMTrainer

logger = logging.getLogger(__name__)


#: flags that change nothing a stage computes
NOT_STAGE_INPUTS = frozenset({"out", "stop_after", "log_level", "debug", "checkpoint_every"})
#: flags the prune stage reads and the train stage does not
PRUNE_INPUTS = frozenset({"keep_fields", "drop_fraction", "drop_score_share", "finetune_epochs", "prune_rounds", "score_batches",
                          "finetune_steps", "field_scorer", "permutation_batches", "planner_overrides",
                          "prune_mode", "mean_batches"})
#: flags the quantize stage reads and the stages before it do not
QUANTIZE_INPUTS = frozenset({"quant_budget_fraction", "quant_fractions", "quant_tiers", "drop_rows", "row_alignment",
                             "row_priority", "priority_alpha", "priority_beta", "tier_weighting", "bootstrap",
                             "attribute_quant_loss", "quant_row_fit", "quant_shared_sample_rows"})
#: flags the pipeline does not take (refused by its command line), as every stage key written
#: before the typed run config held them: keys stay the same, so finished runs stay finished
REFUSED_FLAGS_IN_KEYS = {"max_steps": None, "score_fields": None, "resume": False}
#: settings added after stage keys were first written, with the value every run had before:
#: a run with that value keeps its keys (finished stages stay finished), any other value counts
ADDED_SETTINGS = {"quant_row_fit": "minmax", "quant_shared_sample_rows": SHARED_SAMPLE_ROWS}


def stage_inputs(run: PipelineRun, device: torch.device, world_size: int, spec=None) -> Dict[str, Dict[str, Any]]:
    """Each stage's inputs, keying its ``done.json`` (:mod:`shark_torchrec.stages`), by flag
    name: the quantize stage's are :data:`QUANTIZE_INPUTS` and the tier policy's version
    (:data:`~shark_torchrec.sharded.assign.TIER_POLICY`), the prune stage's
    :data:`PRUNE_INPUTS`, and the train stage's every other setting of the run config (a
    setting nobody classified counts as the train stage's: changing it reruns every stage
    rather than being ignored), plus the device the run resolved (``--device auto``,
    ``--row_alignment auto``) and the world size (``--batch_size`` is per rank).  A file a flag
    names (``--schema``, ``--planner_overrides``) counts by a hash of its contents, the data's
    files by their sizes and modification times (:func:`~shark_torchrec.stages.data_files`;
    ``spec``: the run's data, built from its flags when not given), and
    ``--init_from DIR`` by that run's newest checkpoint and training key
    (:func:`~shark_torchrec.stages.source_run`).  A setting added later (:data:`ADDED_SETTINGS`)
    counts only where it differs from the value every earlier run had."""
    flags = {k: v for k, v in {**flat(run), **REFUSED_FLAGS_IN_KEYS}.items()
             if k not in NOT_STAGE_INPUTS and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
    # files and runs named by a flag count by their contents, not only their names
    spec = data_spec_from(run.data, run.training.seed) if spec is None else spec
    train = {**file_digests(schema=run.data.schema), **data_files(spec),
             **({"init_from_source": source_run(run.init_from)} if run.init_from else {}),
             # (the sharding the model trains under: a file without it keeps its keys)
             **({"planner_overrides_sharding_sha256": sharding_digest(run.sharding.planner_overrides)}
                if run.sharding.planner_overrides else {})}
    return {
        "train": {**{k: v for k, v in flags.items() if k not in PRUNE_INPUTS | QUANTIZE_INPUTS}, **train,
                  "resolved_device": device.type, "world_size": world_size},
        "prune": {**{k: v for k, v in flags.items() if k in PRUNE_INPUTS},
                  **file_digests(planner_overrides=run.sharding.planner_overrides)},
        # (the tier policy's version: the same settings under older code chose other tiers)
        "quantize": {**{k: v for k, v in flags.items() if k in QUANTIZE_INPUTS}, "tier_policy": TIER_POLICY},
    }


def stage_keys(run: PipelineRun, device: torch.device, world_size: int) -> Dict[str, str]:
    """The key of every stage of ``run`` on ``world_size`` processes of ``device``: a hash of
    the stage's inputs (:func:`stage_inputs`) and of the keys of the stages before it.  Two
    runs whose keys of a stage agree compute the same stage (tools share it between them,
    :class:`~shark_torchrec.stages.StageSharing`)."""
    return chain_keys(stage_inputs(run, device, world_size))


def _make_out(out: str) -> None:
    """``--out`` as a directory (an existing file, or a path through one, is an error naming it)."""
    try:
        os.makedirs(out, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise SystemExit(f"--out {out}: cannot be a directory ({e.strerror}: {e.filename})") from None


def run(config: PipelineRun) -> Dict[str, Any]:
    """Run the pipeline; returns the report (also written to ``OUT/report.json`` by rank 0)."""
    return run_job(config, _run)


@contextlib.contextmanager
def _timed(what: str):
    """Logs what the pipeline is doing and how long it took."""
    logger.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    logger.info("%s: %.1f s", what, time.perf_counter() - t0)


def _loop(trainer: DLRMTrainer, ckpt: CheckpointManager, spec, run: PipelineRun, env: DistEnv, epochs: int, part: range,
          match: Dict[str, Any], desc: str, **trackers) -> TrainingLoop:
    """A resumable loop of ``epochs`` passes over the global train batches in ``part``,
    checkpointed every ``--checkpoint_every`` steps under ``ckpt`` with ``match`` (the stage's
    key) in its progress; resumed from a checkpoint of the same ``match`` if one is there."""

    def batches(epoch: int, start_batch: int):
        ds = spec.dataset("train", run.training.batch_size, env.rank, env.world_size,
                          start_batch=part.start + start_batch, max_batches=part.stop)
        return spec.batches(ds, run.data.num_workers)

    loop = TrainingLoop(trainer, ckpt, batches, epochs, run.training.batch_size * env.world_size,
                        checkpoint_every=run.checkpoint_every, progress=new_progress(**match), desc=desc,
                        **trackers)
    loop.resume(match=match)
    return loop


def _parts(spec, run: PipelineRun, env: DistEnv) -> Dict[str, range]:
    """Global train batches for training and for fine-tuning (fresh data, as when a model in
    production keeps learning from new logs)."""
    # an empty split is an error naming its files
    require_rows(spec, run.training.batch_size, env.world_size, run.data.limit_train_batches,
                 run.data.limit_test_batches)
    total = spec.train_batches(run.training.batch_size * env.world_size, run.data.limit_train_batches)
    held = int(round(total * run.prune.finetune_fraction))
    if not 0 <= held < total:
        raise SystemExit(f"--finetune_fraction {run.prune.finetune_fraction} leaves no training data "
                         f"({total} batches)")
    return {"train": range(0, total - held), "finetune": range(total - held, total) if held else range(0, total)}


class _Job:
    """One run of the pipeline: its settings, data, stage keys and the stages' records."""

    def __init__(self, run: PipelineRun, env: DistEnv) -> None:
        self.run, self.env, self.out = run, env, run.output.out
        self.spec = data_spec_from(run.data, run.training.seed)
        self.config = model_config_from(run.model, self.spec)
        self.optim = optim_config_from(run.training)
        self.parts = _parts(self.spec, run, env)
        self.stages = StageRunner(self.out, stage_inputs(run, env.device, env.world_size, self.spec), env.is_main)
        self.store, self.keys = self.stages.store, self.stages.keys

    def finished(self, stage: str) -> Optional[Dict[str, Any]]:
        """The stage's record if it is finished with these inputs and nothing before it ran."""
        return self.stages.finished(stage)

    def save(self, stage: str, result: Dict[str, Any]) -> None:
        self.stages.save(stage, result)

    def eval_batches(self):
        return _eval_batches(self.run, self.spec, self.env)


def _run(run: PipelineRun, env: DistEnv) -> Dict[str, Any]:
    _make_out(run.output.out)
    job = _Job(run, env)
    if env.is_main and not job.stages.all_finished():
        for name in ("report.json", "report.md"):  # a report of other inputs must not outlive them
            if os.path.isfile(os.path.join(job.out, name)):
                os.remove(os.path.join(job.out, name))
    report: Dict[str, Any] = {"stages": {}}
    trainer, done = _train_stage(job)
    report["stages"]["trained"] = done["metrics"]
    if run.stop_after == "train":
        return report
    overrides = load_overrides(run.sharding.planner_overrides, job.config.tables()) if run.sharding.planner_overrides else None
    pruned, small, pdone = _prune_stage(job, trainer, done, overrides)
    report["stages"]["uncompressed, fine-tuned"] = pdone["reference"]
    report["stages"]["pruned"] = pdone["metrics"]
    report["plan"] = pdone["plan"]
    if run.stop_after == "prune":
        return report
    qdone = job.finished("quantize")
    if qdone is not None and not _export_of(job.out, job.keys["quantize"]):
        # (the record was linked from another run, or the export and report in OUT were
        # written by other settings since: they would have been reported as this stage's)
        logger.info("%s: its export is not the quantize stage's of these settings: quantizing again",
                    os.path.join(job.out, "model"))
        job.stages.invalidate("quantize")
        qdone = None
    if qdone is None:
        qdone = _quantize(run, env, job.spec, job.config, small, trainer, pruned, done, pdone, overrides, job.out,
                          job.keys["quantize"])
        job.save("quantize", qdone)
    report["stages"]["quantized"] = qdone["metrics"]
    report["lookup_speed_vs_fp32"] = qdone["lookup_speed_vs_fp32"]
    report["paired"] = qdone.get("paired", {})
    if "quant_loss_attribution" in qdone:
        report["quant_loss_attribution"] = qdone["quant_loss_attribution"]
    report["eval_split"] = run.eval.eval_split
    report["field_scorer"], report["row_priority"] = run.prune.field_scorer, run.quant.row_priority
    if env.is_main:
        with open(os.path.join(job.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        logger.info("report: %s", os.path.join(job.out, "report.md"))
    return report


def _train_stage(job: _Job) -> Tuple[DLRMTrainer, Dict[str, Any]]:
    """Train with the field-importance and row-priority trackers attached (resumable from its
    last ``--checkpoint_every`` checkpoint); returns the trained trainer and the stage record."""
    run, env, config = job.run, job.env, job.config
    # Planned like train_dlrm's trainer, reserving what the trackers attached here hold.
    trainer = build_trainer(config, run.training, run.sharding, env,
                            row_priority_channels=len(_row_counters(run.quant)),
                            field_importance=run.prune.prune_baseline)
    ckpt = CheckpointManager(os.path.join(job.out, "train", "checkpoints"), fingerprint(run.data.data, config))
    done = job.finished("train")
    if done is not None:
        _load_recorded(job, "train", trainer, ckpt, done["checkpoint"])
        return trainer, done
    if run.epochs < 1:
        raise SystemExit("--epochs must be >= 1: field scores and row priorities are collected while training")
    fields = TaylorFieldImportance(trainer.model, baseline=run.prune.prune_baseline, seed=run.training.seed)
    counters = RowPriority(config.tables(), channels=_row_counters(run.quant))
    loop = _loop(trainer, ckpt, job.spec, run, env, run.epochs, job.parts["train"],
                 {"stage": "train", "stage_key": job.keys["train"]}, "epoch", importance=fields,
                 row_priority=counters)
    if loop.last_checkpoint is None and run.init_from:
        _init_from(trainer, run, config)
    with _timed("training with the trackers"):
        loop.run()
    metrics = trainer.evaluate(job.eval_batches(), desc=f"{run.eval.eval_split} (trained)")
    scores = fields.scores()
    gradient_scales = fields.gradient_scales()
    counters.save(os.path.join(job.out, "train", "row_counts"))  # each rank its rows
    done = {"metrics": metrics, "scores": scores, "checkpoint": job.store.rel(loop.last_checkpoint),
            "gradient_scales": gradient_scales}
    job.save("train", done)
    return trainer, done


def _load(trainer: DLRMTrainer, ckpt: CheckpointManager, path: str) -> None:
    """Load the checkpoint at ``path`` (of ``ckpt``'s model) into ``trainer``."""
    state = trainer.state_dict_to_load()
    ckpt.load(state, path)
    trainer.load_state_dict(state)


def _load_recorded(job: _Job, stage: str, trainer: DLRMTrainer, ckpt: CheckpointManager, rel: str) -> None:
    """Load the checkpoint a finished ``stage``'s record names, after checking that the stage
    with this key wrote it (its progress holds the key): a checkpoint rewritten by a run with
    other settings that stopped half-way is refused, naming it, never read as this one."""
    path = job.store.resolve(rel)
    if not checkpoint_matches(path, {"stage_key": job.keys[stage]}):
        raise StageRecordError(f"{path}: not the checkpoint the {stage!r} stage's record "
                               f"({job.store.record_path(stage)}) was written with (a run with other "
                               f"settings rewrote it?); delete {os.path.dirname(job.store.record_path(stage))} "
                               f"to run the stage again")
    _load(trainer, ckpt, path)


def _init_from(trainer: DLRMTrainer, run: PipelineRun, config) -> None:
    """``--init_from``: the newest checkpoint of a ``recipes/train_dlrm.py`` run."""
    source = CheckpointManager(os.path.join(run.init_from, "checkpoints"), fingerprint(run.data.data, config))
    path = source.latest()
    if path is None:
        raise SystemExit(f"--init_from {run.init_from}: no checkpoint")
    _load(trainer, source, path)
    logger.info("initialised from %s", path)


def _prune_stage(job: _Job, trainer: DLRMTrainer, done: Dict[str, Any], overrides):
    """Prune fields, fine-tune the pruned model and, as the reference, the uncompressed one
    (each resumable from its last ``--checkpoint_every`` checkpoint); returns the pruned
    trainer, its config and the stage record.  ``trainer`` ends as the fine-tuned reference."""
    run, env, config, out = job.run, job.env, job.config, job.out
    protected = overrides.protected_features(config.tables()) if overrides else []
    if run.prune.prune_rounds and run.prune.keep_fields is None:
        raise SystemExit("--prune_rounds needs --keep_fields (the number of fields at the end)")
    by_mean = run.prune.prune_mode == "mean"
    reference_ckpt = CheckpointManager(os.path.join(out, "prune", "reference_checkpoints"), fingerprint(run.data.data, config))
    pdone = job.finished("prune")
    if pdone is not None:
        plan = PruningPlan.load(os.path.join(out, "prune", "plan.json"))  # what the stage did (iterative too)
        small = pruned_config(config, plan, mean_filled=by_mean)
        pruned = DLRMTrainer(small, job.optim, env, run.training.batch_size, seed=run.training.seed,
                             **trainer.planning_options([t.name for t in small.tables()]))
        _load_recorded(job, "prune", pruned, _pruned_ckpt(job, small), pdone["checkpoint"])
        _load_recorded(job, "prune", trainer, reference_ckpt, pdone["reference_checkpoint"])
        return pruned, small, pdone
    field_scores, scorer = _field_scores(run, done, trainer, job.spec, env, config)
    plan = choose_plan(field_scores, config.tables(), keep=run.prune.keep_fields,
                       drop_fraction=run.prune.drop_fraction, score_share=run.prune.drop_score_share,
                       protected=protected, method=scorer)
    trained = job.store.resolve(done["checkpoint"])
    if run.prune.prune_rounds:
        pruned, plan = _iterative(job, trainer, plan, protected, trained)
        small = pruned_config(config, plan, mean_filled=by_mean)
        path = _pruned_ckpt(job, small).save(pruned.state_dict(),
                                             new_progress(stage="prune/pruned", stage_key=job.keys["prune"]))
    else:
        small = pruned_config(config, plan, mean_filled=by_mean)
        pruned, path = _fine_tuned_pruned(job, trainer, plan, small, trained)
    metrics = pruned.evaluate(job.eval_batches(), desc=f"{run.eval.eval_split} (pruned)")
    # The reference a compressed model is judged against: the uncompressed model given the
    # same fine-tuning (fresh data improves it too); the quantize stage compares row by row.
    epochs, steps = _reference_steps(run, job.parts["finetune"])
    loop = _loop(trainer, reference_ckpt, job.spec, run, env, epochs, job.parts["finetune"],
                 {"stage": "prune/reference", "stage_key": job.keys["prune"]}, "fine-tune (reference)")
    with _timed("fine-tuning the uncompressed reference"):
        loop.run(steps)
    reference = trainer.evaluate(job.eval_batches(), desc=f"{run.eval.eval_split} (reference)")
    if env.is_main:
        plan.save(os.path.join(out, "prune", "plan.json"))
    pdone = {"metrics": metrics, "reference": reference, "checkpoint": job.store.rel(path),
             "plan": plan.summary(), "scores": field_scores, "scorer": scorer,
             "reference_checkpoint": job.store.rel(loop.last_checkpoint)}
    job.save("prune", pdone)
    return pruned, small, pdone


def _reference_steps(run: PipelineRun, part: range):
    """(epochs, steps or None) of the reference's fine-tuning: the pruned model's.  One-shot
    pruning fine-tunes ``--finetune_epochs`` passes over the held-out part; ``--prune_rounds``
    trains rounds × (``--score_batches`` + ``--finetune_steps``) steps on that part, cycled,
    and so must the reference (it got one pass: the paired pruning step compared models
    trained 3 and 10 steps, reported as fine-tuned the same way)."""
    if not run.prune.prune_rounds:
        return run.prune.finetune_epochs, None
    steps = run.prune.prune_rounds * (run.prune.score_batches + run.prune.finetune_steps)
    return -(-steps // max(1, len(part))), steps


def _pruned_ckpt(job: _Job, small) -> CheckpointManager:
    return CheckpointManager(os.path.join(job.out, "prune", "checkpoints"), fingerprint(job.run.data.data, small))


def _fine_tuned_pruned(job: _Job, trainer: DLRMTrainer, plan: PruningPlan, small, trained: str):
    """One-shot pruning: the pruned model (from the trained checkpoint, or resumed from its own
    mid-fine-tuning checkpoint) fine-tuned; returns it and its last checkpoint."""
    run, env = job.run, job.env
    ckpt = _pruned_ckpt(job, small)
    match = {"stage": "prune/pruned", "stage_key": job.keys["prune"]}
    latest = ckpt.latest()
    if latest is not None and checkpoint_matches(latest, match):
        # (resumed below: the state comes from the checkpoint, the means included)
        pruned = DLRMTrainer(small, job.optim, env, run.training.batch_size, seed=run.training.seed,
                             **trainer.planning_options([t.name for t in small.tables()]))
    else:
        means = (_pruned_field_means(trainer, plan, job.spec, run, env, job.parts["train"])
                 if run.prune.prune_mode == "mean" else None)
        with _timed("pruning (sharding the smaller model, reading its tables)"):
            pruned = prune_trainer(trainer, plan, trained, run.training.batch_size, seed=run.training.seed, means=means)
    loop = _loop(pruned, ckpt, job.spec, run, env, run.prune.finetune_epochs, job.parts["finetune"], match,
                 "fine-tune (pruned)")
    with _timed("fine-tuning the pruned model"):
        loop.run()
    return pruned, loop.last_checkpoint


def _iterative(job: _Job, trainer: DLRMTrainer, plan: PruningPlan, protected, trained: str):
    """``--prune_rounds``: rounds of (score → drop → fine-tune) on the held-out part; returns
    the pruned trainer and the plan it amounts to (``trainer`` is restored to ``trained``)."""
    run, env, config = job.run, job.env, job.config
    part = job.parts["finetune"]

    def finetune_data():
        while True:
            ds = job.spec.dataset("train", run.training.batch_size, env.rank, env.world_size,
                                  start_batch=part.start, max_batches=part.stop)
            yield from job.spec.batches(ds, run.data.num_workers)

    pruned = iterative_prune(
        trainer, finetune_data(), rounds=run.prune.prune_rounds, score_batches=run.prune.score_batches,
        finetune_steps=run.prune.finetune_steps, keep_fields=run.prune.keep_fields,
        work_dir=os.path.join(job.out, "prune", "rounds"), batch_size=run.training.batch_size,
        baseline=run.prune.prune_baseline, protected=protected, seed=run.training.seed,
        mean_batches=run.prune.mean_batches if run.prune.prune_mode == "mean" else None)
    plan = PruningPlan(tables=plan.tables, table_bytes=plan.table_bytes,
                       dropped_features=[f for f in config.feature_names if f not in pruned.features],
                       method=f"iterative shark-{run.prune.prune_baseline}",
                       criterion={"keep": run.prune.keep_fields, "rounds": run.prune.prune_rounds}, protected=protected)
    # iterative_prune trains the original model too; restore it from its checkpoint
    _load(trainer, CheckpointManager(os.path.join(job.out, "train", "checkpoints"), fingerprint(run.data.data, config)),
          trained)
    return pruned, plan


def row_alignment(quant: QuantSection, device: torch.device) -> int:
    """``--row_alignment``: ``auto`` is 16 on CUDA and 1 on CPU, the rule TorchRec's sharded
    quantized kernels follow (``quant_embedding_kernel.py``): FBGEMM's CUDA kernels need rows
    aligned to 16 bytes, its CPU kernels do not."""
    return serving_row_alignment(torch.device(device).type, quant.row_alignment)


def _quant_config(quant: QuantSection, overrides, kept, device: torch.device) -> RowwiseQuantConfig:
    """The tier policy from the command line, with the overrides file's per-table settings for
    the tables that survived pruning."""
    import dataclasses

    align = row_alignment(quant, device)
    # (with --quant_fractions too, the run's tiers: those a table's own budget from the overrides
    # file may use; the config's default would let it drop rows)
    common = dict(tiers=quant.tier_names, drop_rows=quant.drop_rows, row_alignment=align,
                  row_fit=quant.quant_row_fit, shared_sample_rows=quant.quant_shared_sample_rows)
    if quant.quant_fractions:
        config = RowwiseQuantConfig(fractions=dict(quant.quant_fractions), **common)
    else:
        config = RowwiseQuantConfig(budget_fraction=quant.budget_fraction, **common)
    if overrides is None:
        return config
    merged = overrides.quant_config(config)
    return dataclasses.replace(
        merged,
        table_overrides={k: v for k, v in merged.table_overrides.items() if k in kept},
        table_fractions={k: v for k, v in merged.table_fractions.items() if k in kept},
        table_budgets={k: v for k, v in merged.table_budgets.items() if k in kept})


def _row_counters(quant: QuantSection) -> Dict[str, tuple]:
    """Row counters collected while training, as ``RowPriority`` (α, β, γ): positive and
    negative uses with SHARK's decay, and without decay (plain frequency).  Any (α, β) is a
    linear combination of the first two, so the priority constants can be tuned without
    training again."""
    counters = {"positive": (1.0, 0.0, quant.priority_gamma), "negative": (0.0, 1.0, quant.priority_gamma)}
    if quant.priority_gamma != 1.0:
        counters.update({"positive_plain": (1.0, 0.0, 1.0), "negative_plain": (0.0, 1.0, 1.0)})
    return counters


def _priority_mix(quant: QuantSection, gradient_scales, tables) -> Tuple[Dict[str, float], Dict[str, float]]:
    """The row priorities ``--row_priority`` asks for, as ``(channel coefficients, scale per
    table)`` of the train stage's counters: ``α · positive + β · negative`` (SHARK), or the
    plain use counts (frequency).

    With ``--tier_weighting gradient`` (SHARK priorities only), each table's priorities are
    scaled by its field's mean squared per-sample gradient ``mean_n ‖g[n,f]‖²`` (collected by
    the field tracker while training): the expected loss change from an error ``δ`` in a row is
    about ``uses × ‖g‖² × ‖δ‖² / dim``, so a byte budget shared by all tables goes where errors
    move the loss most, not only where rows are used most.  A table serving several features
    takes the largest of their scales (a feature several tables read is scored per table, as
    TorchRec names its outputs: ``<feature>@<table>``).  A table none of whose features has a
    finite scale (a field the tracker never saw) turns the weighting off for every table, with a
    warning: left unscaled among scaled tables, its rows counted 40-100x too much in the shared
    budget."""
    channels = _row_counters(quant)
    if quant.row_priority == "frequency":
        plain = "positive_plain" if "positive_plain" in channels else "positive"
        return {plain: 1.0, plain.replace("positive", "negative"): 1.0}, {}
    mix = {"positive": quant.priority_alpha, "negative": quant.priority_beta}
    scale: Dict[str, float] = {}
    if quant.tier_weighting == "gradient" and gradient_scales:
        for t in tables:
            values = [gradient_scales.get(f"{f}@{t.name}", gradient_scales.get(f, float("nan")))
                      for f in t.feature_names]
            finite = [x for x in values if math.isfinite(x) and x >= 0]
            if finite:
                scale[t.name] = max(finite)
        unscaled = [t.name for t in tables if t.name not in scale]
        if unscaled:
            logger.warning("tables %s have no gradient scale (their fields were never scored while training): "
                           "--tier_weighting gradient is off for every table", unscaled)
            scale = {}
    return mix, scale


def _field_scores(run, done, trainer: DLRMTrainer, spec, env, config):
    """The scores pruning follows (``--field_scorer``) and the scorer's name."""
    if run.prune.field_scorer == "shark":
        return done["scores"], f"shark-{run.prune.prune_baseline}"
    if run.prune.field_scorer == "random":
        return RandomImportance(list(config.feature_names), seed=run.training.seed).scores(), "random"
    trainer.model.eval()
    pi = PermutationImportance(dlrm_per_sample_loss(trainer.model), list(config.feature_names),
                               seed=run.training.seed)
    ds = spec.dataset("dev", run.training.test_batch_size or run.training.batch_size, env.rank, env.world_size,
                      max_batches=run.prune.permutation_batches)
    pi.evaluate(tqdm(spec.batches(ds, run.data.num_workers), desc="permutation importance (dev)",
                     disable=not env.is_main, dynamic_ncols=True))
    return pi.scores(), "permutation"


def _pruned_field_means(trainer: DLRMTrainer, plan: PruningPlan, spec, run, env, part: range):
    """The dropped fields' mean pooled embeddings over the first ``--mean_batches`` batches of
    the training data, by the trained model (a collective)."""
    if not plan.dropped_features:
        return {}
    with _timed(f"mean pooled embeddings of the pruned fields {plan.dropped_features}"):
        ds = spec.dataset("train", run.training.batch_size, env.rank, env.world_size, start_batch=part.start,
                          max_batches=part.stop)
        return trainer.field_means(spec.batches(ds, run.data.num_workers), plan.dropped_features,
                                   run.prune.mean_batches)


def _eval_batches(run, spec, env):
    """Every stage's evaluation batches: ``--eval_split`` (tune on dev, report on test)."""
    if run.eval.eval_split == "test":
        return test_batches(run.data, run.training, spec, env)
    ds = spec.dataset("dev", run.training.test_batch_size or run.training.batch_size, env.rank, env.world_size,
                      max_batches=run.data.limit_test_batches)
    return spec.batches(ds, run.data.num_workers)


def _export_of(out: str, key: str) -> bool:
    """Whether ``OUT/model`` is the export of the quantize stage keyed ``key`` (its manifest
    says so): the export, ``report.md`` and the figures lie outside ``OUT/quantize``, so a
    record linked from another run (:class:`~shark_torchrec.stages.StageSharing`) or a run of
    other settings in between leaves them another stage's."""
    from shark_torchrec.sharded.export import MANIFEST

    try:
        with open(os.path.join(out, "model", MANIFEST)) as f:
            return json.load(f).get("metadata", {}).get("stage_key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _quantize(run, env, spec, config, small, trainer: DLRMTrainer, pruned: DLRMTrainer, done, pdone,
              overrides, out: str, key: str) -> Dict[str, Any]:
    """The quantize stage on every rank (:mod:`shark_torchrec.quantize_stage`): no table is
    gathered; its export's manifest holds the stage's ``key``.  Returns the stage's
    ``done.json`` content; rank 0 writes the report."""
    from shark_torchrec.quantize_stage import lookup_batches, quantize_stage
    from shark_torchrec.sharded.export import export_sharded
    from shark_torchrec.training.sharding import plan_summary

    counters = RowPriority(config.tables(), channels=_row_counters(run.quant))
    counters.load(os.path.join(out, "train", "row_counts"))
    mix, scale = _priority_mix(run.quant, done.get("gradient_scales"), small.tables())
    kept = {t.name for t in small.tables()}
    plan = PruningPlan.load(os.path.join(out, "prune", "plan.json"))

    def export(model, metrics) -> None:
        export_sharded(model, os.path.join(out, "model"), pruning_plan=plan,
                       metadata={f"{run.eval.eval_split}_auc": metrics["auc"], "stage_key": key},
                       plan=plan_summary(pruned.plan))

    with _timed("row-wise mixed precision, evaluation and export (sharded)"):
        result = quantize_stage(
            pruned, trainer, _quant_config(run.quant, overrides, kept, env.device), counters, mix, scale,
            lambda: _eval_batches(run, spec, env),
            lookup_batches(spec, run.training.test_batch_size or run.training.batch_size, run.data.limit_test_batches, env),
            env, out, run.eval.attribute_quant_loss, run.eval.bootstrap, run.training.seed, export)
    metrics = result.metrics
    fp32_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in config.tables())
    metrics["fp32_embedding_bytes"] = fp32_bytes
    metrics["bytes_saved_fraction"] = 1 - metrics["embedding_bytes"] / fp32_bytes
    qdone = {"metrics": metrics, "lookup_speed_vs_fp32": result.speed, "paired": result.paired,
             "rows_per_tier": result.rows_per_tier, "centroids": result.centroids}
    if result.attribution is not None:
        qdone["quant_loss_attribution"] = result.attribution
    if env.is_main:
        _write_report(out, done, pdone, result, config, run)
    return qdone


def _write_report(out, done, pdone, result, config, run) -> None:
    from shark_torchrec import report as rep

    stages = {"trained": done["metrics"], "uncompressed, fine-tuned": pdone["reference"],
              "pruned": pdone["metrics"], "quantized": result.metrics}
    figures = ["field_scores.png", "auc_by_stage.png", "bytes_per_table.png", "row_priorities.png"]
    plan = PruningPlan.load(os.path.join(out, "prune", "plan.json"))
    rep.plot_field_scores(done["scores"], plan.dropped_features, os.path.join(out, figures[0]))
    rep.plot_auc_by_stage(stages, os.path.join(out, figures[1]))
    rep.plot_bytes_per_table({t.name: t.num_embeddings * t.embedding_dim * 4 for t in config.tables()},
                             result.bytes_per_table, os.path.join(out, figures[2]))
    rep.plot_priorities(result.plot_priorities, result.plot_tiers, os.path.join(out, figures[3]),
                        never_used=result.unused_rows)
    rep.write_markdown(out, {"stages": stages, "plan": pdone["plan"], "lookup_speed_vs_fp32": result.speed,
                             "paired": result.paired, "scorer": pdone.get("scorer", ""),
                             "row_priority": run.quant.row_priority, "eval_split": run.eval.eval_split,
                             "quant_loss_attribution": result.attribution,
                             "row_alignment": row_alignment(run.quant, resolved_device(run.training.device)),
                             "rows_per_tier": result.rows_per_tier, "centroids": result.centroids},
                       figures)


def resolved_device(device: str) -> torch.device:
    """The device ``--device`` resolves to (``auto``: CUDA where there is one)."""
    return torch.device("cuda" if (device == "cuda" or (device == "auto" and torch.cuda.is_available())) else "cpu")
