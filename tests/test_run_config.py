"""The typed run configs (``shark_torchrec/run_config.py``) and the command lines that build them
(``shark_torchrec/cli_run.py``): each recipe's flags are exactly its config's settings, the
dataclasses' defaults are the flags', and every setting of the pipeline keys a stage."""

import argparse
import dataclasses

import pytest
import torch

from shark_torchrec import cli_run
from shark_torchrec.errors import FlagError
from shark_torchrec.pipeline import ADDED_SETTINGS, NOT_STAGE_INPUTS, PRUNE_INPUTS, QUANTIZE_INPUTS, stage_inputs
from shark_torchrec.run_config import (
    DataSection,
    EvalSection,
    PipelinePruneSection,
    PipelineRun,
    PruneRun,
    PruneSection,
    QuantSection,
    ShardingSection,
    TrainingSection,
    TrainRun,
    flat,
)


def _dests(parser: argparse.ArgumentParser) -> set:
    return {a.dest for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}


@pytest.mark.parametrize("parser,parse,argv,direct", [
    (cli_run.train_parser, cli_run.parse_train, [], TrainRun()),
    (cli_run.prune_parser, cli_run.parse_prune, ["--from_run", "."], PruneRun(prune=PruneSection(from_run="."))),
    (cli_run.pipeline_parser, cli_run.parse_pipeline, [], PipelineRun()),
], ids=["train", "prune", "pipeline"])
def test_each_flag_is_a_setting_and_the_defaults_agree(parser, parse, argv, direct) -> None:
    """A run config built in Python means what the same command line means."""
    parsed = parse(argv)
    assert set(flat(parsed)) == _dests(parser())  # no flag without a setting, no setting without a flag
    assert parsed == direct


def test_every_pipeline_setting_keys_exactly_one_stage() -> None:
    run = cli_run.parse_pipeline([])
    inputs = stage_inputs(run, torch.device("cpu"), 1)
    for name in flat(run):
        owners = [stage for stage, keyed in inputs.items() if name in keyed]
        assert len(owners) == (0 if name in NOT_STAGE_INPUTS or name in ADDED_SETTINGS else 1), (name, owners)
    assert PRUNE_INPUTS | QUANTIZE_INPUTS <= set(flat(run))  # no stale name in the declared inputs
    # a setting added later keys its stage only away from the value earlier runs had
    assert set(ADDED_SETTINGS) <= set(flat(run))
    changed = stage_inputs(cli_run.parse_pipeline(["--quant_row_fit", "lsq"]), torch.device("cpu"), 1)
    assert [stage for stage, keyed in changed.items() if "quant_row_fit" in keyed] == ["quantize"]
    for flag in ("all", "5000"):
        run = cli_run.parse_pipeline(["--quant_shared_sample_rows", flag])
        assert run.quant.quant_shared_sample_rows == (None if flag == "all" else 5000)
        changed = stage_inputs(run, torch.device("cpu"), 1)
        assert [stage for stage, keyed in changed.items() if "quant_shared_sample_rows" in keyed] == ["quantize"]


def test_a_changed_setting_changes_the_keys_of_its_stage_and_the_later_ones_only() -> None:
    from shark_torchrec.stages import StageStore

    def keys(argv):
        inputs = stage_inputs(cli_run.parse_pipeline(argv), torch.device("cpu"), 1)
        train = StageStore.key(inputs["train"])
        prune = StageStore.key(inputs["prune"], [train])
        return train, prune, StageStore.key(inputs["quantize"], [prune])

    base = keys([])
    assert keys(["--out", "elsewhere", "--checkpoint_every", "5"]) == base  # changes nothing computed
    q = keys(["--quant_budget_fraction", "0.1"])
    assert q[:2] == base[:2] and q[2] != base[2]
    f = keys(["--quant_row_fit", "lsq"])
    assert f[:2] == base[:2] and f[2] not in (base[2], q[2])
    p = keys(["--keep_fields", "3"])
    assert p[0] == base[0] and p[1] != base[1] and p[2] != base[2]
    t = keys(["--learning_rate", "0.1"])
    assert all(a != b for a, b in zip(t, base))


