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

import argparse
import contextlib
import json
import logging
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from shark_torchrec.cli_args import (
    existing_dir,
    fraction,
    nonnegative_int,
    positive_int,
    tier_fractions,
    tier_list,
    unit_fraction,
)
from shark_torchrec.importance import (
    BASELINES,
    PermutationImportance,
    RandomImportance,
    RowPriority,
    TaylorFieldImportance,
    dlrm_per_sample_loss,
)
from shark_torchrec.pruning import PruningPlan, choose_plan
from shark_torchrec.planning.overrides import load_overrides
from shark_torchrec.pruning.sharded import iterative_prune, prune_trainer, pruned_config
from shark_torchrec.quant import RowwiseQuantConfig
from shark_torchrec.quant.layout import serving_row_alignment
from shark_torchrec.stages import StageStore
from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.loop import TrainingLoop, checkpoint_matches, new_progress
from shark_torchrec.training.distributed import DistEnv, run_job
from shark_torchrec.training.datasets import require_rows
from shark_torchrec.training.train_dlrm import (
    build_parser as build_train_parser,
    data_spec_from_args,
    fingerprint,
    model_config_from_args,
    optim_config_from_args,
    planning_options,
    test_batches,
)
from shark_torchrec.training.trainer import DLRMTrainer

logger = logging.getLogger(__name__)
STAGES = ("train", "prune", "quantize")
FIELD_SCORERS = ("shark", "permutation", "random")
ROW_PRIORITIES = ("shark", "frequency")
#: Tiers the byte budget may use by default.
DEFAULT_QUANT_TIERS = "fp16,int8,int4,int2,shared"


def build_parser() -> argparse.ArgumentParser:
    p = build_train_parser()
    p.description = "SHARK on a DLRM: train, prune fields, fine-tune, row-wise mixed precision, export."
    g = p.add_argument_group("SHARK")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--keep_fields", type=positive_int, help="fields kept by pruning")
    c.add_argument("--drop_fraction", type=fraction, help="fraction of fields pruned, in [0, 1) (default 0.25)")
    c.add_argument("--drop_score_share", type=fraction,
                   help="prune the fields that save the most bytes for their field score (least score per "
                   "byte first) while the pruned fields' scores add up to at most this share of all "
                   "fields' scores, in [0, 1); fields scoring 0 (constant fields) are always pruned")
    g.add_argument("--prune_baseline", choices=BASELINES, default="mean")
    g.add_argument("--prune_mode", choices=["mean", "remove"], default="mean",
                   help="what a pruned field becomes: mean (default): a constant, its mean pooled "
                   "embedding over --mean_batches training batches, that the interaction keeps reading "
                   "(its table is gone; lossless for a field that carries no information); remove: the "
                   "interaction and the over-arch's first layer shrink without it")
    g.add_argument("--mean_batches", type=positive_int, default=100,
                   help="training batches (per rank) the pruned fields' means are taken over")
    g.add_argument("--finetune_epochs", type=nonnegative_int, default=1)
    g.add_argument("--finetune_fraction", type=fraction, default=0.25,
                   help="last fraction of the train split kept from training, to fine-tune the "
                   "pruned model on data it has not seen (0: fine-tune on the training data)")
    g.add_argument("--prune_rounds", type=nonnegative_int, default=0,
                   help="iterative pruning: rounds of (score --score_batches steps → drop → "
                   "fine-tune --finetune_steps steps) down to --keep_fields (0: one-shot)")
    g.add_argument("--score_batches", type=positive_int, default=20)
    g.add_argument("--finetune_steps", type=positive_int, default=20)
    q = g.add_mutually_exclusive_group()
    q.add_argument("--quant_budget_fraction", type=unit_fraction,
                   help="embedding bytes after quantization, as a fraction of the pruned fp32 "
                   "bytes (default 0.15)")
    g.add_argument("--quant_tiers", type=tier_list, default=DEFAULT_QUANT_TIERS,
                   help="tiers the byte budget may use (default %(default)s): fp32, fp16, int8, int4, "
                   "int2, shared (a row read as one of its table's centroids, storing only its id-map "
                   "entry) and drop (a row read as zeros)")
    g.add_argument("--drop_rows", choices=["any", "unused"], default="any",
                   help="with drop among --quant_tiers: rows the byte budget may drop (read as "
                   "zeros): any row (default), or only rows training never read")
    g.add_argument("--row_alignment", choices=["auto", "16", "1"], default="auto",
                   help="bytes each quantized row is padded to: 16 (GPUs need it) or 1 (a model "
                   "served on CPU only: smaller INT4/INT2 rows); auto (default): as TorchRec's "
                   "sharded inference does, 16 when the run uses CUDA, else 1")
    q.add_argument("--quant_fractions", type=tier_fractions,
                   help="row fractions per tier instead of a budget, e.g. fp16=0.1,int8=0.3,int4=0.6")
    g.add_argument("--init_from", metavar="DIR", type=existing_dir,
                   help="start from the newest checkpoint of a recipes/train_dlrm.py run (same "
                   "model flags); the train stage then trains --epochs more with the trackers")
    g.add_argument("--stop_after", choices=STAGES, help="stop after this stage (resume later)")
    _add_comparison_flags(p)
    p.set_defaults(out="runs/shark_dlrm")
    return p


