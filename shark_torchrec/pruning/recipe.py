"""The field-pruning job behind ``recipes/prune_dlrm.py``.

From a finished ``recipes/train_dlrm.py`` run (its checkpoint, and its ``field_scores.json``
when it ran with ``--score_fields``): choose or load a pruning plan, prune the sharded DLRM,
fine-tune it, evaluate before and after, and write ``plan.json``, ``metrics.json`` and the
pruned model's checkpoints.  With ``--rounds R`` it prunes iteratively instead (scores are
re-collected while training before every round).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from shark_torchrec.cli_args import existing_dir, existing_file, fraction, nonnegative_int, positive_int
from shark_torchrec.importance import BASELINES
from shark_torchrec.planning import load_overrides
from shark_torchrec.pruning.plan import PruningPlan, choose_plan, table_bytes
from shark_torchrec.pruning.sharded import PruningRound, iterative_prune, prune_trainer
from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.distributed import DistEnv, run_job
from shark_torchrec.training.datasets import require_rows
from shark_torchrec.training.train_dlrm import (
    FIELD_SCORES_FILE,
    build_parser as build_train_parser,
    data_spec_from_args,
    fingerprint,
    model_config_from_args,
    optim_config_from_args,
    planning_options,
    test_batches,
)
from shark_torchrec.training.sharding import plan_summary
from shark_torchrec.training.trainer import DLRMTrainer

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = build_train_parser()
    p.description = (
        "Prune feature fields of a DLRM trained by recipes/train_dlrm.py (same data and model "
        "flags), fine-tune the smaller model sharded, and evaluate it."
    )
    g = p.add_argument_group("pruning")
    g.add_argument("--from_run", required=True, type=existing_dir,
                   help="output directory of the train_dlrm.py run to prune")
    g.add_argument("--scores", type=existing_file, help=f"field scores JSON (default: FROM_RUN/{FIELD_SCORES_FILE})")
    g.add_argument("--plan", type=existing_file, help="apply this saved pruning plan instead of choosing one")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--keep_fields", type=positive_int, help="keep this many fields")
    c.add_argument("--drop_fraction", type=fraction, help="drop this fraction of the fields, in [0, 1)")
    c.add_argument("--byte_target", type=nonnegative_int, help="embedding-table bytes to reach")
    c.add_argument("--drop_score_share", type=fraction,
                   help="drop the fields with the least score per byte saved while their scores add up "
                   "to at most this share of the total, in [0, 1)")
    g.add_argument("--protect", default="", help="comma-separated fields never dropped")
    g.add_argument("--finetune_epochs", type=nonnegative_int, default=1)
    g.add_argument("--rounds", type=nonnegative_int, default=0,
                   help="iterative pruning: rounds of (score → drop → fine-tune); "
                   "needs --keep_fields")
    g.add_argument("--score_batches", type=positive_int, default=20, help="scoring steps per round")
    g.add_argument("--finetune_steps", type=positive_int, default=20, help="fine-tuning steps per round")
    g.add_argument("--prune_baseline", choices=BASELINES, default="mean",
                   help="SHARK baseline used by the iterative rounds")
    g.add_argument("--prune_mode", choices=["mean", "remove"], default="mean",
                   help="what a pruned field becomes: mean (default): a constant, its mean pooled embedding "
                   "over --mean_batches training batches, that the interaction keeps reading; remove: the "
                   "interaction shrinks without it")
    g.add_argument("--mean_batches", type=positive_int, default=100,
                   help="training batches (per rank) the pruned fields' means are taken over")
    return p


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    return run_job(build_parser().parse_args(argv), _run)


def _load_plan_or_scores(args: argparse.Namespace, trainer: DLRMTrainer) -> PruningPlan:
    tables = trainer.model_config.tables()
    protected = _protected(args, tables)
    if args.plan:
        plan = PruningPlan.load(args.plan)
        plan.validate(tables, source=f"model of {args.from_run}")
        return plan
    path = args.scores or os.path.join(args.from_run, FIELD_SCORES_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no field scores (train with --score_fields, or pass --scores/--plan)")
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("scores"), dict):
        raise SystemExit(f"{path}: not a field-scores file (no 'scores' object)")
    if (args.keep_fields, args.drop_fraction, args.byte_target, args.drop_score_share) == (None,) * 4:
        raise SystemExit("choose a criterion: --keep_fields, --drop_fraction, --byte_target or --drop_score_share")
    try:
        return choose_plan(doc["scores"], tables, keep=args.keep_fields,
                           drop_fraction=args.drop_fraction, byte_target=args.byte_target,
                           score_share=args.drop_score_share,
                           protected=protected, method=doc.get("method", ""))
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from e


def _protected(args: argparse.Namespace, tables) -> List[str]:
    """--protect, plus the features of tables marked never_prune in --planner_overrides."""
    protected = [p for p in args.protect.split(",") if p]
    if args.planner_overrides:
        protected += load_overrides(args.planner_overrides, tables).protected_features(tables)
    return list(dict.fromkeys(protected))


def _iterative(args: argparse.Namespace, env: DistEnv, spec, trainer: DLRMTrainer, rounds: List[Dict]):
    """``--rounds``: iterative pruning over the training data; returns the pruned trainer and
    the plan it amounts to, each round's summary appended to ``rounds``."""
    if args.keep_fields is None:
        raise SystemExit("--rounds needs --keep_fields (the number of fields at the end)")
    config = trainer.model_config
    train = spec.dataset("train", args.batch_size, env.rank, env.world_size)

    def endless():
        while True:  # rounds may need more steps than one pass over the data
            yield from spec.batches(train, args.num_workers)

    def on_round(r: PruningRound, t: DLRMTrainer) -> None:
        rounds.append({"round": r.round, "kept": r.plan.kept_features, "dropped": r.plan.dropped_features,
                       "scores": r.scores, "scoring_seconds": r.scoring_seconds})

    pruned = iterative_prune(
        trainer, endless(), rounds=args.rounds, score_batches=args.score_batches,
        finetune_steps=args.finetune_steps, keep_fields=args.keep_fields,
        work_dir=os.path.join(args.out, "rounds"), batch_size=args.batch_size,
        baseline=args.prune_baseline, protected=_protected(args, config.tables()),
        seed=args.seed, on_round=on_round, mean_batches=args.mean_batches if args.prune_mode == "mean" else None)
    plan = PruningPlan(tables={t.name: list(t.feature_names) for t in config.tables()},
                       table_bytes={t.name: table_bytes(t) for t in config.tables()},
                       dropped_features=[f for f in config.feature_names if f not in pruned.features],
                       method=f"iterative shark-{args.prune_baseline}",
                       criterion={"keep": args.keep_fields, "rounds": args.rounds})
    return pruned, plan


