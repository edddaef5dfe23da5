"""The typed settings of the jobs: what ``recipes/*.py`` turn their command lines into.

Every job (:mod:`~shark_torchrec.training.train_dlrm`, :mod:`~shark_torchrec.pruning.recipe`,
:mod:`~shark_torchrec.pipeline`) takes one run config built from sections, each a frozen
dataclass whose field names are the flags' (``--batch_size`` is ``training.batch_size``):

* :class:`DataSection`: the data and its splits (``--data``, files, synthetic generator);
* :class:`ModelSection`: the DLRM's shape;
* :class:`TrainingSection`: optimizer, batch sizes, seed, device;
* :class:`ShardingSection`: how the planner shards the tables;
* :class:`OutputSection`: where results go and what is logged;
* the pipeline's :class:`PipelinePruneSection`, :class:`QuantSection` and :class:`EvalSection`,
  and prune_dlrm.py's :class:`PruneSection` (both pruning sections extend :class:`FieldPruning`).

The command lines (:mod:`shark_torchrec.cli_run`) are the only place argv becomes these; a
job, a tool or a test can also build them directly.  Checks that need more than one flag are
made here, when a section is built, and raise :class:`~shark_torchrec.errors.FlagError`
naming the flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from shark_torchrec.errors import FlagError
from shark_torchrec.quant.config import SHARED_SAMPLE_ROWS
from shark_torchrec.quant.tiers import ROW_FITS

#: Tiers the pipeline's byte budget may use by default.
DEFAULT_QUANT_TIERS = "fp16,int8,int4,int2,shared"
#: The pipeline's stages, in the order they run (``--stop_after``).
STAGES = ("train", "prune", "quantize")
#: The field scorers the pipeline compares (``--field_scorer``).
FIELD_SCORERS = ("shark", "permutation", "random")
#: Where row priorities come from (``--row_priority``).
ROW_PRIORITIES = ("shark", "frequency")
#: The Taylor scores' baselines (``--prune_baseline``, ``--score_fields``; as
#: :data:`shark_torchrec.importance.taylor.BASELINES`, which tests/test_run_config.py checks).
BASELINES = ("mean", "shuffle", "zero")


def one_of(flag: str, value: Any, choices: Sequence[Any], optional: bool = False) -> None:
    """Refuse ``value`` outside ``choices`` (``None`` too, unless ``optional``), naming the flag:
    the jobs branch on these strings, where a typo from Python (``"Mean"``, ``"Test"``) took
    another branch without a word."""
    if (value is None and optional) or value in choices:
        return
    raise FlagError(f"--{flag} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class DataSection:
    """The data flags (``recipes/train_dlrm.py --help``, groups "data" and "synthetic data")."""

    data: str = "synthetic"
    data_path: Optional[str] = None
    schema: Optional[str] = None
    train_files: Optional[List[str]] = None
    test_files: Optional[List[str]] = None
    valid_files: Optional[List[str]] = None
    valid_fraction: float = 0.0
    test_fraction: float = 0.0
    split_seed: int = 0
    num_embeddings: Optional[int] = None
    num_embeddings_per_feature: Optional[List[int]] = None
    hash_rows_fraction: Optional[float] = None
    skip_malformed: bool = False
    int32_ids: bool = False
    num_workers: int = 0
    limit_train_batches: Optional[int] = None
    limit_test_batches: Optional[int] = None
    synthetic_num_fields: int = 26
    synthetic_informative: int = 6
    synthetic_cardinality: int = 10_000
    synthetic_train_batches: int = 200
    synthetic_test_batches: int = 20
    synthetic_train_rows: Optional[int] = None
    synthetic_test_rows: Optional[int] = None
    synthetic_max_rows: int = 1_000_000

    def __post_init__(self) -> None:
        from shark_torchrec.training.datasets import DATASETS  # (it imports the data modules)

        one_of("data", self.data, DATASETS)


#: The DLRM's interactions: TorchRec's dot product ("original") or DCN.
INTERACTION_TYPES = ("original", "dcn")


@dataclass(frozen=True)
class ModelSection:
    """The DLRM's shape (group "model")."""

    embedding_dim: int = 16
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 16])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 32, 1])
    interaction_type: str = "original"
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 16

    def __post_init__(self) -> None:
        if self.interaction_type not in INTERACTION_TYPES:  # (any other built the dot DLRM)
            raise FlagError(f"--interaction_type must be one of {list(INTERACTION_TYPES)}, got {self.interaction_type!r}")


