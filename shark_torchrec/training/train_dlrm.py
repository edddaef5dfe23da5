"""The DLRM training job: command-line options → sharded training → ``metrics.json``.

``recipes/train_dlrm.py`` is the launcher; this module holds the job so that other recipes
and the tests can reuse its pieces (:func:`build_parser`, :func:`data_spec_from_args`,
:func:`run`).  Flags follow TorchRec's DLRM example (``torchrec/examples/dlrm``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from shark_torchrec.cli_args import (
    DEBUG_HELP,
    LOG_LEVELS,
    existing_file,
    fraction,
    log_level,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
    positive_int_list,
    unit_fraction,
)
from shark_torchrec.data import SyntheticConfig, criteo_config
from shark_torchrec.data.movielens import SCHEMA_FILE as MOVIELENS_SCHEMA_FILE, ensure_ml100k
from shark_torchrec.data.schema_file import SchemaFile, load_schema_file
from shark_torchrec.data.splits import LineSplit
from shark_torchrec.errors import FlagError
from torchrec.distributed.planner import ParameterConstraints

from shark_torchrec.importance import BASELINES, TaylorFieldImportance
from shark_torchrec.planning import (
    CPU_SHARDING_TYPES,
    AllShardingTypesEBCSharder,
    TrackerStorageReservation,
    load_overrides,
    tracker_bytes_per_rank,
)
from shark_torchrec.training.checkpoint import CheckpointManager
from shark_torchrec.training.datasets import (
    DATASETS,
    DataSpec,
    SCHEMAS,
    expand_files,
    find_split_files,
    require_rows,
)
from shark_torchrec.training.distributed import DistEnv, run_job
from shark_torchrec.training.loop import TrainingLoop
from shark_torchrec.training.model import DLRMConfig
from shark_torchrec.training.sharding import plan_summary
from shark_torchrec.training.trainer import (
    DENSE_OPTIMIZERS,
    EMBEDDING_OPTIMIZERS,
    DLRMTrainer,
    OptimConfig,
)

#: rows per table of click-log data when neither --num_embeddings nor a schema says
DEFAULT_NUM_EMBEDDINGS = 100_000
logger = logging.getLogger(__name__)


#: Defaults a data preset brings, for the flags the command line does not set (tuned on the
#: preset's dev split, see BENCHMARKS.md).  Both presets prune by field score per byte saved,
#: up to 0.5% of the total field score, by mean replacement (the pipeline's --prune_mode
#: default): on synthetic Criteo that prunes the constant and near-constant fields (scores
#: 0-0.07% of the total, the next field 1%), losslessly; MovieLens-100K's 8 fields all carry
#: information (each >= 5% of the total score; pruning the two lowest by mean replacement costs
#: 0.0025 test AUC), so none is pruned there.  MovieLens's ~3,500 rows need a wider embedding for
#: mixed precision to pay (FBGEMM pads rows to 16 bytes: at dim 16 an INT2 row takes as much as
#: an INT4 one).
PRESET_DEFAULTS = {
    "ml100k": {"embedding_dim": 64, "dense_arch_layer_sizes": [64, 64], "epochs": 3,
               "drop_score_share": 0.005},
    "synthetic_criteo": {"batch_size": 1024, "drop_score_share": 0.005},
}


#: the pipeline's exclusive pruning criteria (a preset's applies only when none is given)
PRUNING_CRITERIA = ("keep_fields", "drop_fraction", "drop_score_share")


class PresetArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that fills in :data:`PRESET_DEFAULTS` of the chosen ``--data``
    for every flag the command line leaves at its default."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        given = self._given(list(sys.argv[1:] if args is None else args))
        for dest, value in PRESET_DEFAULTS.get(getattr(ns, "data", None), {}).items():
            if not hasattr(ns, dest) or dest in given:
                continue
            if dest in PRUNING_CRITERIA and any(getattr(ns, c, None) is not None for c in PRUNING_CRITERIA):
                continue  # the command line chose the pruning: the criteria are exclusive
            setattr(ns, dest, value)
        return ns, rest

    def _given(self, argv) -> set:
        """Destinations of the flags present in ``argv`` (also as unique prefixes, --x=v)."""
        tokens = {str(t).split("=", 1)[0] for t in argv if str(t).startswith("--")}
        given = set()
        for action in self._actions:
            for opt in action.option_strings:
                if any(opt == t or (len(t) > 2 and opt.startswith(t)) for t in tokens):
                    given.add(action.dest)
        return given


def build_parser() -> argparse.ArgumentParser:
    p = PresetArgumentParser(
        description="Train TorchRec's DLRM / DLRM_DCN, sharded with DistributedModelParallel. "
        "Launch with `torchrun --nproc_per_node N recipes/train_dlrm.py ...` or as one process."
    )
    _add_data_flags(p)
    _add_model_and_training_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", type=output_dir, default="runs/train_dlrm", help="output directory")
    o.add_argument("--checkpoint_every", type=nonnegative_int, default=0,
                   help="also checkpoint every N steps (0: at the end of every epoch only)")
    o.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    o.add_argument("--log_level", type=log_level, default="INFO", help=", ".join(LOG_LEVELS))
    o.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=DATASETS, default="synthetic",
                   help="csv: your own click logs, laid out by --schema; ml100k: MovieLens-100K")
    d.add_argument("--data_path", help="directory with train.* and test.* (and optional valid.*) "
                   "files; for ml100k the converted data set (converted into it if it is empty; "
                   "default: ~/.cache/shark-torchrec/ml-100k)")
    d.add_argument("--schema", metavar="FILE", type=existing_file,
                   help="--data csv: YAML or JSON schema of the files (label, dense, categorical "
                   "and multi-valued columns, rows per field; see shark_torchrec/data/schema_file.py)")
    d.add_argument("--train_files", nargs="+", help="train files or globs (overrides --data_path)")
    d.add_argument("--test_files", nargs="+", help="test files or globs (overrides --data_path)")
    d.add_argument("--valid_files", nargs="+", help="validation files or globs (overrides --data_path)")
    d.add_argument("--valid_fraction", type=fraction, default=0.0,
                   help="take this share of the train files' lines as the validation split "
                   "(a seeded hash of file name and line number picks them)")
    d.add_argument("--test_fraction", type=fraction, default=0.0,
                   help="take this share of the train files' lines as the test split (for data "
                   "that comes as one file)")
    d.add_argument("--split_seed", type=nonnegative_int, default=0,
                   help="seed of the --valid_fraction/--test_fraction split")
    d.add_argument("--num_embeddings", type=positive_int,
                   help="rows per table when --num_embeddings_per_feature is not given (default "
                   f"{DEFAULT_NUM_EMBEDDINGS:,}; click-log data only: --data synthetic sizes its tables "
                   "by --synthetic_cardinality)")
    d.add_argument("--num_embeddings_per_feature", type=positive_int_list,
                   help="comma-separated rows per sparse feature, in feature order")
    d.add_argument("--hash_rows_fraction", type=unit_fraction,
                   help="tables of this fraction of their rows, ids hashed into them by their "
                   "remainder (the hashing trick: a smaller model trained from scratch, colliding "
                   "ids sharing a row; a model trained so expects hashed ids)")
    d.add_argument("--skip_malformed", action="store_true",
                   help="skip and count malformed lines instead of stopping at the first")
    d.add_argument("--int32_ids", action="store_true", help="int32 ids/lengths in the KJT")
    d.add_argument("--num_workers", type=nonnegative_int, default=0, help="data-loader workers per rank")
    d.add_argument("--limit_train_batches", type=positive_int, help="global train batches per epoch")
    d.add_argument("--limit_test_batches", type=positive_int, help="global test batches")
    s = p.add_argument_group("synthetic data")
    s.add_argument("--synthetic_num_fields", type=positive_int, default=26)
    s.add_argument("--synthetic_informative", type=nonnegative_int, default=6,
                   help="number of planted informative fields (cat_0..)")
    s.add_argument("--synthetic_cardinality", type=positive_int, default=10_000)
    s.add_argument("--synthetic_train_batches", type=positive_int, default=200,
                   help="global batches per training epoch")
    s.add_argument("--synthetic_test_batches", type=positive_int, default=20)
    s.add_argument("--synthetic_train_rows", type=positive_int,
                   help="rows per training epoch instead of batches (synthetic_criteo: 1,000,000)")
    s.add_argument("--synthetic_test_rows", type=positive_int,
                   help="rows of the test and dev splits (synthetic_criteo: 200,000)")
    s.add_argument("--synthetic_max_rows", type=positive_int, default=1_000_000,
                   help="synthetic_criteo: cap on the Criteo vocabulary sizes")


def _add_model_and_training_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--embedding_dim", type=positive_int, default=16)
    m.add_argument("--dense_arch_layer_sizes", type=positive_int_list, default=[64, 16])
    m.add_argument("--over_arch_layer_sizes", type=positive_int_list, default=[64, 32, 1])
    m.add_argument("--interaction_type", choices=["original", "dcn"], default="original",
                   help="original: DLRM dot interaction; dcn: DLRM_DCN")
    m.add_argument("--dcn_num_layers", type=positive_int, default=3)
    m.add_argument("--dcn_low_rank_dim", type=positive_int, default=16)
    t = p.add_argument_group("training")
    t.add_argument("--batch_size", type=positive_int, default=256, help="per-rank batch size")
    t.add_argument("--test_batch_size", type=positive_int, help="per-rank eval batch size")
    t.add_argument("--epochs", type=positive_int, default=1)
    t.add_argument("--learning_rate", type=positive_float, default=0.05)
    t.add_argument("--embedding_learning_rate", type=positive_float)
    t.add_argument("--embedding_optimizer", choices=sorted(EMBEDDING_OPTIMIZERS),
                   default="rowwise_adagrad")
    t.add_argument("--dense_optimizer", choices=sorted(DENSE_OPTIMIZERS), default="adagrad")
    t.add_argument("--seed", type=nonnegative_int, default=0)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--sharding_type", choices=CPU_SHARDING_TYPES,
                   help="shard every table this way (default: the planner chooses)")
    t.add_argument("--planner_overrides", metavar="FILE", type=existing_file,
                   help="YAML of per-table planner constraints and compression settings")
    t.add_argument("--max_steps", type=positive_int,
                   help="stop after this many steps in total (the run can be resumed)")
    t.add_argument("--score_fields", choices=BASELINES,
                   help="collect SHARK field scores with this baseline while training "
                   "(written to OUT/field_scores.json)")


def data_spec_from_args(args: argparse.Namespace) -> DataSpec:
    """The data of the ``data`` flags: files, schema, rows per feature and splits.

    ``--data ml100k`` converts MovieLens-100K first if ``--data_path`` (or the cache) holds no
    conversion yet.  ``--hash_rows_fraction`` shrinks every table and hashes ids into it.
    Raises :class:`~shark_torchrec.errors.FlagError` for flags that do not go together,
    :class:`~shark_torchrec.data.SchemaFileError` for a bad ``--schema``.
    """
    spec = _data_spec(args)
    return spec.hashed(args.hash_rows_fraction) if args.hash_rows_fraction is not None else spec


def _synthetic_spec(args: argparse.Namespace, id_dtype: torch.dtype) -> DataSpec:
    """``--data synthetic`` / ``synthetic_criteo``: generated splits, tables sized by the generator."""
    unused = [flag for flag, value in (("--schema", args.schema), ("--test_fraction", args.test_fraction),
                                       ("--valid_fraction", args.valid_fraction)) if value]
    if unused:
        raise FlagError(f"{', '.join(unused)}: for click-log files; --data synthetic generates its splits")
    sized = [flag for flag, value in (("--num_embeddings", args.num_embeddings),
                                      ("--num_embeddings_per_feature", args.num_embeddings_per_feature))
             if value]
    if sized:
        raise FlagError(f"{', '.join(sized)}: for click-log files; --data {args.data} sizes its tables "
                        "by its generator (--synthetic_cardinality for --data synthetic)")
    train_rows, test_rows = args.synthetic_train_rows, args.synthetic_test_rows
    if args.data == "synthetic_criteo":
        # The Criteo-shaped benchmark with a known ground truth (data/synthetic.py).
        cfg = criteo_config(seed=args.seed, max_rows=args.synthetic_max_rows)
        train_rows, test_rows = train_rows or 1_000_000, test_rows or 200_000
    else:
        if args.synthetic_informative > args.synthetic_num_fields:
            raise FlagError(f"--synthetic_informative {args.synthetic_informative} is more than "
                            f"--synthetic_num_fields {args.synthetic_num_fields}")
        cfg = SyntheticConfig.default(
            num_fields=args.synthetic_num_fields,
            num_informative=args.synthetic_informative,
            cardinality=args.synthetic_cardinality,
            seed=args.seed,
        )
    return DataSpec(
        kind="synthetic", feature_names=cfg.feature_names,
        num_embeddings_per_feature=cfg.num_embeddings_per_feature,
        num_dense=cfg.num_dense, train_files=[], test_files=[], synthetic=cfg,
        synthetic_train_batches=args.synthetic_train_batches,
        synthetic_test_batches=args.synthetic_test_batches,
        synthetic_train_rows=train_rows or 0, synthetic_test_rows=test_rows or 0,
        id_dtype=id_dtype,
    )


def _data_spec(args: argparse.Namespace) -> DataSpec:
    id_dtype = torch.int32 if args.int32_ids else torch.int64
    if args.data in ("synthetic", "synthetic_criteo"):
        return _synthetic_spec(args, id_dtype)
    data_path = args.data_path
    schema_file: Optional[SchemaFile] = None
    if args.data == "csv":
        if not args.schema:
            raise FlagError("--data csv needs --schema FILE (the layout of your files, see "
                            "shark_torchrec/data/schema_file.py)")
        schema_file = load_schema_file(args.schema)
    elif args.schema:
        raise FlagError(f"--schema is for --data csv; --data {args.data} has its own layout")
    if args.data == "ml100k":
        data_path = ensure_ml100k(data_path)  # converts on first use (one rank; the others wait)
        schema_file = load_schema_file(os.path.join(data_path, MOVIELENS_SCHEMA_FILE))
    schema = schema_file.schema if schema_file else SCHEMAS[args.data]
    line_split = None
    if args.valid_fraction or args.test_fraction:
        if args.valid_fraction + args.test_fraction >= 1:
            raise FlagError(f"--valid_fraction {args.valid_fraction:g} + --test_fraction "
                            f"{args.test_fraction:g} leave no training lines")
        for flag, value, files in (("test", args.test_fraction, args.test_files),
                                   ("valid", args.valid_fraction, args.valid_files)):
            if value and files:
                raise FlagError(f"--{flag}_fraction and --{flag}_files both give the {flag} split: use one")
        line_split = LineSplit(args.valid_fraction, args.test_fraction, args.split_seed)
    train = _split_files(args, "train", data_path)
    # Parts of the train files under --test_fraction/--valid_fraction (DataSpec.line_split).
    test = list(train) if args.test_fraction else _split_files(args, "test", data_path)
    dev: List[str] = list(train) if args.valid_fraction else []
    if args.valid_files:
        dev = expand_files(args.valid_files, "--valid_files")
    elif data_path and not args.valid_fraction:
        try:
            dev = find_split_files(data_path, "dev")
        except FileNotFoundError:
            pass  # a dev split is optional
    features = schema.sparse_feature_names
    if args.num_embeddings_per_feature:
        sizes = list(args.num_embeddings_per_feature)
    elif schema_file is not None:
        sizes = schema_file.sizes(args.num_embeddings or DEFAULT_NUM_EMBEDDINGS)
    else:
        sizes = [args.num_embeddings or DEFAULT_NUM_EMBEDDINGS] * len(features)
    if len(sizes) != len(features):
        raise FlagError(
            f"--num_embeddings_per_feature has {len(sizes)} values; --data {args.data} has "
            f"{len(features)} sparse features ({', '.join(features)})"
        )
    for name, column, n in zip(features, schema.sparse_columns, sizes):
        vocab = schema.vocabularies.get(column)
        if vocab is not None and n < len(vocab) + 1:
            raise FlagError(f"--num_embeddings_per_feature: feature {name!r} has a vocabulary of "
                            f"{len(vocab)} values and needs at least {len(vocab) + 1} rows, got {n}")
    return DataSpec(
        kind=args.data, feature_names=features, num_embeddings_per_feature=list(sizes),
        num_dense=len(schema.dense), train_files=train, test_files=test, dev_files=dev,
        skip_malformed=args.skip_malformed, id_dtype=id_dtype,
        click_schema=schema_file.schema if schema_file else None, line_split=line_split,
    )


def _split_files(args: argparse.Namespace, split: str, data_path: Optional[str] = None) -> List[str]:
    """``--<split>_files`` if given, else the split's files in ``data_path`` (default
    ``--data_path``)."""
    explicit = getattr(args, f"{split}_files")
    if explicit:
        return expand_files(explicit, f"--{split}_files")
    data_path = data_path or args.data_path
    if data_path:
        return find_split_files(data_path, split)
    hint = " (or --test_fraction, for data that comes as one file)" if split == "test" else ""
    raise FlagError(f"--data {args.data} needs --data_path or --{split}_files{hint}")


def model_config_from_args(args: argparse.Namespace, spec: DataSpec) -> DLRMConfig:
    try:
        return DLRMConfig(
            feature_names=spec.feature_names,
            num_embeddings_per_feature=spec.model_rows,
            embedding_dim=args.embedding_dim,
            dense_in_features=spec.dense_in_features,
            dense_arch_layer_sizes=tuple(args.dense_arch_layer_sizes),
            over_arch_layer_sizes=tuple(args.over_arch_layer_sizes),
            interaction="dcn" if args.interaction_type == "dcn" else "dot",
            dcn_num_layers=args.dcn_num_layers,
            dcn_low_rank_dim=args.dcn_low_rank_dim,
        )
    except ValueError as e:  # DLRMConfig's messages name its fields, which are the flags' names
        raise FlagError(f"model flags do not fit together: {e}") from e


def fingerprint(args: argparse.Namespace, model_config: DLRMConfig) -> Dict:
    """What identifies the model of a checkpoint (a checkpoint of another model is refused)."""
    return {
        "data": args.data,
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


def optim_config_from_args(args: argparse.Namespace) -> OptimConfig:
    return OptimConfig(
        embedding_optimizer=args.embedding_optimizer, dense_optimizer=args.dense_optimizer,
        learning_rate=args.learning_rate, embedding_learning_rate=args.embedding_learning_rate,
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


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the job; returns the metrics (also written to ``OUT/metrics.json`` by rank 0)."""
    return run_job(build_parser().parse_args(argv), _run)


