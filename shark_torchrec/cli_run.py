"""The recipes' command lines: argv into the typed run configs of :mod:`shark_torchrec.run_config`.

This module and ``recipes/`` are the only places that know ``argparse``: every job below them
takes a :class:`~shark_torchrec.run_config.TrainRun`, :class:`~shark_torchrec.run_config.PruneRun`
or :class:`~shark_torchrec.run_config.PipelineRun`.

* Each recipe's parser offers exactly the flags its job uses.  A flag of ``train_dlrm.py``
  that another recipe does not use is refused by name, with the recipe that takes it
  (``--max_steps is not used by ...``), not ignored.
* Single values are checked as they are parsed (:mod:`shark_torchrec.cli_args`); checks across
  flags are made when the sections are built (:mod:`shark_torchrec.run_config`), and both end
  the command with status 2 and a message naming the flags, before any process group, data or
  model exists.
* A data preset (``--data ml100k``, ``--data synthetic_criteo``) fills in its defaults
  (:data:`PRESET_DEFAULTS`) for the flags the command line leaves unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Optional, Sequence, Type, TypeVar

from shark_torchrec.cli_args import (
    DEBUG_HELP,
    LOG_LEVELS,
    existing_dir,
    existing_file,
    fraction,
    log_level,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
    positive_int_list,
    row_count_or_all,
    tier_fractions,
    tier_list,
    unit_fraction,
)
from shark_torchrec.errors import FlagError
from shark_torchrec.importance.taylor import BASELINES
from shark_torchrec.planning.sharders import CPU_SHARDING_TYPES
from shark_torchrec.quant.config import SHARED_SAMPLE_ROWS
from shark_torchrec.quant.tiers import ROW_FITS
from shark_torchrec.run_config import (
    DEFAULT_QUANT_TIERS,
    FIELD_SCORERS,
    ROW_PRIORITIES,
    STAGES,
    DataSection,
    EvalSection,
    ModelSection,
    OutputSection,
    PipelinePruneSection,
    PipelineRun,
    PruneRun,
    PruneSection,
    QuantSection,
    ShardingSection,
    TrainingSection,
    TrainRun,
)
from shark_torchrec.training.datasets import DATASETS
from shark_torchrec.training.train_dlrm import DEFAULT_NUM_EMBEDDINGS
from shark_torchrec.training.trainer import DENSE_OPTIMIZERS, EMBEDDING_OPTIMIZERS

#: flags of ``train_dlrm.py`` that another recipe does not use, refused there by name
TRAIN_ONLY_FLAGS = {
    "recipes/shark_dlrm.py": ("--max_steps", "--score_fields", "--resume"),
    "recipes/prune_dlrm.py": ("--max_steps", "--score_fields", "--resume", "--checkpoint_every", "--epochs"),
}

S = TypeVar("S")


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
PRUNING_CRITERIA = ("keep_fields", "drop_fraction", "drop_score_share", "byte_target")


class PresetArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that fills in :data:`PRESET_DEFAULTS` of the chosen ``--data``
    for every flag the command line leaves at its default."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        given = self._given(list(sys.argv[1:] if args is None else args))
        for dest, value in PRESET_DEFAULTS.get(getattr(ns, "data", None), {}).items():
            if not hasattr(ns, dest) or dest in given:
                continue
            if dest in PRUNING_CRITERIA and (any(getattr(ns, c, None) is not None for c in PRUNING_CRITERIA)
                                             or getattr(ns, "plan", None)):
                continue  # the command line chose the pruning (a criterion, or a saved plan)
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


class _Refused(argparse.Action):
    """A flag this recipe does not take: an error saying which recipe does (status 2)."""

    def __init__(self, option_strings, dest, message: str = "", **kwargs) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(self.message)


def _refuse(p: argparse.ArgumentParser, recipe: str, what: str) -> None:
    for flag in TRAIN_ONLY_FLAGS[recipe]:
        p.add_argument(flag, action=_Refused, message=f"{flag} is not used by {what}; recipes/train_dlrm.py takes it")


def _add_output_flags(p: argparse.ArgumentParser, default_out: str, checkpoints: bool, resume: bool) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", type=output_dir, default=default_out, help="output directory")
    if checkpoints:
        o.add_argument("--checkpoint_every", type=nonnegative_int, default=0,
                       help="also checkpoint every N steps (0: at the end of every epoch or stage only)")
    if resume:
        o.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    o.add_argument("--log_level", type=log_level, default="INFO", help=", ".join(LOG_LEVELS))
    o.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def train_parser() -> argparse.ArgumentParser:
    """``recipes/train_dlrm.py``'s flags."""
    p = PresetArgumentParser(
        description="Train TorchRec's DLRM / DLRM_DCN, sharded with DistributedModelParallel. "
        "Launch with `torchrun --nproc_per_node N recipes/train_dlrm.py ...` or as one process."
    )
    _add_data_flags(p)
    t = _add_model_and_training_flags(p)
    t.add_argument("--epochs", type=positive_int, default=1)
    t.add_argument("--max_steps", type=positive_int,
                   help="stop after this many steps in total (the run can be resumed)")
    t.add_argument("--score_fields", choices=BASELINES,
                   help="collect SHARK field scores with this baseline while training "
                   "(written to OUT/field_scores.json)")
    _add_output_flags(p, "runs/train_dlrm", checkpoints=True, resume=True)
    return p