def test_sections_check_flags_that_do_not_go_together() -> None:
    with pytest.raises(FlagError, match="--sharding_type and --planner_overrides"):
        ShardingSection(sharding_type="row_wise", planner_overrides="x.yaml")
    with pytest.raises(FlagError, match="--quant_fractions and --quant_budget_fraction"):
        QuantSection(quant_fractions={"int8": 1.0}, quant_budget_fraction=0.2)
    with pytest.raises(FlagError, match="--rounds needs --keep_fields"):
        PruneSection(rounds=2)
    with pytest.raises(FlagError, match="--keep_fields and --drop_fraction are exclusive"):
        PipelinePruneSection(keep_fields=3, drop_fraction=0.1)
    with pytest.raises(FlagError, match="--byte_target and another pruning criterion"):
        PruneSection(byte_target=1000, drop_score_share=0.005)
    assert cli_run.parse_pipeline(["--quant_fractions", "fp16=0.25,int8=0.75"]).quant.quant_fractions == {
        "fp16": 0.25, "int8": 0.75}  # parsed once, when the flag is read
    # frozen: a job cannot change its settings behind the stage keys' back
    run = cli_run.parse_pipeline([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.training.batch_size = 3


def test_files_and_runs_named_by_flags_key_the_stages_by_their_contents(tmp_path) -> None:
    """Editing an overrides file or schema, or training the --init_from run further, changes the
    keys of the stages that read them, so they are not reused with the old contents."""
    from shark_torchrec.pipeline import stage_keys

    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("tables: {}\n")
    source = tmp_path / "trained"
    (source / "checkpoints").mkdir(parents=True)
    (source / "checkpoints" / "latest").write_text("step_00000010")

    def keys():
        run = cli_run.parse_pipeline(["--planner_overrides", str(overrides), "--init_from", str(source)])
        return stage_keys(run, torch.device("cpu"), 1)

    base = keys()
    assert keys() == base  # the same contents, the same keys
    overrides.write_text("tables: {t_cat_0: {compression: {never_prune: true}}}\n")
    edited = keys()
    assert edited["train"] == base["train"] and edited["prune"] != base["prune"]
    # the sharding the model trains under keys the train stage (a record trained under other
    # constraints was reused: audit)
    overrides.write_text("tables: {t_cat_0: {sharding_types: [data_parallel], compression: {never_prune: true}}}\n")
    assert keys()["train"] != edited["train"]
    overrides.write_text("tables: {t_cat_0: {compression: {never_prune: true}}}\n")
    (source / "checkpoints" / "latest").write_text("step_00000020")  # the source trained further
    assert keys()["train"] != edited["train"]


def test_the_tier_policys_version_keys_the_quantize_stage_only(monkeypatch) -> None:
    """A policy that gives other tiers for the same settings (its TIER_POLICY raised) reruns the
    quantize stage of a finished run, and not its training or pruning."""
    import shark_torchrec.pipeline as P

    def keys():
        return P.stage_keys(cli_run.parse_pipeline([]), torch.device("cpu"), 1)

    base = keys()
    monkeypatch.setattr(P, "TIER_POLICY", P.TIER_POLICY + 1)
    raised = keys()
    assert (raised["train"], raised["prune"]) == (base["train"], base["prune"])
    assert raised["quantize"] != base["quantize"]


def test_fractions_runs_give_a_tables_own_budget_the_runs_tiers() -> None:
    """With --quant_fractions a table's own budget from the overrides file could use the
    config's default tiers, which drop rows, where the same file without --quant_fractions
    shares them instead (the run's --quant_tiers)."""
    from shark_torchrec.pipeline import _quant_config

    run = cli_run.parse_pipeline(["--quant_fractions", "fp16=0.5,int8=0.5"])
    config = _quant_config(run.quant, None, set(), torch.device("cpu"))
    default = _quant_config(cli_run.parse_pipeline([]).quant, None, set(), torch.device("cpu"))
    assert list(config.tiers) == list(default.tiers) and "drop" not in config.tiers
    assert config.drop_rows == default.drop_rows


def test_settings_the_command_line_refuses_are_refused_in_python_too() -> None:
    """An unknown interaction built the dot DLRM, and an embedding learning rate of 0 trained at
    the dense one (audit): both refused where the sections and configs are built."""
    from shark_torchrec.run_config import ModelSection
    from shark_torchrec.training import OptimConfig

    with pytest.raises(FlagError, match="--interaction_type must be one of"):
        ModelSection(interaction_type="DCN")
    with pytest.raises(ValueError, match="embedding_learning_rate must be > 0, got 0.0"):
        OptimConfig(embedding_learning_rate=0.0)
    assert OptimConfig(learning_rate=0.05, embedding_learning_rate=0.5).embedding_kwargs()["lr"] == 0.5


@pytest.mark.parametrize("build,flag", [
    (lambda: PipelinePruneSection(field_scorer="SHARK"), "field_scorer"),  # ran permutation importance
    (lambda: QuantSection(row_priority="Frequency"), "row_priority"),  # used SHARK's mix
    (lambda: EvalSection(eval_split="Test"), "eval_split"),  # evaluated on the dev split
    (lambda: PipelinePruneSection(prune_mode="Mean"), "prune_mode"),  # removed the fields
    (lambda: QuantSection(tier_weighting="Gradient"), "tier_weighting"),  # turned the weighting off
    (lambda: PipelineRun(stop_after="quantise"), "stop_after"),  # never stopped
    (lambda: PruneSection(prune_baseline="Mean"), "prune_baseline"),
    (lambda: QuantSection(drop_rows="Unused"), "drop_rows"),
    (lambda: QuantSection(row_alignment="8"), "row_alignment"),
    (lambda: QuantSection(quant_row_fit="LSQ"), "quant_row_fit"),
    (lambda: TrainRun(score_fields="Mean"), "score_fields"),
    (lambda: DataSection(data="Criteo"), "data"),
    (lambda: TrainingSection(device="gpu"), "device"),
])
def test_choices_are_checked_where_sections_are_built(build, flag) -> None:
    """The jobs branch on these strings with ``==``: from Python a typo took another branch
    without a word (audit), where the command line's ``choices`` refused it."""
    with pytest.raises(FlagError, match=rf"--{flag} must be one of"):
        build()


def test_numbers_from_python_are_kept_or_refused_not_replaced() -> None:
    """A budget of 0.0 became the default 0.15 (``or``), a bootstrap of 0 failed only after
    training, and --finetune_epochs was ignored with --prune_rounds."""
    assert QuantSection(quant_budget_fraction=1.0).budget_fraction == 1.0
    assert QuantSection().budget_fraction == 0.15
    with pytest.raises(FlagError, match=r"--quant_budget_fraction must be in \(0, 1\], got 0.0"):
        QuantSection(quant_budget_fraction=0.0)  # (became 0.15)
    with pytest.raises(FlagError, match="--finetune_epochs is for one-shot pruning"):
        PipelinePruneSection(prune_rounds=2, keep_fields=3, finetune_epochs=2)
    with pytest.raises(FlagError, match="--bootstrap must be at least 1"):
        EvalSection(bootstrap=0)
    with pytest.raises(FlagError, match="--permutation_batches must be at least 1"):
        PipelinePruneSection(permutation_batches=0)
    with pytest.raises(SystemExit):
        cli_run.parse_pipeline(["--bootstrap", "0"])
    with pytest.raises(FlagError, match="the pipeline's pruning needs a criterion"):
        PipelineRun(prune=PipelinePruneSection())  # (failed after training)


def test_the_baselines_are_the_trackers() -> None:
    from shark_torchrec.importance.taylor import BASELINES
    from shark_torchrec.run_config import BASELINES as CONFIG_BASELINES

    assert CONFIG_BASELINES == BASELINES


@pytest.mark.parametrize("argv,refused", [
    (["--data_path", "mylogs", "--train_files", "mylogs/train.csv"], "--data_path, --train_files"),
    (["--test_files", "t.csv", "--skip_malformed"], "--test_files, --skip_malformed"),
    (["--data", "synthetic_criteo", "--synthetic_num_fields", "8"], "--synthetic_num_fields"),
    (["--synthetic_max_rows", "10"], "--synthetic_max_rows"),
    (["--data", "ml100k", "--synthetic_cardinality", "50"], "--synthetic_cardinality"),
])
def test_data_flags_the_data_does_not_read_are_refused(argv, refused) -> None:
    """Files named without ``--data`` trained and reported on generated data (the default), and
    the generator's flags were ignored by the data kinds that do not read them (audit)."""
    from shark_torchrec.training.train_dlrm import data_spec_from

    run = cli_run.parse_train(argv)
    with pytest.raises(FlagError, match=refused):
        data_spec_from(run.data, 0)


def test_a_saved_plan_takes_no_preset_criterion(tmp_path) -> None:
    """``prune_dlrm.py --data ml100k --plan FILE`` was refused: the preset filled in
    ``--drop_score_share``, which a plan would ignore."""
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    run = cli_run.parse_prune(["--from_run", ".", "--data", "ml100k", "--plan", str(plan)])
    assert run.prune.plan == str(plan) and run.prune.drop_score_share is None
    assert cli_run.parse_prune(["--from_run", ".", "--data", "ml100k"]).prune.drop_score_share == 0.005
