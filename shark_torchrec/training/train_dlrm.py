"""The DLRM training job: command-line options → sharded training → ``metrics.json``.

``recipes/train_dlrm.py`` is the launcher (its flags: :func:`shark_torchrec.cli_run.train_parser`,
after TorchRec's DLRM example ``torchrec/examples/dlrm``); this module holds the job, which
takes a :class:`~shark_torchrec.run_config.TrainRun`, and the pieces other jobs reuse
(:func:`data_spec_from`, :func:`model_config_from`, :func:`build_trainer`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from shark_torchrec.data import SyntheticConfig, criteo_config
from shark_torchrec.data.movielens import SCHEMA_FILE as MOVIELENS_SCHEMA_FILE, ensure_ml100k
from shark_torchrec.data.schema_file import SchemaFile, load_schema_file
from shark_torchrec.data.splits import LineSplit
from shark_torchrec.errors import FlagError
from torchrec.distributed.planner import ParameterConstraints

from shark_torchrec.importance import TaylorFieldImportance
from shark_torchrec.planning import (
    AllShardingTypesEBCSharder,
    TrackerStorageReservation,
    load_overrides,
    tracker_bytes_per_rank,
)
from shark_torchrec.run_config import DataSection, ModelSection, ShardingSection, TrainingSection, TrainRun, flat
from shark_torchrec.stages import StageRecordError, StageRunner, StageStore, data_files, file_digests
from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.datasets import (
    DataSpec,
    SCHEMAS,
    expand_files,
    find_split_files,
    require_rows,
)
from shark_torchrec.training.distributed import DistEnv, run_job
from shark_torchrec.training.loop import TrainingLoop, new_progress
from shark_torchrec.training.model import DLRMConfig
from shark_torchrec.training.sharding import plan_summary
from shark_torchrec.training.trainer import DLRMTrainer, OptimConfig

#: rows per table of click-log data when neither --num_embeddings nor a schema says
DEFAULT_NUM_EMBEDDINGS = 100_000
logger = logging.getLogger(__name__)


def data_spec_from(data: DataSection, seed: int = 0) -> DataSpec:
    """The data of the ``data`` flags: files, schema, rows per feature and splits (``seed``
    seeds the synthetic generators).

    ``--data ml100k`` converts MovieLens-100K first if ``--data_path`` (or the cache) holds no
    conversion yet.  ``--hash_rows_fraction`` shrinks every table and hashes ids into it.
    Raises :class:`~shark_torchrec.errors.FlagError` for flags that do not go together,
    :class:`~shark_torchrec.data.SchemaFileError` for a bad ``--schema``.
    """
    spec = _data_spec(data, seed)
    return spec.hashed(data.hash_rows_fraction) if data.hash_rows_fraction is not None else spec


_SYNTHETIC_FLAGS = tuple(f.name for f in dataclasses.fields(DataSection) if f.name.startswith("synthetic_"))


def _refuse_synthetic_flags(data: DataSection, flags: Sequence[str]) -> None:
    """Refuse the generator's ``flags`` set to other than their defaults where ``--data`` does
    not read them (``--synthetic_num_fields 8`` with ``--data synthetic_criteo`` built its 26)."""
    defaults = {f.name: f.default for f in dataclasses.fields(DataSection)}
    given = [f"--{flag}" for flag in flags if getattr(data, flag) != defaults[flag]]
    if given:
        raise FlagError(f"{', '.join(given)}: not read by --data {data.data}")


def _synthetic_spec(data: DataSection, seed: int, id_dtype: torch.dtype) -> DataSpec:
    """``--data synthetic`` / ``synthetic_criteo``: generated splits, tables sized by the generator."""
    # (each of these read only for files: given with generated data, it was silently ignored and
    # the run trained and reported on generated data)
    unused = [f"--{flag}" for flag in ("data_path", "train_files", "test_files", "valid_files", "schema",
                                        "test_fraction", "valid_fraction", "split_seed", "skip_malformed")
              if getattr(data, flag)]
    if unused:
        raise FlagError(f"{', '.join(unused)}: for click-log files; --data {data.data} generates its data "
                        "(--data csv/criteo/avazu/ml100k reads files)")
    _refuse_synthetic_flags(data, ("synthetic_num_fields", "synthetic_informative", "synthetic_cardinality")
                            if data.data == "synthetic_criteo" else ("synthetic_max_rows",))
    sized = [flag for flag, value in (("--num_embeddings", data.num_embeddings),
                                      ("--num_embeddings_per_feature", data.num_embeddings_per_feature))
             if value]
    if sized:
        raise FlagError(f"{', '.join(sized)}: for click-log files; --data {data.data} sizes its tables "
                        "by its generator (--synthetic_cardinality for --data synthetic)")
    train_rows, test_rows = data.synthetic_train_rows, data.synthetic_test_rows
    if data.data == "synthetic_criteo":
        # The Criteo-shaped benchmark with a known ground truth (data/synthetic.py).
        cfg = criteo_config(seed=seed, max_rows=data.synthetic_max_rows)
        train_rows, test_rows = train_rows or 1_000_000, test_rows or 200_000
    else:
        if data.synthetic_informative > data.synthetic_num_fields:
            raise FlagError(f"--synthetic_informative {data.synthetic_informative} is more than "
                            f"--synthetic_num_fields {data.synthetic_num_fields}")
        cfg = SyntheticConfig.default(
            num_fields=data.synthetic_num_fields,
            num_informative=data.synthetic_informative,
            cardinality=data.synthetic_cardinality,
            seed=seed,
        )
    return DataSpec(
        kind="synthetic", feature_names=cfg.feature_names,
        num_embeddings_per_feature=cfg.num_embeddings_per_feature,
        num_dense=cfg.num_dense, train_files=[], test_files=[], synthetic=cfg,
        synthetic_train_batches=data.synthetic_train_batches,
        synthetic_test_batches=data.synthetic_test_batches,
        synthetic_train_rows=train_rows or 0, synthetic_test_rows=test_rows or 0,
        id_dtype=id_dtype,
    )


def _data_spec(data: DataSection, seed: int) -> DataSpec:
    id_dtype = torch.int32 if data.int32_ids else torch.int64
    if data.data in ("synthetic", "synthetic_criteo"):
        return _synthetic_spec(data, seed, id_dtype)
    _refuse_synthetic_flags(data, _SYNTHETIC_FLAGS)
    data_path = data.data_path
    schema_file: Optional[SchemaFile] = None
    if data.data == "csv":
        if not data.schema:
            raise FlagError("--data csv needs --schema FILE (the layout of your files, see "
                            "shark_torchrec/data/schema_file.py)")
        schema_file = load_schema_file(data.schema)
    elif data.schema:
        raise FlagError(f"--schema is for --data csv; --data {data.data} has its own layout")
    if data.data == "ml100k":
        data_path = ensure_ml100k(data_path)  # converts on first use (one rank; the others wait)
        schema_file = load_schema_file(os.path.join(data_path, MOVIELENS_SCHEMA_FILE))
    schema = schema_file.schema if schema_file else SCHEMAS[data.data]
    line_split = None
    if data.valid_fraction or data.test_fraction:
        if data.valid_fraction + data.test_fraction >= 1:
            raise FlagError(f"--valid_fraction {data.valid_fraction:g} + --test_fraction "
                            f"{data.test_fraction:g} leave no training lines")
        for flag, value, files in (("test", data.test_fraction, data.test_files),
                                   ("valid", data.valid_fraction, data.valid_files)):
            if value and files:
                raise FlagError(f"--{flag}_fraction and --{flag}_files both give the {flag} split: use one")
        line_split = LineSplit(data.valid_fraction, data.test_fraction, data.split_seed)
    train = _split_files(data, "train", data_path)
    # Parts of the train files under --test_fraction/--valid_fraction (DataSpec.line_split).
    test = list(train) if data.test_fraction else _split_files(data, "test", data_path)
    dev: List[str] = list(train) if data.valid_fraction else []
    if data.valid_files:
        dev = expand_files(data.valid_files, "--valid_files")
    elif data_path and not data.valid_fraction:
        try:
            dev = find_split_files(data_path, "dev")
        except FileNotFoundError:
            pass  # a dev split is optional
    if line_split is None:
        _check_disjoint(train, {"test": test, "dev": dev}, given=bool(data.train_files))
    features = schema.sparse_feature_names
    if data.num_embeddings_per_feature:
        sizes = list(data.num_embeddings_per_feature)
    elif schema_file is not None:
        sizes = schema_file.sizes(data.num_embeddings or DEFAULT_NUM_EMBEDDINGS)
    else:
        sizes = [data.num_embeddings or DEFAULT_NUM_EMBEDDINGS] * len(features)
    if len(sizes) != len(features):
        raise FlagError(
            f"--num_embeddings_per_feature has {len(sizes)} values; --data {data.data} has "
            f"{len(features)} sparse features ({', '.join(features)})"
        )
    for name, column, n in zip(features, schema.sparse_columns, sizes):
        vocab = schema.vocabularies.get(column)
        if vocab is not None and n < len(vocab) + 1:
            raise FlagError(f"--num_embeddings_per_feature: feature {name!r} has a vocabulary of "
                            f"{len(vocab)} values and needs at least {len(vocab) + 1} rows, got {n}")
    return DataSpec(
        kind=data.data, feature_names=features, num_embeddings_per_feature=list(sizes),
        num_dense=len(schema.dense), train_files=train, test_files=test, dev_files=dev,
        skip_malformed=data.skip_malformed, id_dtype=id_dtype,
        click_schema=schema_file.schema if schema_file else None, line_split=line_split,
    )


def _check_disjoint(train: List[str], held_out: Dict[str, List[str]], given: bool) -> None:
    """Refuse a file that is a train file found in ``--data_path`` and a test or dev file too
    (e.g. the Criteo 1TB days, whose ``day_*`` are all train files, with ``--test_files
    DIR/day_23``): its rows would be trained on and then scored as held out.  Where the train
    files are ``given`` by name (``--train_files``), the overlap was asked for: a warning."""
    seen = {os.path.realpath(p) for p in train}
    for split, files in held_out.items():
        both = [p for p in files if os.path.realpath(p) in seen]
        if both and given:
            logger.warning("%s is a %s file and one of --train_files too: its scores are not held out",
                           both[0], split)
        elif both:
            flag = "--test_files" if split == "test" else "--valid_files"
            raise FlagError(f"{both[0]} is a {split} file and a train file too (its rows would be trained on "
                            f"and scored as held out): name the train files with --train_files, or move "
                            f"the {split} file out of the train files' directory ({flag})")


def _split_files(data: DataSection, split: str, data_path: Optional[str] = None) -> List[str]:
    """``--<split>_files`` if given, else the split's files in ``data_path`` (default
    ``--data_path``)."""
    explicit = getattr(data, f"{split}_files")
    if explicit:
        return expand_files(explicit, f"--{split}_files")
    data_path = data_path or data.data_path
    if data_path:
        return find_split_files(data_path, split)
    hint = " (or --test_fraction, for data that comes as one file)" if split == "test" else ""
    raise FlagError(f"--data {data.data} needs --data_path or --{split}_files{hint}")


def model_config_from(model: ModelSection, spec: DataSpec) -> DLRMConfig:
    """The DLRM of the ``model`` flags on ``spec``'s features."""
    try:
        return DLRMConfig(
            feature_names=spec.feature_names,
            num_embeddings_per_feature=spec.model_rows,
            embedding_dim=model.embedding_dim,
            dense_in_features=spec.dense_in_features,
            dense_arch_layer_sizes=tuple(model.dense_arch_layer_sizes),
            over_arch_layer_sizes=tuple(model.over_arch_layer_sizes),
            interaction="dcn" if model.interaction_type == "dcn" else "dot",
            dcn_num_layers=model.dcn_num_layers,
            dcn_low_rank_dim=model.dcn_low_rank_dim,
        )
    except ValueError as e:  # DLRMConfig's messages name its fields, which are the flags' names
        raise FlagError(f"model flags do not fit together: {e}") from e