def prune_parser() -> argparse.ArgumentParser:
    """``recipes/prune_dlrm.py``'s flags."""
    p = PresetArgumentParser(
        description="Prune feature fields of a DLRM trained by recipes/train_dlrm.py (same data and model "
        "flags), fine-tune the smaller model sharded, and evaluate it."
    )
    _add_data_flags(p)
    _add_model_and_training_flags(p)
    _add_output_flags(p, "runs/prune_dlrm", checkpoints=False, resume=False)
    _refuse(p, "recipes/prune_dlrm.py", "recipes/prune_dlrm.py")
    g = p.add_argument_group("pruning")
    g.add_argument("--from_run", required=True, type=existing_dir,
                   help="output directory of the train_dlrm.py run to prune")
    g.add_argument("--scores", type=existing_file, help="field scores JSON (default: FROM_RUN/field_scores.json)")
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


def pipeline_parser() -> argparse.ArgumentParser:
    """``recipes/shark_dlrm.py``'s flags."""
    p = PresetArgumentParser(
        description="SHARK on a DLRM: train, prune fields, fine-tune, row-wise mixed precision, export."
    )
    _add_data_flags(p)
    t = _add_model_and_training_flags(p)
    t.add_argument("--epochs", type=positive_int, default=1)
    _add_output_flags(p, "runs/shark_dlrm", checkpoints=True, resume=False)
    _refuse(p, "recipes/shark_dlrm.py", "the SHARK pipeline (recipes/shark_dlrm.py)")
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
    g.add_argument("--quant_row_fit", choices=ROW_FITS, default="minmax",
                   help="each integer row's fp16 scale and bias: minmax (default, FBGEMM's quantizers) "
                   "or lsq (fitted to the row by least squares: the same format and kernels, less "
                   "error; the byte budget measures the fitted errors)")
    g.add_argument("--quant_shared_sample_rows", type=row_count_or_all, default=SHARED_SAMPLE_ROWS,
                   help="with the shared tier: rows of a table (of a shard) on which its centroid "
                   "count is chosen; a larger one is measured on a seeded random sample of that "
                   f"many rows (default {SHARED_SAMPLE_ROWS:,}), 'all' measures every candidate on "
                   "every row (exact, one pass over the rows per candidate)")
    g.add_argument("--init_from", metavar="DIR", type=existing_dir,
                   help="start from the newest checkpoint of a recipes/train_dlrm.py run (same "
                   "model flags); the train stage then trains --epochs more with the trackers")
    g.add_argument("--stop_after", choices=STAGES, help="stop after this stage (resume later)")
    _add_comparison_flags(p)
    return p