def _add_comparison_flags(p: argparse.ArgumentParser) -> None:
    """Flags that choose the scorers and priorities being compared, and how they are judged."""
    e = p.add_argument_group("what is compared, and how it is judged")
    e.add_argument("--field_scorer", choices=FIELD_SCORERS, default="shark",
                   help="field scores the pruning uses: SHARK's (collected while training, "
                   "--prune_baseline), exact permutation importance on the dev split, or random")
    e.add_argument("--permutation_batches", type=int,
                   help="dev batches for --field_scorer permutation (default: all)")
    e.add_argument("--row_priority", choices=ROW_PRIORITIES, default="shark",
                   help="row priorities the tiers follow: SHARK's label-aware decayed counts "
                   "(--priority_alpha/beta/gamma) or plain frequency")
    e.add_argument("--priority_alpha", type=float, default=1.0, help="priority per positive use")
    e.add_argument("--priority_beta", type=float, default=0.2, help="priority per negative use")
    e.add_argument("--priority_gamma", type=float, default=0.9999, help="priority decay per step")
    e.add_argument("--tier_weighting", choices=["gradient", "none"], default="gradient",
                   help="scale each table's SHARK row priorities by its field's mean squared "
                   "gradient, so that the byte budget goes where errors move the loss most")
    e.add_argument("--eval_split", choices=["test", "dev"], default="test",
                   help="split every stage is evaluated on (tune on dev, report on test)")
    e.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the paired AUC comparisons")
    e.add_argument("--attribute_quant_loss", action="store_true",
                   help="also measure, per tier and per table, the AUC recovered when only those "
                   "rows stay fp32 (one evaluation each; report.md 'Where the quantization "
                   "step loses')")


#: flags that change nothing a stage computes
NOT_STAGE_INPUTS = frozenset({"out", "stop_after", "log_level", "debug", "checkpoint_every"})
#: flags the prune stage reads and the train stage does not
PRUNE_INPUTS = frozenset({"keep_fields", "drop_fraction", "drop_score_share", "finetune_epochs", "prune_rounds", "score_batches",
                          "finetune_steps", "field_scorer", "permutation_batches", "planner_overrides",
                          "prune_mode", "mean_batches"})
#: flags the quantize stage reads and the stages before it do not
QUANTIZE_INPUTS = frozenset({"quant_budget_fraction", "quant_fractions", "quant_tiers", "drop_rows", "row_alignment",
                             "row_priority", "priority_alpha", "priority_beta", "tier_weighting", "bootstrap",
                             "attribute_quant_loss"})
#: flags of train_dlrm's parser that this pipeline does not use: refused when set
UNUSED_FLAGS = {"sharding_type": None, "max_steps": None, "score_fields": None,
                "resume": False}