def fingerprint(data: str, model_config: DLRMConfig) -> Dict:
    """What identifies the model of a checkpoint (a checkpoint of another model is refused);
    ``data`` is the ``--data`` kind."""
    return {
        "data": data,
        "feature_names": list(model_config.feature_names),
        "num_embeddings_per_feature": list(model_config.num_embeddings_per_feature),
        "embedding_dim": model_config.embedding_dim,
        "dense_arch_layer_sizes": list(model_config.dense_arch_layer_sizes),
        "over_arch_layer_sizes": list(model_config.over_arch_layer_sizes),
        "interaction": model_config.interaction,
        "dcn": [model_config.dcn_num_layers, model_config.dcn_low_rank_dim]
        if model_config.interaction == "dcn" else None,
        **({"interaction_features": list(model_config.interaction_features)}
           if model_config.interaction_features else {}),
    }


def optim_config_from(training: TrainingSection) -> OptimConfig:
    """The optimizers of the ``training`` flags."""
    return OptimConfig(
        embedding_optimizer=training.embedding_optimizer, dense_optimizer=training.dense_optimizer,
        learning_rate=training.learning_rate, embedding_learning_rate=training.embedding_learning_rate,
    )


FIELD_SCORES_FILE = "field_scores.json"


def field_scores_document(tracker: TaylorFieldImportance, config: DLRMConfig) -> Dict:
    """The JSON document of a tracker's scores (a collective under torch.distributed)."""
    scores = tracker.scores()
    return {
        "method": tracker.name,
        "baseline": tracker.baseline,
        "scores": scores,
        "table_scores": tracker.table_scores(config.tables()),
        "samples": tracker.samples_seen(),
        "skipped_non_finite": tracker.skipped,
        "ranking": tracker.ranking(),
    }