@dataclass(frozen=True)
class TrainingSection:
    """Optimizer, batch sizes, seed and device (group "training")."""

    batch_size: int = 256
    test_batch_size: Optional[int] = None
    learning_rate: float = 0.05
    embedding_learning_rate: Optional[float] = None
    embedding_optimizer: str = "rowwise_adagrad"
    dense_optimizer: str = "adagrad"
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        one_of("device", self.device, ("auto", "cpu", "cuda"))

    @property
    def eval_batch_size(self) -> int:
        """Per-rank batch size of evaluations (``--test_batch_size``, else ``--batch_size``)."""
        return self.test_batch_size or self.batch_size


@dataclass(frozen=True)
class ShardingSection:
    """How the planner shards the tables."""

    sharding_type: Optional[str] = None
    planner_overrides: Optional[str] = None

    def __post_init__(self) -> None:
        if self.sharding_type and self.planner_overrides:
            raise FlagError("--sharding_type and --planner_overrides both set sharding: use one")


@dataclass(frozen=True)
class OutputSection:
    """Where a job writes, and what it logs."""

    out: str = "runs/train_dlrm"
    log_level: str = "INFO"
    debug: bool = False


@dataclass(frozen=True)
class JobRun:
    """The sections every job reads: its data, model, training, sharding and output."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    sharding: ShardingSection = field(default_factory=ShardingSection)
    output: OutputSection = field(default_factory=OutputSection)


@dataclass(frozen=True)
class TrainRun(JobRun):
    """``recipes/train_dlrm.py``."""

    epochs: int = 1
    checkpoint_every: int = 0
    resume: bool = False
    max_steps: Optional[int] = None
    score_fields: Optional[str] = None

    def __post_init__(self) -> None:
        one_of("score_fields", self.score_fields, BASELINES, optional=True)


@dataclass(frozen=True)
class FieldPruning:
    """What both pruning jobs read: the criterion (at most one of ``keep_fields``,
    ``drop_fraction``, ``drop_score_share``), what a pruned field becomes, the fine-tuning after
    it, and the iterative rounds' steps."""

    keep_fields: Optional[int] = None
    drop_fraction: Optional[float] = None
    drop_score_share: Optional[float] = None
    prune_baseline: str = "mean"
    prune_mode: str = "mean"
    mean_batches: int = 100
    finetune_epochs: int = 1
    score_batches: int = 20
    finetune_steps: int = 20

    def __post_init__(self) -> None:
        one_of("prune_baseline", self.prune_baseline, BASELINES)
        one_of("prune_mode", self.prune_mode, ("mean", "remove"))
        given = [f"--{c}" for c in ("keep_fields", "drop_fraction", "drop_score_share") if getattr(self, c) is not None]
        if len(given) > 1:
            raise FlagError(f"{' and '.join(given)} are exclusive pruning criteria: use one")


@dataclass(frozen=True)
class PruneSection(FieldPruning):
    """``recipes/prune_dlrm.py``'s pruning flags: :class:`FieldPruning`, the run it prunes, a
    saved plan or scores, a byte target, protected fields and ``--rounds``."""

    from_run: str = ""
    scores: Optional[str] = None
    plan: Optional[str] = None
    byte_target: Optional[int] = None
    protect: str = ""
    rounds: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.byte_target is not None and any(
                getattr(self, c) is not None for c in ("keep_fields", "drop_fraction", "drop_score_share")):
            raise FlagError("--byte_target and another pruning criterion: use one")
        if self.rounds and self.keep_fields is None:
            raise FlagError("--rounds needs --keep_fields (the number of fields at the end)")
        if self.plan:  # (a saved plan says which fields go: any other way to choose would be ignored)
            others = [flag for flag, value in (
                ("--scores", self.scores), ("--rounds", self.rounds), ("--byte_target", self.byte_target),
                ("--keep_fields", self.keep_fields), ("--drop_fraction", self.drop_fraction),
                ("--drop_score_share", self.drop_score_share)) if value]
            if others:
                raise FlagError(f"--plan gives the fields to drop; {', '.join(others)} would be ignored: use one")

    @property
    def protected(self) -> List[str]:
        """``--protect`` as a list (names stripped: ``"cat_0, cat_1"`` is two fields)."""
        return [p.strip() for p in self.protect.split(",") if p.strip()]


@dataclass(frozen=True)
class PruneRun(JobRun):
    """``recipes/prune_dlrm.py``."""

    output: OutputSection = field(default_factory=lambda: OutputSection(out="runs/prune_dlrm"))
    prune: PruneSection = field(default_factory=PruneSection)


