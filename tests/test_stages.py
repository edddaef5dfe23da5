"""The stage records of a job (shark_torchrec/stages.py): keyed by their inputs, written
atomically, paths relative to the run directory, damaged records named."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from shark_torchrec.stages import RECORD_FORMAT, StageRecordError, StageStore


def test_a_record_is_reused_only_with_the_same_inputs_and_upstream(tmp_path: Path, caplog) -> None:
    store = StageStore(str(tmp_path))
    inputs = {"epochs": 1, "layers": (16, 8), "path": None}
    assert store.load("train", inputs) is None
    key = store.save("train", inputs, [], {"auc": 0.7})
    assert key == store.key({"layers": [16, 8], "path": None, "epochs": 1})  # canonical: order, tuples
    assert store.load("train", dict(inputs)) == {"auc": 0.7}
    with caplog.at_level(logging.WARNING, logger="shark_torchrec.stages"):
        assert store.load("train", {**inputs, "epochs": 2}) is None
    assert "its inputs changed: epochs 1 -> 2" in caplog.text
    # the same inputs after another upstream stage: not the same stage
    store.save("prune", {"keep": 3}, [key], {"fields": 3})
    assert store.load("prune", {"keep": 3}, [key]) == {"fields": 3}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shark_torchrec.stages"):
        assert store.load("prune", {"keep": 3}, [store.key({"epochs": 2})]) is None
    assert "a stage before it was run again" in caplog.text
    assert not list(tmp_path.rglob("*.tmp"))  # written by rename


@pytest.mark.parametrize("text,what", [("garbage{", "damaged stage record"), ("", "damaged stage record"),
                                       ('{"format": "shark-stage/1", "key": "ab", "res', "damaged stage record"),
                                       ("{}", "not a stage record of this version"),
                                       ('{"metrics": {}, "checkpoint": "/abs/path"}', "not a stage record"),
                                       ("[1, 2]", "not a stage record")])
def test_a_damaged_record_is_an_error_naming_the_file(tmp_path: Path, text: str, what: str) -> None:
    (tmp_path / "prune").mkdir()
    (tmp_path / "prune" / "done.json").write_text(text)
    with pytest.raises(StageRecordError, match=f"prune/done.json: {what}.*delete .*prune to run the 'prune' "
                                               "stage again"):
        StageStore(str(tmp_path)).load("prune", {})


def test_paths_in_records_are_relative_so_a_copied_run_reads_its_own_files(tmp_path: Path) -> None:
    a = StageStore(str(tmp_path / "a"))
    ckpt = tmp_path / "a" / "train" / "checkpoints" / "step_0"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("weights of a")
    a.save("train", {"x": 1}, [], {"checkpoint": a.rel(str(ckpt))})
    record = json.loads((tmp_path / "a" / "train" / "done.json").read_text())
    assert record["format"] == RECORD_FORMAT and record["result"]["checkpoint"] == os.path.join(
        "train", "checkpoints", "step_0")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "train" / "checkpoints" / "step_0").write_text("weights of b")
    b = StageStore(str(tmp_path / "b"))
    path = b.resolve(b.load("train", {"x": 1})["checkpoint"])
    assert Path(path).read_text() == "weights of b"
    with pytest.raises(ValueError, match="outside the run directory"):
        a.rel(str(tmp_path / "elsewhere"))