def planning_options(model_config: DLRMConfig, batch_size: int, world_size: int,
                     sharding_type: Optional[str] = None, planner_overrides: Optional[str] = None,
                     row_priority_channels: int = 0, field_importance: Optional[str] = None) -> Dict:
    """The planner options every recipe builds its :class:`DLRMTrainer` with: per-table
    constraints (``sharding_type`` for every table, or a planner-overrides file), the sharder
    that offers every sharding type on CPU too, and a storage reservation for what the
    trackers attached while training hold per rank (``row_priority_channels`` channels of
    ``RowPriority``, a ``TaylorFieldImportance`` with baseline ``field_importance``)."""
    tables = model_config.tables()
    constraints = None
    if sharding_type:
        constraints = {t.name: ParameterConstraints(sharding_types=[sharding_type]) for t in tables}
    if planner_overrides:
        constraints = load_overrides(planner_overrides, tables).constraints
    reservation = TrackerStorageReservation(tracker_bytes_per_rank(
        tables, batch_size, world_size, row_priority=row_priority_channels, field_importance=field_importance))
    return {"constraints": constraints, "sharders": [AllShardingTypesEBCSharder()],
            "storage_reservation": reservation}


def build_trainer(model_config: DLRMConfig, training: TrainingSection, sharding: ShardingSection, env: DistEnv,
                  row_priority_channels: int = 0, field_importance: Optional[str] = None) -> DLRMTrainer:
    """The sharded trainer every job trains with: ``training``'s optimizers, batch size and
    seed, planned by :func:`planning_options` (``sharding``'s constraints, a storage
    reservation for the trackers the job attaches: ``row_priority_channels`` channels of
    ``RowPriority``, a ``TaylorFieldImportance`` with baseline ``field_importance``)."""
    return DLRMTrainer(model_config, optim_config_from(training), env, training.batch_size, seed=training.seed,
                       **planning_options(model_config, training.batch_size, env.world_size,
                                          sharding_type=sharding.sharding_type,
                                          planner_overrides=sharding.planner_overrides,
                                          row_priority_channels=row_priority_channels,
                                          field_importance=field_importance))


