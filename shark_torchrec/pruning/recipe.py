"""The field-pruning job behind ``recipes/prune_dlrm.py``.

From a finished ``recipes/train_dlrm.py`` run (its checkpoint, and its ``field_scores.json``
when it ran with ``--score_fields``): choose or load a pruning plan, prune the sharded DLRM,
fine-tune it, evaluate before and after, and write ``plan.json``, ``metrics.json`` and the
pruned model's checkpoints.  With ``--rounds R`` it prunes iteratively instead (scores are
re-collected while training before every round).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

from shark_torchrec.planning import load_overrides
from shark_torchrec.pruning.plan import PlanError, PruningPlan, choose_plan, table_bytes
from shark_torchrec.pruning.sharded import PruningRound, iterative_prune, prune_trainer
from shark_torchrec.run_config import PruneRun, flat
from shark_torchrec.stages import StageRunner, data_files, file_digests, source_run
from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.distributed import DistEnv, run_job
from shark_torchrec.training.datasets import require_rows
from shark_torchrec.training.train_dlrm import (
    FIELD_SCORES_FILE,
    METRICS_FILE,
    build_trainer,
    data_spec_from,
    fingerprint,
    model_config_from,
    read_metrics,
    test_batches,
)
from shark_torchrec.training.sharding import plan_summary
from shark_torchrec.training.trainer import DLRMTrainer

logger = logging.getLogger(__name__)


def run(config: PruneRun) -> Dict:
    """Run the job; returns the metrics (also written to ``OUT/metrics.json`` by rank 0)."""
    return run_job(config, _run)


def _load_plan_or_scores(run: PruneRun, trainer: DLRMTrainer) -> PruningPlan:
    prune = run.prune
    tables = trainer.model_config.tables()
    protected = _protected(run, tables)
    if prune.plan:
        plan = PruningPlan.load(prune.plan)
        plan.validate(tables, source=f"model of {prune.from_run}")
        dropped = sorted(set(protected) & set(plan.dropped_features))
        if dropped:
            raise PlanError(f"{prune.plan}: drops protected fields {dropped} (--protect / never_prune)")
        return plan
    path = prune.scores or os.path.join(prune.from_run, FIELD_SCORES_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no field scores (train with --score_fields, or pass --scores/--plan)")
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("scores"), dict):
        raise SystemExit(f"{path}: not a field-scores file (no 'scores' object)")
    trained = source_run(prune.from_run)["train_key"]
    if not prune.scores and trained is not None and doc.get("train_key") != trained:
        raise SystemExit(f"{path}: scores the fields of another model than {prune.from_run}'s (trained since, "
                         "or with other settings): train with --score_fields again, or pass --scores/--plan")
    if (prune.keep_fields, prune.drop_fraction, prune.byte_target, prune.drop_score_share) == (None,) * 4:
        raise SystemExit("choose a criterion: --keep_fields, --drop_fraction, --byte_target or --drop_score_share")
    try:
        return choose_plan(doc["scores"], tables, keep=prune.keep_fields,
                           drop_fraction=prune.drop_fraction, byte_target=prune.byte_target,
                           score_share=prune.drop_score_share,
                           protected=protected, method=doc.get("method", ""))
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from e


def _protected(run: PruneRun, tables) -> List[str]:
    """--protect, plus the features of tables marked never_prune in --planner_overrides."""
    protected = run.prune.protected
    if run.sharding.planner_overrides:
        protected += load_overrides(run.sharding.planner_overrides, tables).protected_features(tables)
    return list(dict.fromkeys(protected))


def _iterative(run: PruneRun, env: DistEnv, spec, trainer: DLRMTrainer, rounds: List[Dict]):
    """``--rounds``: iterative pruning over the training data; returns the pruned trainer and
    the plan it amounts to, each round's summary appended to ``rounds``."""
    prune, batch_size = run.prune, run.training.batch_size
    config = trainer.model_config
    train = spec.dataset("train", batch_size, env.rank, env.world_size)

    def endless():
        while True:  # rounds may need more steps than one pass over the data
            yield from spec.batches(train, run.data.num_workers)

    def on_round(r: PruningRound, t: DLRMTrainer) -> None:
        rounds.append({"round": r.round, "kept": r.plan.kept_features, "dropped": r.plan.dropped_features,
                       "scores": r.scores, "scoring_seconds": r.scoring_seconds})

    pruned = iterative_prune(
        trainer, endless(), rounds=prune.rounds, score_batches=prune.score_batches,
        finetune_steps=prune.finetune_steps, keep_fields=prune.keep_fields,
        work_dir=os.path.join(run.output.out, "rounds"), batch_size=batch_size,
        baseline=prune.prune_baseline, protected=_protected(run, config.tables()),
        seed=run.training.seed, on_round=on_round, mean_batches=prune.mean_batches if prune.prune_mode == "mean" else None)
    plan = PruningPlan(tables={t.name: list(t.feature_names) for t in config.tables()},
                       table_bytes={t.name: table_bytes(t) for t in config.tables()},
                       dropped_features=[f for f in config.feature_names if f not in pruned.features],
                       method=f"iterative shark-{prune.prune_baseline}",
                       criterion={"keep": prune.keep_fields, "rounds": prune.rounds})
    return pruned, plan