def stage_inputs(args: argparse.Namespace, device: torch.device, world_size: int) -> Dict[str, Dict[str, Any]]:
    """Each stage's inputs, keying its ``done.json`` (:mod:`shark_torchrec.stages`): the
    quantize stage's are :data:`QUANTIZE_INPUTS`, the prune stage's :data:`PRUNE_INPUTS`, and
    the train stage's every other flag (a flag nobody classified counts as the train stage's:
    changing it reruns every stage rather than being ignored), plus the device the run
    resolved (``--device auto``, ``--row_alignment auto``) and the world size (``--batch_size``
    is per rank)."""
    flags = {k: v for k, v in vars(args).items() if k not in NOT_STAGE_INPUTS}
    return {
        "train": {**{k: v for k, v in flags.items() if k not in PRUNE_INPUTS | QUANTIZE_INPUTS},
                  "resolved_device": device.type, "world_size": world_size},
        "prune": {k: v for k, v in flags.items() if k in PRUNE_INPUTS},
        "quantize": {k: v for k, v in flags.items() if k in QUANTIZE_INPUTS},
    }


def _check_args(args: argparse.Namespace) -> None:
    """Refuse flags this pipeline would ignore, and an --out that cannot be a directory."""
    for flag, default in UNUSED_FLAGS.items():
        if getattr(args, flag) != default:
            raise SystemExit(f"--{flag} is not used by the SHARK pipeline (recipes/shark_dlrm.py); "
                             f"recipes/train_dlrm.py takes it")
    tiers = [t.strip().lower() for t in args.quant_tiers.split(",")]
    if args.drop_rows != "any" and "drop" not in tiers:
        raise SystemExit(f"--drop_rows {args.drop_rows}: drop is not among --quant_tiers {args.quant_tiers} "
                         f"(add it, e.g. --quant_tiers {args.quant_tiers},drop)")
    if args.quant_fractions and args.quant_tiers != DEFAULT_QUANT_TIERS:
        raise SystemExit("--quant_tiers is for a byte budget; --quant_fractions names its tiers itself")
    try:
        os.makedirs(args.out, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise SystemExit(f"--out {args.out}: cannot be a directory ({e.strerror}: {e.filename})") from None


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return run_job(build_parser().parse_args(argv), _run)


@contextlib.contextmanager
def _timed(what: str):
    """Logs what the pipeline is doing and how long it took."""
    logger.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    logger.info("%s: %.1f s", what, time.perf_counter() - t0)


def _loop(trainer: DLRMTrainer, ckpt: CheckpointManager, spec, args, env, epochs: int, part: range,
          match: Dict[str, Any], desc: str, **trackers) -> TrainingLoop:
    """A resumable loop of ``epochs`` passes over the global train batches in ``part``,
    checkpointed every ``--checkpoint_every`` steps under ``ckpt`` with ``match`` (the stage's
    key) in its progress; resumed from a checkpoint of the same ``match`` if one is there."""

    def batches(epoch: int, start_batch: int):
        ds = spec.dataset("train", args.batch_size, env.rank, env.world_size,
                          start_batch=part.start + start_batch, max_batches=part.stop)
        return spec.batches(ds, args.num_workers)

    loop = TrainingLoop(trainer, ckpt, batches, epochs, args.batch_size * env.world_size,
                        checkpoint_every=args.checkpoint_every, progress=new_progress(**match), desc=desc,
                        **trackers)
    loop.resume(match=match)
    return loop


def _parts(spec, args, env) -> Dict[str, range]:
    """Global train batches for training and for fine-tuning (fresh data, as when a model in
    production keeps learning from new logs)."""
    require_rows(spec, args, env.world_size)  # an empty split is an error naming its files
    total = spec.train_batches(args.batch_size * env.world_size, args.limit_train_batches)
    held = int(round(total * args.finetune_fraction))
    if not 0 <= held < total:
        raise SystemExit(f"--finetune_fraction {args.finetune_fraction} leaves no training data "
                         f"({total} batches)")
    return {"train": range(0, total - held), "finetune": range(total - held, total) if held else range(0, total)}


class _Job:
    """One run of the pipeline: its settings, data, stage keys and the stages' records."""

    def __init__(self, args: argparse.Namespace, env: DistEnv) -> None:
        self.args, self.env, self.out = args, env, args.out
        self.spec = data_spec_from_args(args)
        self.config = model_config_from_args(args, self.spec)
        self.optim = optim_config_from_args(args)
        self.parts = _parts(self.spec, args, env)
        self.store = StageStore(self.out, env.is_main)
        self.inputs = stage_inputs(args, env.device, env.world_size)
        keys = {"train": self.store.key(self.inputs["train"])}
        keys["prune"] = self.store.key(self.inputs["prune"], [keys["train"]])
        keys["quantize"] = self.store.key(self.inputs["quantize"], [keys["prune"]])
        self.keys = keys
        self.upstream = {"train": [], "prune": [keys["train"]], "quantize": [keys["prune"]]}
        self.records = {stage: self.store.load(stage, self.inputs[stage], self.upstream[stage]) for stage in STAGES}
        self.ran: list = []  # stages run by this process: the stages after them run too

    def finished(self, stage: str) -> Optional[Dict[str, Any]]:
        """The stage's record if it is finished with these inputs and nothing before it ran."""
        record = None if any(STAGES.index(r) < STAGES.index(stage) for r in self.ran) else self.records[stage]
        if record is None:
            self.ran.append(stage)
        return record

    def save(self, stage: str, result: Dict[str, Any]) -> None:
        self.store.save(stage, self.inputs[stage], self.upstream[stage], result)

    def eval_batches(self):
        return _eval_batches(self.args, self.spec, self.env)


def _run(args: argparse.Namespace, env: DistEnv) -> Dict[str, Any]:
    _check_args(args)
    if args.keep_fields is None and args.drop_fraction is None and args.drop_score_share is None:
        args = argparse.Namespace(**{**vars(args), "drop_fraction": 0.25})  # (the default, keyed as such)
    job = _Job(args, env)
    if env.is_main and None in job.records.values():
        for name in ("report.json", "report.md"):  # a report of other inputs must not outlive them
            if os.path.isfile(os.path.join(job.out, name)):
                os.remove(os.path.join(job.out, name))
    report: Dict[str, Any] = {"stages": {}}
    trainer, done = _train_stage(job)
    report["stages"]["trained"] = done["metrics"]
    if args.stop_after == "train":
        return report
    overrides = load_overrides(args.planner_overrides, job.config.tables()) if args.planner_overrides else None
    pruned, small, pdone = _prune_stage(job, trainer, done, overrides)
    report["stages"]["uncompressed, fine-tuned"] = pdone["reference"]
    report["stages"]["pruned"] = pdone["metrics"]
    report["plan"] = pdone["plan"]
    if args.stop_after == "prune":
        return report
    qdone = job.finished("quantize")
    if qdone is None:
        qdone = _quantize(args, env, job.spec, job.config, small, trainer, pruned, done, pdone, overrides, job.out)
        job.save("quantize", qdone)
    report["stages"]["quantized"] = qdone["metrics"]
    report["lookup_speed_vs_fp32"] = qdone["lookup_speed_vs_fp32"]
    report["paired"] = qdone.get("paired", {})
    if "quant_loss_attribution" in qdone:
        report["quant_loss_attribution"] = qdone["quant_loss_attribution"]
    report["eval_split"] = args.eval_split
    report["field_scorer"], report["row_priority"] = args.field_scorer, args.row_priority
    if env.is_main:
        with open(os.path.join(job.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        logger.info("report: %s", os.path.join(job.out, "report.md"))
    return report


def _train_stage(job: _Job) -> Tuple[DLRMTrainer, Dict[str, Any]]:
    """Train with the field-importance and row-priority trackers attached (resumable from its
    last ``--checkpoint_every`` checkpoint); returns the trained trainer and the stage record."""
    args, env, config = job.args, job.env, job.config
    # Planned like train_dlrm's trainer, reserving what the trackers attached here hold.
    trainer = DLRMTrainer(config, job.optim, env, args.batch_size, seed=args.seed,
                          **planning_options(config, args.batch_size, env.world_size,
                                             planner_overrides=args.planner_overrides,
                                             row_priority_channels=len(_row_counters(args)),
                                             field_importance=args.prune_baseline))
    ckpt = CheckpointManager(os.path.join(job.out, "train", "checkpoints"), fingerprint(args, config))
    done = job.finished("train")
    if done is not None:
        _load(trainer, ckpt, job.store.resolve(done["checkpoint"]))
        return trainer, done
    if args.epochs < 1:
        raise SystemExit("--epochs must be >= 1: field scores and row priorities are collected while training")
    fields = TaylorFieldImportance(trainer.model, baseline=args.prune_baseline, seed=args.seed)
    counters = RowPriority(config.tables(), channels=_row_counters(args))
    loop = _loop(trainer, ckpt, job.spec, args, env, args.epochs, job.parts["train"],
                 {"stage": "train", "stage_key": job.keys["train"]}, "epoch", importance=fields,
                 row_priority=counters)
    if loop.last_checkpoint is None and args.init_from:
        _init_from(trainer, args, config)
    with _timed("training with the trackers"):
        loop.run()
    metrics = trainer.evaluate(job.eval_batches(), desc=f"{args.eval_split} (trained)")
    scores = fields.scores()
    gradient_scales = fields.gradient_scales()
    counters.save(os.path.join(job.out, "train", "row_counts"))  # each rank its rows
    done = {"metrics": metrics, "scores": scores, "checkpoint": job.store.rel(loop.last_checkpoint),
            "gradient_scales": gradient_scales}
    job.save("train", done)
    return trainer, done


def _load(trainer: DLRMTrainer, ckpt: CheckpointManager, path: str) -> None:
    """Load the checkpoint at ``path`` (of ``ckpt``'s model) into ``trainer``."""
    state = trainer.state_dict()
    ckpt.load(state, path)
    trainer.load_state_dict(state)


def _init_from(trainer: DLRMTrainer, args, config) -> None:
    """``--init_from``: the newest checkpoint of a ``recipes/train_dlrm.py`` run."""
    source = CheckpointManager(os.path.join(args.init_from, "checkpoints"), fingerprint(args, config))
    path = source.latest()
    if path is None:
        raise SystemExit(f"--init_from {args.init_from}: no checkpoint")
    _load(trainer, source, path)
    logger.info("initialised from %s", path)


def _prune_stage(job: _Job, trainer: DLRMTrainer, done: Dict[str, Any], overrides):
    """Prune fields, fine-tune the pruned model and, as the reference, the uncompressed one
    (each resumable from its last ``--checkpoint_every`` checkpoint); returns the pruned
    trainer, its config and the stage record.  ``trainer`` ends as the fine-tuned reference."""
    args, env, config, out = job.args, job.env, job.config, job.out
    protected = overrides.protected_features(config.tables()) if overrides else []
    if args.prune_rounds and args.keep_fields is None:
        raise SystemExit("--prune_rounds needs --keep_fields (the number of fields at the end)")
    by_mean = args.prune_mode == "mean"
    reference_ckpt = CheckpointManager(os.path.join(out, "prune", "reference_checkpoints"), fingerprint(args, config))
    pdone = job.finished("prune")
    if pdone is not None:
        plan = PruningPlan.load(os.path.join(out, "prune", "plan.json"))  # what the stage did (iterative too)
        small = pruned_config(config, plan, mean_filled=by_mean)
        pruned = DLRMTrainer(small, job.optim, env, args.batch_size, seed=args.seed,
                             **trainer.planning_options([t.name for t in small.tables()]))
        _load(pruned, _pruned_ckpt(job, small), job.store.resolve(pdone["checkpoint"]))
        _load(trainer, reference_ckpt, job.store.resolve(pdone["reference_checkpoint"]))
        return pruned, small, pdone
    field_scores, scorer = _field_scores(args, done, trainer, job.spec, env, config)
    plan = choose_plan(field_scores, config.tables(), keep=args.keep_fields,
                       drop_fraction=args.drop_fraction, score_share=args.drop_score_share,
                       protected=protected, method=scorer)
    trained = job.store.resolve(done["checkpoint"])
    if args.prune_rounds:
        pruned, plan = _iterative(job, trainer, plan, protected, trained)
        small = pruned_config(config, plan, mean_filled=by_mean)
        path = _pruned_ckpt(job, small).save(pruned.state_dict(),
                                             new_progress(stage="prune/pruned", stage_key=job.keys["prune"]))
    else:
        small = pruned_config(config, plan, mean_filled=by_mean)
        pruned, path = _fine_tuned_pruned(job, trainer, plan, small, trained)
    metrics = pruned.evaluate(job.eval_batches(), desc=f"{args.eval_split} (pruned)")
    # The reference a compressed model is judged against: the uncompressed model given the
    # same fine-tuning (fresh data improves it too); the quantize stage compares row by row.
    loop = _loop(trainer, reference_ckpt, job.spec, args, env, args.finetune_epochs, job.parts["finetune"],
                 {"stage": "prune/reference", "stage_key": job.keys["prune"]}, "fine-tune (reference)")
    with _timed("fine-tuning the uncompressed reference"):
        loop.run()
    reference = trainer.evaluate(job.eval_batches(), desc=f"{args.eval_split} (reference)")
    if env.is_main:
        plan.save(os.path.join(out, "prune", "plan.json"))
    pdone = {"metrics": metrics, "reference": reference, "checkpoint": job.store.rel(path),
             "plan": plan.summary(), "scores": field_scores, "scorer": scorer,
             "reference_checkpoint": job.store.rel(loop.last_checkpoint)}
    job.save("prune", pdone)
    return pruned, small, pdone


def _pruned_ckpt(job: _Job, small) -> CheckpointManager:
    return CheckpointManager(os.path.join(job.out, "prune", "checkpoints"), fingerprint(job.args, small))


def _fine_tuned_pruned(job: _Job, trainer: DLRMTrainer, plan: PruningPlan, small, trained: str):
    """One-shot pruning: the pruned model (from the trained checkpoint, or resumed from its own
    mid-fine-tuning checkpoint) fine-tuned; returns it and its last checkpoint."""
    args, env = job.args, job.env
    ckpt = _pruned_ckpt(job, small)
    match = {"stage": "prune/pruned", "stage_key": job.keys["prune"]}
    latest = ckpt.latest()
    if latest is not None and checkpoint_matches(latest, match):
        # (resumed below: the state comes from the checkpoint, the means included)
        pruned = DLRMTrainer(small, job.optim, env, args.batch_size, seed=args.seed,
                             **trainer.planning_options([t.name for t in small.tables()]))
    else:
        means = (_pruned_field_means(trainer, plan, job.spec, args, env, job.parts["train"])
                 if args.prune_mode == "mean" else None)
        with _timed("pruning (sharding the smaller model, reading its tables)"):
            pruned = prune_trainer(trainer, plan, trained, args.batch_size, seed=args.seed, means=means)
    loop = _loop(pruned, ckpt, job.spec, args, env, args.finetune_epochs, job.parts["finetune"], match,
                 "fine-tune (pruned)")
    with _timed("fine-tuning the pruned model"):
        loop.run()
    return pruned, loop.last_checkpoint


def _iterative(job: _Job, trainer: DLRMTrainer, plan: PruningPlan, protected, trained: str):
    """``--prune_rounds``: rounds of (score → drop → fine-tune) on the held-out part; returns
    the pruned trainer and the plan it amounts to (``trainer`` is restored to ``trained``)."""
    args, env, config = job.args, job.env, job.config
    part = job.parts["finetune"]

    def finetune_data():
        while True:
            ds = job.spec.dataset("train", args.batch_size, env.rank, env.world_size,
                                  start_batch=part.start, max_batches=part.stop)
            yield from job.spec.batches(ds, args.num_workers)

    pruned = iterative_prune(
        trainer, finetune_data(), rounds=args.prune_rounds, score_batches=args.score_batches,
        finetune_steps=args.finetune_steps, keep_fields=args.keep_fields,
        work_dir=os.path.join(job.out, "prune", "rounds"), batch_size=args.batch_size,
        baseline=args.prune_baseline, protected=protected, seed=args.seed,
        mean_batches=args.mean_batches if args.prune_mode == "mean" else None)
    plan = PruningPlan(tables=plan.tables, table_bytes=plan.table_bytes,
                       dropped_features=[f for f in config.feature_names if f not in pruned.features],
                       method=f"iterative shark-{args.prune_baseline}",
                       criterion={"keep": args.keep_fields, "rounds": args.prune_rounds}, protected=protected)
    # iterative_prune trains the original model too; restore it from its checkpoint
    _load(trainer, CheckpointManager(os.path.join(job.out, "train", "checkpoints"), fingerprint(args, config)),
          trained)
    return pruned, plan


def row_alignment(args, device: torch.device) -> int:
    """``--row_alignment``: ``auto`` is 16 on CUDA and 1 on CPU, the rule TorchRec's sharded
    quantized kernels follow (``quant_embedding_kernel.py``): FBGEMM's CUDA kernels need rows
    aligned to 16 bytes, its CPU kernels do not."""
    return serving_row_alignment(torch.device(device).type, args.row_alignment)


def _quant_config(args, overrides, kept, device: torch.device) -> RowwiseQuantConfig:
    """The tier policy from the command line, with the overrides file's per-table settings for
    the tables that survived pruning."""
    import dataclasses

    align = row_alignment(args, device)
    if args.quant_fractions:
        try:
            fractions = {k: float(v) for k, v in (item.split("=") for item in args.quant_fractions.split(","))}
        except ValueError:
            raise SystemExit(f"--quant_fractions {args.quant_fractions!r}: expected tier=fraction,...")
        config = RowwiseQuantConfig(fractions=fractions, row_alignment=align)
    else:
        config = RowwiseQuantConfig(budget_fraction=args.quant_budget_fraction or 0.15,
                                    tiers=[t.strip() for t in args.quant_tiers.split(",") if t.strip()],
                                    drop_rows=args.drop_rows, row_alignment=align)
    if overrides is None:
        return config
    merged = overrides.quant_config(config)
    return dataclasses.replace(
        merged,
        table_overrides={k: v for k, v in merged.table_overrides.items() if k in kept},
        table_fractions={k: v for k, v in merged.table_fractions.items() if k in kept},
        table_budgets={k: v for k, v in merged.table_budgets.items() if k in kept})


def _row_counters(args) -> Dict[str, tuple]:
    """Row counters collected while training, as ``RowPriority`` (α, β, γ): positive and
    negative uses with SHARK's decay, and without decay (plain frequency).  Any (α, β) is a
    linear combination of the first two, so the priority constants can be tuned without
    training again."""
    counters = {"positive": (1.0, 0.0, args.priority_gamma), "negative": (0.0, 1.0, args.priority_gamma)}
    if args.priority_gamma != 1.0:
        counters.update({"positive_plain": (1.0, 0.0, 1.0), "negative_plain": (0.0, 1.0, 1.0)})
    return counters


def _priority_mix(args, gradient_scales, tables) -> Tuple[Dict[str, float], Dict[str, float]]:
    """The row priorities ``--row_priority`` asks for, as ``(channel coefficients, scale per
    table)`` of the train stage's counters: ``α · positive + β · negative`` (SHARK), or the
    plain use counts (frequency).

    With ``--tier_weighting gradient`` (SHARK priorities only), each table's priorities are
    scaled by its field's mean squared per-sample gradient ``mean_n ‖g[n,f]‖²`` (collected by
    the field tracker while training): the expected loss change from an error ``δ`` in a row is
    about ``uses × ‖g‖² × ‖δ‖² / dim``, so a byte budget shared by all tables goes where errors
    move the loss most, not only where rows are used most.  A table serving several features
    takes the largest of their scales."""
    channels = _row_counters(args)
    if args.row_priority == "frequency":
        plain = "positive_plain" if "positive_plain" in channels else "positive"
        return {plain: 1.0, plain.replace("positive", "negative"): 1.0}, {}
    mix = {"positive": args.priority_alpha, "negative": args.priority_beta}
    scale: Dict[str, float] = {}
    if args.tier_weighting == "gradient" and gradient_scales:
        for t in tables:
            values = [gradient_scales.get(f, float("nan")) for f in t.feature_names]
            s = max((x for x in values if x == x), default=float("nan"))
            if s == s and s > 0:
                scale[t.name] = s
    return mix, scale


def _field_scores(args, done, trainer: DLRMTrainer, spec, env, config):
    """The scores pruning follows (``--field_scorer``) and the scorer's name."""
    if args.field_scorer == "shark":
        return done["scores"], f"shark-{args.prune_baseline}"
    if args.field_scorer == "random":
        return RandomImportance(list(config.feature_names), seed=args.seed).scores(), "random"
    trainer.model.eval()
    pi = PermutationImportance(dlrm_per_sample_loss(trainer.model), list(config.feature_names),
                               seed=args.seed)
    ds = spec.dataset("dev", args.test_batch_size or args.batch_size, env.rank, env.world_size,
                      max_batches=args.permutation_batches)
    pi.evaluate(tqdm(spec.batches(ds, args.num_workers), desc="permutation importance (dev)",
                     disable=not env.is_main, dynamic_ncols=True))
    return pi.scores(), "permutation"


def _pruned_field_means(trainer: DLRMTrainer, plan: PruningPlan, spec, args, env, part: range):
    """The dropped fields' mean pooled embeddings over the first ``--mean_batches`` batches of
    the training data, by the trained model (a collective)."""
    if not plan.dropped_features:
        return {}
    with _timed(f"mean pooled embeddings of the pruned fields {plan.dropped_features}"):
        ds = spec.dataset("train", args.batch_size, env.rank, env.world_size, start_batch=part.start,
                          max_batches=part.stop)
        return trainer.field_means(spec.batches(ds, args.num_workers), plan.dropped_features,
                                   args.mean_batches)


def _eval_batches(args, spec, env):
    """Every stage's evaluation batches: ``--eval_split`` (tune on dev, report on test)."""
    if args.eval_split == "test":
        return test_batches(args, spec, env)
    ds = spec.dataset("dev", args.test_batch_size or args.batch_size, env.rank, env.world_size,
                      max_batches=args.limit_test_batches)
    return spec.batches(ds, args.num_workers)


def _quantize(args, env, spec, config, small, trainer: DLRMTrainer, pruned: DLRMTrainer, done, pdone,
              overrides, out: str) -> Dict[str, Any]:
    """The quantize stage on every rank (:mod:`shark_torchrec.quantize_stage`): no table is
    gathered.  Returns the stage's ``done.json`` content; rank 0 writes the report."""
    from shark_torchrec.quantize_stage import lookup_batches, quantize_stage
    from shark_torchrec.sharded.export import export_sharded
    from shark_torchrec.training.sharding import plan_summary

    counters = RowPriority(config.tables(), channels=_row_counters(args))
    counters.load(os.path.join(out, "train", "row_counts"))
    mix, scale = _priority_mix(args, done.get("gradient_scales"), small.tables())
    kept = {t.name for t in small.tables()}
    plan = PruningPlan.load(os.path.join(out, "prune", "plan.json"))

    def export(model, metrics) -> None:
        export_sharded(model, os.path.join(out, "model"), pruning_plan=plan,
                       metadata={f"{args.eval_split}_auc": metrics["auc"]}, plan=plan_summary(pruned.plan))

    with _timed("row-wise mixed precision, evaluation and export (sharded)"):
        result = quantize_stage(
            pruned, trainer, _quant_config(args, overrides, kept, env.device), counters, mix, scale,
            lambda: _eval_batches(args, spec, env),
            lookup_batches(spec, args.test_batch_size or args.batch_size, args.limit_test_batches, env),
            env, out, args.attribute_quant_loss, args.bootstrap, args.seed, export)
    metrics = result.metrics
    fp32_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in config.tables())
    metrics["fp32_embedding_bytes"] = fp32_bytes
    metrics["bytes_saved_fraction"] = 1 - metrics["embedding_bytes"] / fp32_bytes
    qdone = {"metrics": metrics, "lookup_speed_vs_fp32": result.speed, "paired": result.paired,
             "rows_per_tier": result.rows_per_tier, "centroids": result.centroids}
    if result.attribution is not None:
        qdone["quant_loss_attribution"] = result.attribution
    if env.is_main:
        _write_report(out, done, pdone, result, config, args)
    return qdone


def _write_report(out, done, pdone, result, config, args) -> None:
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
                             "row_priority": args.row_priority, "eval_split": args.eval_split,
                             "quant_loss_attribution": result.attribution,
                             "row_alignment": row_alignment(args, _device_of(args)),
                             "rows_per_tier": result.rows_per_tier, "centroids": result.centroids},
                       figures)


def _device_of(args) -> torch.device:
    return torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                        else "cpu")