def run(config: TrainRun) -> Dict:
    """Run the job; returns the metrics (also written to ``OUT/metrics.json`` by rank 0)."""
    return run_job(config, _run)


#: settings that say how a training run is driven and where it writes, not what it computes
NOT_TRAINING_INPUTS = frozenset({"out", "log_level", "debug", "resume", "max_steps", "checkpoint_every"})
METRICS_FILE = "metrics.json"


def training_inputs(run: TrainRun, env: DistEnv, spec: DataSpec) -> Dict[str, Any]:
    """What a ``train_dlrm.py`` run computes from, keying its stage record: every setting but
    :data:`NOT_TRAINING_INPUTS`, with the device it resolved and the world size
    (``--batch_size`` is per rank); the files ``--schema`` and ``--planner_overrides`` name count
    by their contents, the data's files by their sizes and modification times."""
    inputs = {k: v for k, v in flat(run).items() if k not in NOT_TRAINING_INPUTS}
    files = {**file_digests(schema=run.data.schema, planner_overrides=run.sharding.planner_overrides),
             **data_files(spec)}
    return {**inputs, **files, "resolved_device": env.device.type, "world_size": env.world_size}


def _run(run: TrainRun, env: DistEnv) -> Dict:
    data, training, out = run.data, run.training, run.output.out
    # One stage, run through the runner every job shares: a run finished with these settings
    # is not trained again (OUT/train/done.json), one finished with others is (logged).
    spec = data_spec_from(data, training.seed)
    stages = StageRunner(out, {"train": training_inputs(run, env, spec)}, env.is_main)
    if stages.finished("train") is not None:
        logger.info("%s: finished with these settings (%s); delete it to train again", out,
                    stages.store.record_path("train"))
        return {**read_metrics(out, "train"), "rank": env.rank}
    require_rows(spec, training.batch_size, env.world_size, data.limit_train_batches, data.limit_test_batches)
    scores_path = os.path.join(out, FIELD_SCORES_FILE)
    if env.is_main and os.path.isfile(scores_path):
        # (an earlier run's scores: prune_dlrm.py --from_run pruned the model trained now by them)
        os.remove(scores_path)
        logger.info("removed %s: it scored the fields of the model trained before", scores_path)
    model_config = model_config_from(run.model, spec)
    trainer = build_trainer(model_config, training, run.sharding, env, field_importance=run.score_fields)
    tracker = None
    if run.score_fields:
        # Attached after DMP: hooks go on the sharded collection (see importance.taylor).
        tracker = TaylorFieldImportance(trainer.model, baseline=run.score_fields, seed=training.seed)

    def batches(epoch: int, start_batch: int):
        ds = spec.dataset("train", training.batch_size, env.rank, env.world_size, start_batch=start_batch,
                          max_batches=data.limit_train_batches)
        return spec.batches(ds, data.num_workers)

    # --resume continues only a checkpoint of the same settings (--epochs may grow)
    settings = {k: v for k, v in stages.inputs["train"].items() if k != "epochs"}
    ckpt = CheckpointManager(os.path.join(out, "checkpoints"), fingerprint(data.data, model_config))
    loop = TrainingLoop(trainer, ckpt, batches, run.epochs, training.batch_size * env.world_size,
                        checkpoint_every=run.checkpoint_every, importance=tracker,
                        evaluate=lambda: trainer.evaluate(test_batches(data, training, spec, env), desc="test"),
                        progress=new_progress(settings_key=StageStore.key(settings), settings=settings))
    if run.resume:
        _resume(loop, settings)
    logger.info("training on %d rank(s), %s, global batch %d", env.world_size, env.device,
                training.batch_size * env.world_size)
    stopped = not loop.run(run.max_steps)
    result = _metrics(run, env, loop, trainer, stopped)
    if tracker is not None:
        scores_doc = field_scores_document(tracker, model_config)  # collective
        scores_doc["train_key"] = stages.keys["train"]  # (the model they score: prune_dlrm.py checks)
        result["field_scores_file"] = scores_path
        if env.is_main:
            os.makedirs(out, exist_ok=True)
            with open(result["field_scores_file"], "w") as f:
                json.dump(scores_doc, f, indent=1)
    if env.is_main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, METRICS_FILE), "w") as f:
            json.dump(result, f, indent=1, default=str)
        logger.info("wrote %s", os.path.join(out, METRICS_FILE))
    if not stopped:
        stages.save("train", {"metrics": METRICS_FILE})
    return result


