"""Bad input on the command lines: out-of-range flags are refused when parsed, naming the flag;
the project's own errors (bad files, data, flags that contradict each other) end a recipe or
``shark-torchrec`` with one line and a non-zero status, and ``--debug`` brings the traceback
back."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_torchrun
from shark_torchrec import cli
from shark_torchrec.data.click_log import MalformedLineError
from shark_torchrec.errors import SharkInputError, one_line
from shark_torchrec.cli_run import parse_pipeline, parse_prune, parse_train
from shark_torchrec.run_config import flat

TRAIN = ROOT / "recipes" / "train_dlrm.py"

# (parser, arguments, what argparse must say); FILE is an existing file, DIR an existing
# directory, MISSING a path that does not exist.
BAD_FLAGS = [
    ("train", ["--batch_size", "0"], "argument --batch_size: expected an integer >= 1, got 0"),
    ("train", ["--batch_size", "-4"], "argument --batch_size: expected an integer >= 1, got -4"),
    ("train", ["--batch_size", "many"], "argument --batch_size: expected an integer >= 1, got 'many'"),
    ("train", ["--test_batch_size", "0"], "argument --test_batch_size: expected an integer >= 1"),
    ("train", ["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
    ("train", ["--max_steps", "0"], "argument --max_steps: expected an integer >= 1"),
    ("train", ["--checkpoint_every", "-1"], "argument --checkpoint_every: expected an integer >= 0"),
    ("train", ["--learning_rate", "0"], "argument --learning_rate: expected a number > 0, got 0"),
    ("train", ["--embedding_learning_rate", "nan"], "argument --embedding_learning_rate: expected a number"),
    ("train", ["--embedding_dim", "0"], "argument --embedding_dim: expected an integer >= 1"),
    ("train", ["--dense_arch_layer_sizes", "64,0"], "argument --dense_arch_layer_sizes: expected comma-separated"),
    ("train", ["--dcn_num_layers", "0"], "argument --dcn_num_layers: expected an integer >= 1"),
    ("train", ["--synthetic_cardinality", "0"], "argument --synthetic_cardinality: expected an integer >= 1"),
    ("train", ["--synthetic_test_batches", "0"], "argument --synthetic_test_batches: expected an integer"),
    ("train", ["--seed", "-1"], "argument --seed: expected an integer >= 0"),
    ("train", ["--log_level", "LOUD"], "argument --log_level: expected one of DEBUG, INFO"),
    ("train", ["--out", "FILE"], "argument --out: FILE: is an existing file, not a directory"),
    ("train", ["--planner_overrides", "MISSING"], "argument --planner_overrides: MISSING: no such file"),
    ("shark", ["--drop_fraction", "1"], "argument --drop_fraction: expected a fraction in [0, 1), got 1"),
    ("shark", ["--drop_fraction", "-0.1"], "argument --drop_fraction: expected a fraction in [0, 1), got -0.1"),
    ("shark", ["--keep_fields", "0"], "argument --keep_fields: expected an integer >= 1, got 0"),
    ("shark", ["--finetune_fraction", "1"], "argument --finetune_fraction: expected a fraction in [0, 1)"),
    ("shark", ["--finetune_epochs", "-1"], "argument --finetune_epochs: expected an integer >= 0"),
    ("shark", ["--score_batches", "0"], "argument --score_batches: expected an integer >= 1"),
    ("shark", ["--quant_budget_fraction", "0"], "argument --quant_budget_fraction: expected a fraction in (0, 1]"),
    ("shark", ["--quant_fractions", "fp16=0.5"], "argument --quant_fractions: fractions must be >= 0 and sum"),
    ("shark", ["--quant_fractions", "fp9=1"], "--quant_fractions: 'fp9=1': unknown tier 'fp9'"),
    ("shark", ["--quant_tiers", "int8,shard"], "--quant_tiers: 'int8,shard': unknown tier 'shard'"),
    ("shark", ["--quant_tiers", "int8,int8"], "--quant_tiers: 'int8,int8': a tier named twice"),
    ("shark", ["--init_from", "MISSING"], "argument --init_from: MISSING: no such directory"),
    ("shark", ["--out", "FILE"], "argument --out: FILE: is an existing file"),
    ("shark", ["--drop_rows", "unused"], "--drop_rows unused: drop is not among --quant_tiers fp16,int8,int4,int2,shared"),
    ("shark", ["--quant_fractions", "int8=1", "--quant_tiers", "int8,shared"],
     "--quant_tiers is for a byte budget; --quant_fractions names its tiers itself"),
    ("shark", ["--prune_rounds", "2"], "--prune_rounds needs --keep_fields"),
    ("shark", ["--sharding_type", "row_wise", "--planner_overrides", "FILE"],
     "--sharding_type and --planner_overrides both set sharding: use one"),
    ("shark", ["--max_steps", "5"], "--max_steps is not used by the SHARK pipeline (recipes/shark_dlrm.py); "
                                    "recipes/train_dlrm.py takes it"),
    ("shark", ["--resume"], "--resume is not used by the SHARK pipeline"),
    ("shark", ["--score_fields", "mean"], "--score_fields is not used by the SHARK pipeline"),
    ("prune", ["--keep_fields", "0"], "argument --keep_fields: expected an integer >= 1"),
    ("prune", ["--drop_fraction", "1.5"], "argument --drop_fraction: expected a fraction in [0, 1), got 1.5"),
    ("prune", ["--byte_target", "-1"], "argument --byte_target: expected an integer >= 0"),
    ("prune", ["--rounds", "-1"], "argument --rounds: expected an integer >= 0"),
    ("prune", ["--plan", "MISSING"], "argument --plan: MISSING: no such file"),
    ("prune", ["--from_run", "MISSING"], "argument --from_run: MISSING: no such directory"),
    ("prune", ["--rounds", "2"], "--rounds needs --keep_fields"),
    ("prune", ["--epochs", "2"], "--epochs is not used by recipes/prune_dlrm.py; recipes/train_dlrm.py takes it"),
    ("prune", ["--checkpoint_every", "5"], "--checkpoint_every is not used by recipes/prune_dlrm.py"),
    ("prune", ["--max_steps", "5"], "--max_steps is not used by recipes/prune_dlrm.py"),
    ("train", ["--sharding_type", "row_wise", "--planner_overrides", "FILE"],
     "--sharding_type and --planner_overrides both set sharding: use one"),
    ("cli", ["--world_size", "0"], "argument --world_size: expected an integer >= 1, got 0"),
    ("cli", ["--batch_size", "0"], "argument --batch_size: expected an integer >= 1, got 0"),
    ("cli", ["--hbm_gb", "-1"], "argument --hbm_gb: expected a number > 0, got -1"),
    ("cli", ["--zipf", "-0.5"], "argument --zipf: expected a number >= 0"),
    ("cli", ["--json", "DIR"], "argument --json: DIR: is a directory, not a file"),
    ("cli", ["--planner_overrides", "MISSING"], "argument --planner_overrides: MISSING: no such file"),
]


def _paths(tmp_path: Path):
    (tmp_path / "file.txt").write_text("x")
    return {"FILE": str(tmp_path / "file.txt"), "DIR": str(tmp_path), "MISSING": str(tmp_path / "missing")}


def _parse(kind: str, args, tmp_path: Path):
    """Parse ``args`` with the ``kind`` command line (the flags each needs anyway added)."""
    paths = _paths(tmp_path)
    args = [paths.get(a, a) for a in args]
    if kind == "train":
        return parse_train(args)
    if kind == "shark":
        return parse_pipeline(args)
    if kind == "prune":
        return parse_prune(["--from_run", str(tmp_path), *args])
    return cli.build_parser().parse_args(["plan", "--preset", "criteo1tb", *args])


@pytest.mark.parametrize("kind,args,message", BAD_FLAGS, ids=[f"{k}{'='.join(a[:2])}" for k, a, _ in BAD_FLAGS])
def test_out_of_range_flags_fail_when_parsed(tmp_path: Path, capsys, kind, args, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(kind, args, tmp_path)
    assert exit_info.value.code == 2
    for name, path in _paths(tmp_path).items():
        message = message.replace(name, path)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--num_embeddings", "500"], "--num_embeddings: for click-log files; --data synthetic sizes its tables by "
                                  "its generator (--synthetic_cardinality"),
    (["--data", "synthetic_criteo", "--num_embeddings_per_feature", "5,6"],
     "--num_embeddings_per_feature: for click-log files; --data synthetic_criteo"),
])
def test_table_sizes_synthetic_data_would_ignore_are_refused(tmp_path: Path, args, message) -> None:
    from shark_torchrec.errors import FlagError
    from shark_torchrec.training.train_dlrm import data_spec_from

    for parse in (parse_train, parse_pipeline):
        with pytest.raises(FlagError, match=re.escape(message)):
            data_spec_from(parse(args).data)


def test_boundary_values_are_accepted(tmp_path: Path) -> None:
    a = flat(_parse("train", ["--checkpoint_every", "0", "--out", "DIR", "--log_level", "debug", "--debug"],
                    tmp_path))
    assert (a["checkpoint_every"], a["log_level"], a["debug"]) == (0, "DEBUG", True)
    a = flat(_parse("shark", ["--drop_fraction", "0", "--finetune_epochs", "0", "--finetune_fraction", "0",
                              "--prune_rounds", "0", "--quant_fractions", "fp16=0.1,int8=0.3,int4=0.6"], tmp_path))
    assert (a["drop_fraction"], a["finetune_epochs"], a["quant_fractions"]) == (
        0.0, 0, {"fp16": 0.1, "int8": 0.3, "int4": 0.6})
    a = flat(_parse("prune", ["--byte_target", "0", "--rounds", "0", "--debug"], tmp_path))
    assert (a["byte_target"], a["rounds"], a["debug"]) == (0, 0, True)
    a = _parse("cli", ["--zipf", "0", "--debug"], tmp_path)
    assert (a.zipf, a.debug) == (0.0, True)
    assert cli.build_parser().parse_args(["--debug", "plan", "--preset", "criteo1tb"]).debug
    assert not cli.build_parser().parse_args(["plan", "--preset", "criteo1tb"]).debug


@pytest.fixture
def plan_command_side_effects():
    """``plan`` silences logging process-wide (fine for a command, not for a test session)."""
    yield
    logging.disable(logging.NOTSET)


def test_plan_bad_files_print_one_line(tmp_path: Path, capsys, plan_command_side_effects) -> None:
    tables = tmp_path / "tables.yaml"
    tables.write_text("tables:\n  - {name: t0, rows: abc, dim: 8}\n")
    assert cli.main(["plan", "--tables", str(tables), "--device", "cpu", "--ddr_gb", "1"]) == 1
    err = capsys.readouterr().err
    assert err == f"shark-torchrec: error: {tables}: tables[0].rows: expected an integer >= 1, got 'abc'\n"

    tables.write_text("tables:\n  - {name: t0, rows: 100, dim: 8}\n")
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("tables:\n  t0:\n    sharding_type: [table_wise]\n")  # the key is sharding_types
    assert cli.main(["plan", "--tables", str(tables), "--planner_overrides", str(overrides)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"shark-torchrec: error: {overrides}: tables.t0: unknown keys ['sharding_type']")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_plan_refuses_what_it_cannot_plan_honestly(tmp_path: Path, capsys, plan_command_side_effects) -> None:
    """Duplicate table names, a model that cannot fit even compressed, and a fit that drops most
    rows of a table: one line each, not a traceback or a silent "fits"."""
    tables = tmp_path / "tables.yaml"
    tables.write_text("tables:\n  - {name: t0, rows: 100, dim: 8}\n  - {name: t0, rows: 50, dim: 8}\n")
    assert cli.main(["plan", "--tables", str(tables), "--device", "cpu", "--ddr_gb", "1"]) == 1
    assert capsys.readouterr().err == (f"shark-torchrec: error: {tables}: tables[1]: table name 't0' is used "
                                       "twice\n")
    # 4 tables of 1M x 64 (256 MB each in fp32) on one 1 MB device: nothing fits
    tables.write_text("tables:\n" + "".join(f"  - {{name: t{i}, rows: 1000000, dim: 64}}\n" for i in range(4)))
    assert cli.main(["plan", "--tables", str(tables), "--device", "cpu", "--ddr_gb", "0.001"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("shark-torchrec: error: the model does not fit 1 × cpu with 0.001 GiB per device, "
                          "even compressed") and err.count("\n") == 1
    # the Criteo 1TB preset on one 1 GiB GPU "fits" only by dropping nearly all rows of its big tables
    assert cli.main(["plan", "--preset", "criteo1tb", "--hbm_gb", "1"]) == 1
    err = capsys.readouterr().err
    assert "only by dropping more than --max_drop_fraction 0.5 of the rows of" in err and err.count("\n") == 1
    assert cli.main(["plan", "--preset", "criteo1tb", "--hbm_gb", "1", "--max_drop_fraction", "1"]) == 0
    out = capsys.readouterr()
    assert "warning: dropped rows (they read as zeros): " in out.err


def test_plan_debug_raises_with_traceback(tmp_path: Path, plan_command_side_effects) -> None:
    tables = tmp_path / "tables.yaml"
    tables.write_text("tables: []\n")
    with pytest.raises(cli.TablesFileError, match=r"tables\.yaml: expected 'tables:' with a list"):
        cli.main(["--debug", "plan", "--tables", str(tables)])
    with pytest.raises(SharkInputError):
        cli.main(["plan", "--tables", str(tables), "--debug"])


def test_a_tables_file_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    """``feature_names`` (TorchRec's spelling) or a typo is named, not ignored (ignored, the
    table served one feature named after itself)."""
    tables = tmp_path / "tables.yaml"
    tables.write_text("tables:\n  - {name: t_user, rows: 1000, dim: 16, feature_names: [user, friend]}\n")
    with pytest.raises(cli.TablesFileError, match=r"tables\[0\]: unknown keys \['feature_names'\]"):
        cli._load_tables(str(tables))


def test_error_from_a_data_loader_worker_is_one_line() -> None:
    """DataLoader re-raises a worker's error with the worker's traceback as its message."""
    from torch._utils import ExceptionWrapper

    try:
        raise MalformedLineError("train.tsv:6: expected 40 columns, got 3")
    except MalformedLineError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(MalformedLineError) as info:
        wrapped.reraise()
    assert "Original Traceback" in str(info.value)
    assert one_line(info.value) == "train.tsv:6: expected 40 columns, got 3"


def _stderr_lines(proc: subprocess.CompletedProcess):
    """stderr without FBGEMM's library-loading chatter."""
    return [line for line in proc.stderr.splitlines() if "Successfully loaded" not in line and line.strip()]


