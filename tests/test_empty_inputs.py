"""Splits with nothing in them stop the recipes before training or evaluating, naming the
files (instead of a 0-step "successful" run that reports an untrained model)."""

import importlib
from pathlib import Path

import pytest

from shark_torchrec.cli_run import parse_pipeline, parse_prune, parse_train
from shark_torchrec import pipeline
from shark_torchrec.data import LineSplit
from shark_torchrec.training import train_dlrm
from shark_torchrec.training.datasets import NoRowsError, require_rows

prune_dlrm = importlib.import_module("shark_torchrec.pruning.recipe")
GOOD = "\t".join(["0"] + ["1"] * 13 + ["ab"] * 26)  # one Criteo line
SMALL_MODEL = ["--embedding_dim", "4", "--dense_arch_layer_sizes", "8,4", "--over_arch_layer_sizes", "8,1",
               "--num_embeddings", "10", "--log_level", "WARNING"]


def _criteo_dir(tmp_path: Path, train_lines: int, test_lines: int) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.tsv").write_text("".join(GOOD + "\n" for _ in range(train_lines)))
    (d / "test.tsv").write_text("".join(GOOD + "\n" for _ in range(test_lines)))
    return d


def _fails_with(job, argv, capsys) -> str:
    """Run a recipe's job in this process; it must stop with status 1 and one error line."""
    parse = {train_dlrm.run: parse_train, pipeline.run: parse_pipeline, prune_dlrm.run: parse_prune}[job]
    config = parse(argv)
    with pytest.raises(SystemExit) as e:
        job(config)
    assert e.value.code == 1
    return capsys.readouterr().err


def test_train_recipe_refuses_an_empty_train_file(tmp_path: Path, capsys) -> None:
    d = _criteo_dir(tmp_path, 0, 5)
    err = _fails_with(train_dlrm.run, ["--data", "criteo", "--data_path", str(d), "--batch_size", "4",
                                       "--out", str(tmp_path / "out"), *SMALL_MODEL], capsys)
    assert f"no training rows were read from {d / 'train.tsv'}: no data lines" in err
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained, nothing saved


def test_train_recipe_refuses_fewer_rows_than_one_batch(tmp_path: Path, capsys) -> None:
    d = _criteo_dir(tmp_path, 7, 5)
    err = _fails_with(train_dlrm.run, ["--data", "criteo", "--data_path", str(d), "--batch_size", "8",
                                       "--out", str(tmp_path / "out"), *SMALL_MODEL], capsys)
    assert (f"no training rows were read from {d / 'train.tsv'}: 7 data line(s), fewer than one global "
            f"batch of 8 (--batch_size 8 × 1 process(es))") in err


def test_train_recipe_refuses_an_empty_test_file(tmp_path: Path, capsys) -> None:
    d = _criteo_dir(tmp_path, 20, 0)
    err = _fails_with(train_dlrm.run, ["--data", "criteo", "--data_path", str(d), "--batch_size", "4",
                                       "--out", str(tmp_path / "out"), *SMALL_MODEL], capsys)
    assert f"no test rows to evaluate on in {d / 'test.tsv'}: no data lines" in err


def test_limits_of_zero_are_refused_when_parsed(capsys) -> None:
    for flag in ("--limit_train_batches", "--limit_test_batches"):
        with pytest.raises(SystemExit) as e:
            parse_train([flag, "0"])
        assert e.value.code == 2
        assert f"argument {flag}: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_shark_recipe_refuses_a_header_only_csv(tmp_path: Path, capsys) -> None:
    schema = tmp_path / "s.yaml"
    schema.write_text("label: click\ncategorical: [x]\n")
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("click,x\n")
    test.write_text("click,x\n1,a\n")
    err = _fails_with(pipeline.run, ["--data", "csv", "--schema", str(schema), "--train_files", str(train),
                                     "--test_files", str(test), "--batch_size", "2",
                                     "--out", str(tmp_path / "out"), *SMALL_MODEL], capsys)
    assert f"no training rows were read from {train}: no data lines" in err


def test_prune_recipe_refuses_an_empty_test_file_before_evaluating(tmp_path: Path, capsys) -> None:
    d = _criteo_dir(tmp_path, 20, 0)
    run_dir = tmp_path / "trained"  # never read: the data is checked first
    run_dir.mkdir()
    err = _fails_with(prune_dlrm.run, ["--data", "criteo", "--data_path", str(d), "--batch_size", "4",
                                       "--from_run", str(run_dir), "--keep_fields", "3",
                                       "--out", str(tmp_path / "out"), *SMALL_MODEL], capsys)
    assert f"no test rows to evaluate on in {d / 'test.tsv'}: no data lines" in err


def test_a_split_that_leaves_no_test_rows(tmp_path: Path) -> None:
    log = tmp_path / "one.tsv"
    log.write_text("".join(GOOD + "\n" for _ in range(12)))
    split = LineSplit(test_fraction=0.02, seed=0)
    # Reference: none of the 12 lines falls in the test part (checked with the split's own rule).
    assert all(split.split_of(str(log), n) == "train" for n in range(1, 13))
    run = parse_train(["--data", "criteo", "--train_files", str(log), "--test_fraction", "0.02",
                       "--batch_size", "4"])
    spec = train_dlrm.data_spec_from(run.data)
    with pytest.raises(NoRowsError, match=rf"no test rows to evaluate on in {log} \(the test part of a seeded "
                                          rf"line split \(seed 0\).*\): no data lines"):
        require_rows(spec, 4, world_size=1)
    require_rows(spec, 4, world_size=1, test=False)  # training alone would be fine: 3 steps
    # One test row per process at least: 2 rows for 3 processes are too few.
    (tmp_path / "two.tsv").write_text(GOOD + "\n" + GOOD + "\n")
    run = parse_train(["--data", "criteo", "--train_files", str(log), "--test_files", str(tmp_path / "two.tsv"),
                       "--batch_size", "1"])
    with pytest.raises(NoRowsError, match="too few test rows .*two.tsv: 2 data line"):
        require_rows(train_dlrm.data_spec_from(run.data), 1, world_size=3)