def _resume(loop: TrainingLoop, settings: Dict[str, Any]) -> None:
    """``--resume``: continue the newest checkpoint, refusing one written with other settings
    (naming them) rather than continuing it as if they were these."""
    path = loop.ckpt.latest()
    if path is not None and "settings_key" in (progress := CheckpointManager.progress_of(path)):
        if progress["settings_key"] != StageStore.key(settings):
            before, now = progress.get("settings", {}), json.loads(json.dumps(settings, default=str))
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            listed = ", ".join(f"--{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise SystemExit(f"--resume: {path} was written with other settings ({listed or 'unknown'}); "
                             f"resume with the flags it was trained with, or leave out --resume to train afresh")
    loop.resume()


def read_metrics(out: str, stage: str) -> Dict[str, Any]:
    """``OUT/metrics.json`` of a run whose ``stage`` finished (an error naming the file when it
    cannot be read)."""
    path = os.path.join(out, METRICS_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise StageRecordError(f"{path}: the finished run's metrics cannot be read ({e}); delete "
                               f"{os.path.join(out, stage)} to run it again") from None


def _metrics(run: TrainRun, env: DistEnv, loop: TrainingLoop, trainer: DLRMTrainer, stopped: bool) -> Dict:
    """The run's ``metrics.json``: the last evaluation (none when stopped by --max_steps),
    the progress, the settings and the sharding plan."""
    progress = loop.progress
    final = progress["history"][-1] if progress["history"] and not stopped else None
    return {
        "finished": not stopped,
        "test_auc": final["auc"] if final else None,
        "test_log_loss": final["log_loss"] if final else None,
        "test_examples": final["examples"] if final else None,
        "steps": progress["global_step"],
        "epochs_done": progress["epoch"],
        "train_examples": progress["train_examples"],
        "train_seconds": progress["train_seconds"],
        "examples_per_second": progress["train_examples"] / max(progress["train_seconds"], 1e-9),
        "history": progress["history"],
        "world_size": env.world_size,
        "rank": env.rank,
        "device": str(env.device),
        "args": flat(run),
        "sharding_plan": plan_summary(trainer.plan),
    }


def test_batches(data: DataSection, training: TrainingSection, spec: DataSpec, env: DistEnv):
    """This rank's test batches (``--test_batch_size``, ``--limit_test_batches``)."""
    ds = spec.dataset("test", training.eval_batch_size, env.rank, env.world_size,
                      max_batches=data.limit_test_batches)
    return spec.batches(ds, data.num_workers)