def _add_comparison_flags(p: argparse.ArgumentParser) -> None:
    """Flags that choose the scorers and priorities being compared, and how they are judged."""
    e = p.add_argument_group("what is compared, and how it is judged")
    e.add_argument("--field_scorer", choices=FIELD_SCORERS, default="shark",
                   help="field scores the pruning uses: SHARK's (collected while training, "
                   "--prune_baseline), exact permutation importance on the dev split, or random")
    e.add_argument("--permutation_batches", type=positive_int,
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
    e.add_argument("--bootstrap", type=positive_int, default=1000,
                   help="bootstrap resamples of the paired AUC comparisons")
    e.add_argument("--attribute_quant_loss", action="store_true",
                   help="also measure, per tier and per table, the AUC recovered when only those "
                   "rows stay fp32 (one evaluation each; report.md 'Where the quantization "
                   "step loses')")


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


def _add_model_and_training_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
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
    return t


def _section(cls: Type[S], ns: argparse.Namespace, **given: Any) -> S:
    """The section ``cls`` from the flags of ``ns`` that are its fields (and ``given``)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    return cls(**{**values, **given})


def _common(ns: argparse.Namespace) -> dict:
    return {"data": _section(DataSection, ns), "model": _section(ModelSection, ns),
            "training": _section(TrainingSection, ns), "sharding": _section(ShardingSection, ns),
            "output": _section(OutputSection, ns)}


def train_run(ns: argparse.Namespace) -> TrainRun:
    """``recipes/train_dlrm.py``'s parsed flags as its run config."""
    return TrainRun(**_common(ns), epochs=ns.epochs, checkpoint_every=ns.checkpoint_every, resume=ns.resume,
                    max_steps=ns.max_steps, score_fields=ns.score_fields)


def prune_run(ns: argparse.Namespace) -> PruneRun:
    """``recipes/prune_dlrm.py``'s parsed flags as its run config."""
    return PruneRun(**_common(ns), prune=_section(PruneSection, ns))


def pipeline_run(ns: argparse.Namespace) -> PipelineRun:
    """``recipes/shark_dlrm.py``'s parsed flags as its run config.  With no pruning criterion
    given, a quarter of the fields is pruned (``drop_fraction`` 0.25, keyed as such)."""
    criteria = (ns.keep_fields, ns.drop_fraction, ns.drop_score_share)
    prune = _section(PipelinePruneSection, ns, **({"drop_fraction": 0.25} if criteria == (None,) * 3 else {}))
    return PipelineRun(**_common(ns), prune=prune, quant=_section(QuantSection, ns), eval=_section(EvalSection, ns),
                       epochs=ns.epochs, checkpoint_every=ns.checkpoint_every, init_from=ns.init_from,
                       stop_after=ns.stop_after)


def _parse(parser: argparse.ArgumentParser, convert, argv: Optional[Sequence[str]]):
    ns = parser.parse_args(None if argv is None else [str(a) for a in argv])
    try:
        return convert(ns)
    except FlagError as e:  # flags that do not go together: a usage error, like a bad value
        parser.error(str(e))


def parse_train(argv: Optional[Sequence[str]] = None) -> TrainRun:
    """``recipes/train_dlrm.py``'s command line (``sys.argv[1:]`` by default)."""
    return _parse(train_parser(), train_run, argv)


def parse_prune(argv: Optional[Sequence[str]] = None) -> PruneRun:
    """``recipes/prune_dlrm.py``'s command line."""
    return _parse(prune_parser(), prune_run, argv)


def parse_pipeline(argv: Optional[Sequence[str]] = None) -> PipelineRun:
    """``recipes/shark_dlrm.py``'s command line."""
    return _parse(pipeline_parser(), pipeline_run, argv)