@dataclass(frozen=True)
class PipelinePruneSection(FieldPruning):
    """The pipeline's field pruning (:class:`FieldPruning`), the part of the train split kept
    for fine-tuning, ``--prune_rounds`` and the field scorer compared.  With no criterion given,
    a quarter of the fields is pruned (``drop_fraction`` 0.25, filled in by the command line so
    that the stage key holds it)."""

    finetune_fraction: float = 0.25
    prune_rounds: int = 0
    field_scorer: str = "shark"
    permutation_batches: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("field_scorer", self.field_scorer, FIELD_SCORERS)
        if self.permutation_batches is not None and self.permutation_batches < 1:
            raise FlagError(f"--permutation_batches must be at least 1, got {self.permutation_batches}")
        if self.prune_rounds and self.keep_fields is None:
            raise FlagError("--prune_rounds needs --keep_fields (the number of fields at the end)")
        if self.prune_rounds and self.finetune_epochs != 1:  # (1: the default)
            raise FlagError("--finetune_epochs is for one-shot pruning; with --prune_rounds the pruned model (and "
                            "the reference) train --prune_rounds x (--score_batches + --finetune_steps) steps")


@dataclass(frozen=True)
class QuantSection:
    """Row-wise mixed precision: the tiers, the byte budget and the row priorities."""

    quant_budget_fraction: Optional[float] = None
    quant_tiers: str = DEFAULT_QUANT_TIERS
    drop_rows: str = "any"
    row_alignment: str = "auto"
    quant_fractions: Optional[Dict[str, float]] = None
    row_priority: str = "shark"
    priority_alpha: float = 1.0
    priority_beta: float = 0.2
    priority_gamma: float = 0.9999
    tier_weighting: str = "gradient"
    quant_row_fit: str = "minmax"
    quant_shared_sample_rows: Optional[int] = SHARED_SAMPLE_ROWS

    def __post_init__(self) -> None:
        one_of("drop_rows", self.drop_rows, ("any", "unused"))
        one_of("row_alignment", self.row_alignment, ("auto", "16", "1"))
        one_of("row_priority", self.row_priority, ROW_PRIORITIES)
        one_of("tier_weighting", self.tier_weighting, ("gradient", "none"))
        one_of("quant_row_fit", self.quant_row_fit, ROW_FITS)
        if self.quant_budget_fraction is not None and not 0 < self.quant_budget_fraction <= 1:
            raise FlagError(f"--quant_budget_fraction must be in (0, 1], got {self.quant_budget_fraction}")
        if self.quant_fractions is not None and self.quant_budget_fraction is not None:
            raise FlagError("--quant_fractions and --quant_budget_fraction both set the tiers: use one")
        if self.drop_rows != "any" and "drop" not in self.tier_names:
            raise FlagError(f"--drop_rows {self.drop_rows}: drop is not among --quant_tiers {self.quant_tiers} "
                            f"(add it, e.g. --quant_tiers {self.quant_tiers},drop)")
        if self.quant_fractions and self.quant_tiers != DEFAULT_QUANT_TIERS:
            raise FlagError("--quant_tiers is for a byte budget; --quant_fractions names its tiers itself")

    @property
    def tier_names(self) -> List[str]:
        """``--quant_tiers`` as a list of tier names."""
        return [t.strip().lower() for t in self.quant_tiers.split(",") if t.strip()]

    @property
    def budget_fraction(self) -> float:
        """The byte budget (``--quant_budget_fraction``, default 0.15)."""
        return 0.15 if self.quant_budget_fraction is None else self.quant_budget_fraction


@dataclass(frozen=True)
class EvalSection:
    """How every stage is judged."""

    eval_split: str = "test"
    bootstrap: int = 1000
    attribute_quant_loss: bool = False

    def __post_init__(self) -> None:
        one_of("eval_split", self.eval_split, ("test", "dev"))
        if self.bootstrap < 1:
            raise FlagError(f"--bootstrap must be at least 1, got {self.bootstrap}")


@dataclass(frozen=True)
class PipelineRun(JobRun):
    """``recipes/shark_dlrm.py``."""

    output: OutputSection = field(default_factory=lambda: OutputSection(out="runs/shark_dlrm"))
    prune: PipelinePruneSection = field(default_factory=lambda: PipelinePruneSection(drop_fraction=0.25))
    quant: QuantSection = field(default_factory=QuantSection)
    eval: EvalSection = field(default_factory=EvalSection)
    epochs: int = 1
    checkpoint_every: int = 0
    init_from: Optional[str] = None
    stop_after: Optional[str] = None

    def __post_init__(self) -> None:
        one_of("stop_after", self.stop_after, STAGES, optional=True)
        if all(getattr(self.prune, c) is None for c in ("keep_fields", "drop_fraction", "drop_score_share")):
            # (the command line fills in drop_fraction 0.25; from Python the plan failed after training)
            raise FlagError("the pipeline's pruning needs a criterion: keep_fields, drop_fraction (0 prunes "
                            "none) or drop_score_share")


def flat(run: Any) -> Dict[str, Any]:
    """Every setting of a run config by its flag's name (``batch_size``, not
    ``training.batch_size``): what reports and stage keys record."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(run):
        value = getattr(run, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat(value))
        else:
            out[f.name] = value
    return out