def _run(run: PruneRun, env: DistEnv) -> Dict:
    data, training, prune, out = run.data, run.training, run.prune, run.output.out
    # One stage, through the runner every job shares: a run finished with these settings is not
    # pruned again (OUT/prune/done.json), one finished with others is (logged).
    # (the model pruned counts by the source run's newest checkpoint and training key, the files
    # named by flags by their contents: a source trained again, or an edited plan, prunes again)
    spec = data_spec_from(data, training.seed)
    inputs = {k: v for k, v in flat(run).items() if k not in ("out", "log_level", "debug")}
    sources = {"from_run_source": source_run(prune.from_run),
               **file_digests(schema=data.schema, planner_overrides=run.sharding.planner_overrides,
                              plan=prune.plan, scores=prune.scores),
               **data_files(spec)}
    stages = StageRunner(out, {"prune": {**inputs, **sources, "resolved_device": env.device.type,
                                         "world_size": env.world_size}}, env.is_main)
    if stages.finished("prune") is not None:
        logger.info("%s: finished with these settings (%s); delete it to prune again", out,
                    stages.store.record_path("prune"))
        return {**read_metrics(out, "prune"), "rank": env.rank}
    require_rows(spec, training.batch_size, env.world_size, data.limit_train_batches, data.limit_test_batches,
                 train=prune.finetune_epochs > 0 or prune.rounds > 0)
    config = model_config_from(run.model, spec)
    trainer = build_trainer(config, training, run.sharding, env,
                            field_importance=prune.prune_baseline if prune.rounds else None)
    source = CheckpointManager(os.path.join(prune.from_run, "checkpoints"), fingerprint(data.data, config))
    source_path = source.latest()
    if source_path is None:
        raise SystemExit(f"{prune.from_run}/checkpoints: no checkpoint to prune")
    state = trainer.state_dict()
    source.load(state, source_path)
    trainer.load_state_dict(state)
    before = trainer.evaluate(test_batches(data, training, spec, env), desc="test (before)")
    logger.info("before pruning: %s", before)

    rounds: List[Dict] = []
    if prune.rounds:
        trainer, plan = _iterative(run, env, spec, trainer, rounds)
    else:
        plan = _load_plan_or_scores(run, trainer)
        logger.info("plan: %s", plan.summary())
        means = None
        if prune.prune_mode == "mean":  # the dropped fields' means over the first --mean_batches training batches
            ds = spec.dataset("train", training.batch_size, env.rank, env.world_size,
                              max_batches=data.limit_train_batches)
            means = trainer.field_means(spec.batches(ds, data.num_workers), plan.dropped_features,
                                        prune.mean_batches)
        trainer = prune_trainer(trainer, plan, source_path, training.batch_size, seed=training.seed, means=means)
        for epoch in range(prune.finetune_epochs):
            ds = spec.dataset("train", training.batch_size, env.rank, env.world_size,
                              max_batches=data.limit_train_batches)
            trainer.train(spec.batches(ds, data.num_workers), desc=f"fine-tune {epoch}")
    after = trainer.evaluate(test_batches(data, training, spec, env), desc="test (after)")
    logger.info("after pruning: %s", after)

    new_config = trainer.model_config
    ckpt = CheckpointManager(os.path.join(out, "checkpoints"), fingerprint(data.data, new_config))
    ckpt.save(trainer.state_dict(), {"global_step": 0, "pruned_from": source_path})
    result = {"before": before, "after": after, "plan": plan.summary(), "rounds": rounds,
              "sharding_plan": plan_summary(trainer.plan),
              "world_size": env.world_size, "rank": env.rank, "prune": flat(run)}
    if env.is_main:
        os.makedirs(out, exist_ok=True)
        plan.save(os.path.join(out, "plan.json"))
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        logger.info("wrote %s and plan.json", os.path.join(out, "metrics.json"))
    stages.save("prune", {"metrics": METRICS_FILE, "plan": "plan.json"})
    return result