def test_recipe_prints_one_line_for_bad_input(tmp_path: Path) -> None:
    missing = tmp_path / "no_data"
    cmd = [sys.executable, str(TRAIN), "--data", "criteo", "--data_path", str(missing),
           "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert _stderr_lines(proc) == [f"train_dlrm.py: error: --data_path {missing}: not a directory"]
    proc = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "InputFileNotFoundError: --data_path" in proc.stderr


def test_recipe_contradicting_model_flags_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(TRAIN), "--embedding_dim", "8", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert _stderr_lines(proc) == ["train_dlrm.py: error: model flags do not fit together: DLRMConfig: "
                                   "dense_arch_layer_sizes[-1] (16) must equal embedding_dim (8)"]


@pytest.mark.slow
def test_recipe_under_torchrun_reports_per_rank(tmp_path: Path) -> None:
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("tables:\n  nosuch_table:\n    sharding_types: [table_wise]\n")
    args = ["--synthetic_num_fields", 4, "--synthetic_informative", 2, "--synthetic_cardinality", 100,
            "--embedding_dim", 8, "--dense_arch_layer_sizes", "16,8", "--batch_size", 8,
            "--planner_overrides", overrides, "--out", tmp_path / "o"]
    with pytest.raises(AssertionError) as failed:  # run_torchrun fails on a non-zero exit
        run_torchrun(TRAIN, args, nproc=2)
    report = str(failed.value)
    assert "exited 1" in report
    errors = [line for line in report.splitlines() if ": error: " in line]
    assert errors, report
    for line in errors:  # every failing rank says which it is; none prints a traceback
        assert line.startswith(("train_dlrm.py [rank 0]: error: ", "train_dlrm.py [rank 1]: error: ")), line
        assert line.endswith(f"{overrides}: tables.nosuch_table: matches no table (tables: "
                             "['t_cat_0', 't_cat_1', 't_cat_2', 't_cat_3'])"), line
    assert "[rank0]: Traceback" not in report and "[rank1]: Traceback" not in report


def test_plan_says_what_it_plans_against_and_what_it_does_not_apply(tmp_path: Path, capsys,
                                                                   plan_command_side_effects) -> None:
    """On CPU without --ddr_gb the command printed "None GiB" and wrote null while TorchRec
    planned against its default host memory; planner settings in an overrides file, which this
    command does not apply, were ignored without a word."""
    import json

    tables = tmp_path / "tables.yaml"
    tables.write_text("tables:\n  - {name: t0, rows: 1000, dim: 8}\n")
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("tables:\n  t0: {sharding_types: [table_wise]}\n")
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--tables", str(tables), "--device", "cpu", "--json", str(out),
                     "--planner_overrides", str(overrides)]) == 0
    captured = capsys.readouterr()
    topology = json.loads(out.read_text())["topology"]
    assert topology["hbm_gb"] is None and topology["ddr_gb"] > 0
    assert f"1 × cpu, {topology['ddr_gb']:g} GiB per device" in captured.out
    assert "planner settings of tables ['t0'] are not applied by this command" in captured.err