#: flags of train_dlrm's parser that this recipe does not use: refused when set
UNUSED_FLAGS = {"max_steps": None, "score_fields": None, "checkpoint_every": 0, "resume": False}


def _run(args: argparse.Namespace, env: DistEnv) -> Dict:
    for flag, default in UNUSED_FLAGS.items():
        if getattr(args, flag) != default:
            raise SystemExit(f"--{flag} is not used by recipes/prune_dlrm.py; recipes/train_dlrm.py takes it")
    spec = data_spec_from_args(args)
    require_rows(spec, args, env.world_size, train=args.finetune_epochs > 0 or args.rounds > 0)
    config = model_config_from_args(args, spec)
    if args.sharding_type and args.planner_overrides:
        raise SystemExit("--sharding_type and --planner_overrides both set sharding: use one")
    trainer = DLRMTrainer(config, optim_config_from_args(args), env, args.batch_size, seed=args.seed,
                          **planning_options(config, args.batch_size, env.world_size,
                                             sharding_type=args.sharding_type,
                                             planner_overrides=args.planner_overrides,
                                             field_importance=args.prune_baseline if args.rounds else None))
    source = CheckpointManager(os.path.join(args.from_run, "checkpoints"), fingerprint(args, config))
    source_path = source.latest()
    if source_path is None:
        raise SystemExit(f"{args.from_run}/checkpoints: no checkpoint to prune")
    state = trainer.state_dict()
    source.load(state, source_path)
    trainer.load_state_dict(state)
    before = trainer.evaluate(test_batches(args, spec, env), desc="test (before)")
    logger.info("before pruning: %s", before)

    rounds: List[Dict] = []
    by_mean = args.prune_mode == "mean"
    if args.rounds:
        trainer, plan = _iterative(args, env, spec, trainer, rounds)
    else:
        plan = _load_plan_or_scores(args, trainer)
        logger.info("plan: %s", plan.summary())
        means = None
        if by_mean:  # the dropped fields' means over the first --mean_batches training batches
            ds = spec.dataset("train", args.batch_size, env.rank, env.world_size, max_batches=args.limit_train_batches)
            means = trainer.field_means(spec.batches(ds, args.num_workers), plan.dropped_features,
                                        args.mean_batches)
        trainer = prune_trainer(trainer, plan, source_path, args.batch_size, seed=args.seed, means=means)
        for epoch in range(args.finetune_epochs):
            ds = spec.dataset("train", args.batch_size, env.rank, env.world_size,
                              max_batches=args.limit_train_batches)
            trainer.train(spec.batches(ds, args.num_workers), desc=f"fine-tune {epoch}")
    after = trainer.evaluate(test_batches(args, spec, env), desc="test (after)")
    logger.info("after pruning: %s", after)

    new_config = trainer.model_config
    ckpt = CheckpointManager(os.path.join(args.out, "checkpoints"), fingerprint(args, new_config))
    ckpt.save(trainer.state_dict(), {"global_step": 0, "pruned_from": source_path})
    result = {"before": before, "after": after, "plan": plan.summary(), "rounds": rounds,
              "sharding_plan": plan_summary(trainer.plan),
              "world_size": env.world_size, "rank": env.rank, "args": vars(args)}
    if env.is_main:
        os.makedirs(args.out, exist_ok=True)
        plan.save(os.path.join(args.out, "plan.json"))
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        logger.info("wrote %s and plan.json", os.path.join(args.out, "metrics.json"))
    return result


