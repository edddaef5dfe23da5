"""recipes/train_dlrm.py end to end: real samples, both DLRM variants, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_torchrun, shared_file

RECIPE = ROOT / "recipes" / "train_dlrm.py"


@pytest.mark.slow
def test_criteo_kaggle_sample_reaches_auc_070(tmp_path: Path) -> None:
    # 2 processes (one plain process is covered by the Avazu test below).
    nproc = 2
    data = shared_file("criteo_kaggle_sample")
    out = tmp_path / "run"
    run_torchrun(RECIPE, ["--data", "criteo", "--data_path", data, "--batch_size", 128 // nproc,
                          "--epochs", 1, "--out", out, "--log_level", "WARNING"], nproc=nproc)
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] and m["world_size"] == nproc
    assert m["test_examples"] == 391  # every line of test.tsv, across ranks
    assert m["steps"] == 7200 // 128
    assert m["test_auc"] >= 0.70, m["test_auc"]
    assert 0 < m["test_log_loss"] < 0.6 and m["examples_per_second"] > 0
    assert (out / "checkpoints" / "latest").is_file()


@pytest.mark.slow
def _run_plain(*args) -> subprocess.CompletedProcess:
    """The recipe as one plain process (no torchrun)."""
    return subprocess.run([sys.executable, str(RECIPE), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_avazu_sample_dcn_single_plain_process(tmp_path: Path) -> None:
    data = shared_file("avazu_sample")
    out = tmp_path / "run"
    proc = _run_plain("--data", "avazu", "--data_path", data, "--batch_size", 256,
                      "--interaction_type", "dcn", "--num_embeddings", 20000, "--out", out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 1 and m["test_examples"] == 432
    assert m["test_auc"] > 0.6, m["test_auc"]


def test_bad_data_file_error_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = "\t".join(["0"] + ["1"] * 13 + ["ab"] * 26)
    (data / "train.tsv").write_text("\n".join([good] * 5 + ["1\t2\t3"] + [good] * 4) + "\n")
    (data / "test.tsv").write_text(good + "\n")
    proc = _run_plain("--data", "criteo", "--data_path", data, "--batch_size", 4,
                      "--num_embeddings", 10, "--out", tmp_path / "out")
    assert proc.returncode != 0
    assert f"{data / 'train.tsv'}:6: expected 40 columns" in proc.stderr