def _run(args: argparse.Namespace, env: DistEnv) -> Dict:
    spec = data_spec_from_args(args)
    require_rows(spec, args, env.world_size)
    model_config = model_config_from_args(args, spec)
    if args.sharding_type and args.planner_overrides:
        raise SystemExit("--sharding_type and --planner_overrides both set sharding: use one")
    trainer = DLRMTrainer(model_config, optim_config_from_args(args), env, args.batch_size, seed=args.seed,
                          **planning_options(model_config, args.batch_size, env.world_size,
                                             sharding_type=args.sharding_type,
                                             planner_overrides=args.planner_overrides,
                                             field_importance=args.score_fields))
    tracker = None
    if args.score_fields:
        # Attached after DMP: hooks go on the sharded collection (see importance.taylor).
        tracker = TaylorFieldImportance(trainer.model, baseline=args.score_fields, seed=args.seed)

    def batches(epoch: int, start_batch: int):
        ds = spec.dataset("train", args.batch_size, env.rank, env.world_size, start_batch=start_batch,
                          max_batches=args.limit_train_batches)
        return spec.batches(ds, args.num_workers)

    ckpt = CheckpointManager(os.path.join(args.out, "checkpoints"), fingerprint(args, model_config))
    loop = TrainingLoop(trainer, ckpt, batches, args.epochs, args.batch_size * env.world_size,
                        checkpoint_every=args.checkpoint_every, importance=tracker,
                        evaluate=lambda: trainer.evaluate(test_batches(args, spec, env), desc="test"))
    if args.resume:
        loop.resume()
    logger.info("training on %d rank(s), %s, global batch %d", env.world_size, env.device,
                args.batch_size * env.world_size)
    stopped = not loop.run(args.max_steps)
    progress = loop.progress

    final = progress["history"][-1] if progress["history"] and not stopped else None
    result = {
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
        "args": vars(args),
        "sharding_plan": plan_summary(trainer.plan),
    }
    if tracker is not None:
        scores_doc = field_scores_document(tracker, model_config)  # collective
        result["field_scores_file"] = os.path.join(args.out, FIELD_SCORES_FILE)
        if env.is_main:
            os.makedirs(args.out, exist_ok=True)
            with open(result["field_scores_file"], "w") as f:
                json.dump(scores_doc, f, indent=1)
    if env.is_main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        logger.info("wrote %s", os.path.join(args.out, "metrics.json"))
    return result


def test_batches(args: argparse.Namespace, spec: DataSpec, env: DistEnv):
    ds = spec.dataset("test", args.test_batch_size or args.batch_size, env.rank,
                      env.world_size, max_batches=args.limit_test_batches)
    return spec.batches(ds, args.num_workers)
