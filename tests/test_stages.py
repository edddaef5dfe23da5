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


def test_runs_share_the_stages_whose_keys_agree_and_only_those(tmp_path: Path) -> None:
    """StageSharing links a finished stage into another run only where the keys say the same
    stage would be computed; which stages those are follows from the keys, not from flags."""
    from shark_torchrec.stages import StageSharing

    def finish(out: Path, stage: str, inputs: dict, upstream: list) -> str:
        (out / stage).mkdir(parents=True, exist_ok=True)
        (out / stage / "model.pt").write_text(f"{stage} of {out.name}")
        return StageStore(str(out)).save(stage, inputs, upstream, {"checkpoint": f"{stage}/model.pt"})

    sharing = StageSharing(["train", "prune"])
    a = tmp_path / "a"
    ka = {"train": finish(a, "train", {"lr": 0.1}, [])}
    ka["prune"] = finish(a, "prune", {"keep": 3}, [ka["train"]])
    sharing.finished(str(a), ka)
    # b: the same training, another pruning -> only the train stage is linked
    kb = {"train": StageStore.key({"lr": 0.1}), "prune": StageStore.key({"keep": 2}, [StageStore.key({"lr": 0.1})])}
    b = tmp_path / "b"
    assert sharing.link(str(b), kb) == ["train"]
    assert StageStore(str(b)).load("train", {"lr": 0.1}) == {"checkpoint": "train/model.pt"}
    assert (b / "train" / "model.pt").read_text() == "train of a"
    assert not (b / "prune").exists()
    assert sharing.link(str(b), kb) == []  # already there, with its key
    # c: another training -> nothing shared (its prune stage would build on another model too)
    kc = {"train": StageStore.key({"lr": 0.2}), "prune": StageStore.key({"keep": 3}, [StageStore.key({"lr": 0.2})])}
    assert sharing.link(str(tmp_path / "c"), kc) == []
    # d: everything the same as a -> both stages
    assert sharing.link(str(tmp_path / "d"), ka) == ["train", "prune"]
    # a stale stage in the target (other inputs) is replaced by the shared one
    e = tmp_path / "e"
    finish(e, "train", {"lr": 0.3}, [])
    assert sharing.link(str(e), ka) == ["train", "prune"]
    assert StageStore(str(e)).read("train")["key"] == ka["train"]


def test_a_linked_stage_that_runs_again_leaves_the_run_it_came_from_alone(tmp_path: Path) -> None:
    """A run directory whose stage was linked from another run (hard links), run again with other
    inputs, wrote some files in place (``torch.save`` to a path, a plan opened for writing): the
    other run's finished stage changed under its record (audit).  The links are broken first."""
    from shark_torchrec.stages import StageRunner, StageSharing

    a = tmp_path / "a"
    runner = StageRunner(str(a), {"quantize": {"budget": 0.5}})
    assert runner.finished("quantize") is None
    (a / "quantize").mkdir(parents=True)
    (a / "quantize" / "row_tiers.pt").write_text("tiers at 0.5")
    runner.save("quantize", {"tiers": "quantize/row_tiers.pt"})
    sharing = StageSharing(["quantize"])
    sharing.finished(str(a), runner.keys)
    b = tmp_path / "b"
    assert sharing.link(str(b), runner.keys) == ["quantize"]
    again = StageRunner(str(b), {"quantize": {"budget": 0.2}})
    assert again.finished("quantize") is None
    assert not (b / "quantize" / "row_tiers.pt").exists()  # (this run's link gone, a's file kept)
    with open(b / "quantize" / "row_tiers.pt", "w") as f:  # what an in-place write does
        f.write("tiers at 0.2")
    assert (a / "quantize" / "row_tiers.pt").read_text() == "tiers at 0.5"
    # a matching record run again on purpose (its outputs elsewhere are another run's)
    assert sharing.link(str(tmp_path / "c"), runner.keys) == ["quantize"]
    c = StageRunner(str(tmp_path / "c"), {"quantize": {"budget": 0.5}})
    assert c.finished("quantize") is not None
    c.invalidate("quantize")
    assert not (tmp_path / "c" / "quantize" / "done.json").exists()
    assert not (tmp_path / "c" / "quantize" / "row_tiers.pt").exists()
    assert (a / "quantize" / "done.json").exists() and (a / "quantize" / "row_tiers.pt").exists()


def test_the_pipeline_knows_an_export_by_its_quantize_key(tmp_path: Path) -> None:
    """The export, report and figures lie outside ``OUT/quantize``: with every record linked
    from another run (or left by a run of other settings since), they were reported as this
    stage's (``report.json`` at budget 0.5, ``report.md`` and the export at 0.2; audit)."""
    import json

    from shark_torchrec.pipeline import _export_of

    assert not _export_of(str(tmp_path), "k1")  # no export
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "manifest.json").write_text(json.dumps({"metadata": {"stage_key": "k0"}}))
    assert not _export_of(str(tmp_path), "k1") and _export_of(str(tmp_path), "k0")
    (tmp_path / "model" / "manifest.json").write_text("{not json")
    assert not _export_of(str(tmp_path), "k0")


def test_a_stage_that_runs_drops_its_record_and_the_later_ones_first(tmp_path: Path) -> None:
    """A stage about to run (its inputs changed) removes its own record and those of the stages
    after it before it writes anything: a run killed half-way must not leave the old record,
    which a run with the old settings would trust over the files the killed run rewrote."""
    from shark_torchrec.stages import StageRunner

    old = {"train": {"lr": 0.05}, "prune": {"keep": 3}, "quantize": {"budget": 0.5}}
    runner = StageRunner(str(tmp_path), old)
    for stage in old:
        assert runner.finished(stage) is None
        runner.save(stage, {"done": stage})
    new = StageRunner(str(tmp_path), {**old, "prune": {"keep": 2}})
    assert new.finished("train") == {"done": "train"}
    assert (tmp_path / "prune" / "done.json").exists()
    assert new.finished("prune") is None  # runs now: from here on no record of the old settings
    assert not (tmp_path / "prune" / "done.json").exists()
    assert not (tmp_path / "quantize" / "done.json").exists()
    assert (tmp_path / "train" / "done.json").exists()
    # killed here; the old settings run the stages again instead of reading the new files
    again = StageRunner(str(tmp_path), old)
    assert again.finished("train") == {"done": "train"} and again.finished("prune") is None


def test_the_data_files_count_by_size_and_modification_time(tmp_path: Path) -> None:
    """A data file edited, truncated or added changes the key of the stage that reads it (the
    key once held only --data_path as text: a finished stage came back with the old metrics)."""
    import torch

    from shark_torchrec.cli_run import parse_pipeline
    from shark_torchrec.pipeline import stage_keys

    line = "\t".join(["1"] + ["1"] * 13 + ["a"] * 26) + "\n"
    for name in ("train.tsv", "test.tsv"):
        (tmp_path / name).write_text(line * 20)
    run = parse_pipeline(["--data", "criteo", "--data_path", str(tmp_path)])
    keys = stage_keys(run, torch.device("cpu"), 1)
    assert stage_keys(run, torch.device("cpu"), 1) == keys
    (tmp_path / "test.tsv").write_text(line * 10)
    truncated = stage_keys(run, torch.device("cpu"), 1)
    assert truncated["train"] != keys["train"]
    (tmp_path / "day_1.tsv").write_text(line)  # not a split file of --data_path's (train.* is)
    assert stage_keys(run, torch.device("cpu"), 1) == truncated
    (tmp_path / "dev.tsv").write_text(line * 5)  # a dev split appears
    assert stage_keys(run, torch.device("cpu"), 1)["train"] != truncated["train"]


def test_split_files_are_click_logs_once_each(tmp_path: Path) -> None:
    """A split's pattern takes click-log files only (not ``train.tsv.bak``), and a file beside
    its ``.gz`` twin is an error (both would be read: every row twice)."""
    from shark_torchrec.errors import SharkInputError
    from shark_torchrec.training.datasets import find_split_files

    (tmp_path / "train.tsv").write_text("x\n")
    (tmp_path / "train.tsv.bak").write_text("x\n")
    (tmp_path / "train.tsv~").write_text("x\n")
    assert find_split_files(str(tmp_path), "train") == [str(tmp_path / "train.tsv")]
    (tmp_path / "train.tsv.gz").write_bytes(b"")
    with pytest.raises(SharkInputError, match=r"train\.tsv and train\.tsv\.gz are both train files"):
        find_split_files(str(tmp_path), "train")


def test_criteo_days_are_read_in_order_and_a_held_out_day_is_not_trained_on(tmp_path: Path) -> None:
    """``day_N`` files come in the order of their days (``day_2`` before ``day_10``), and a test
    file that is also one of the train files found in ``--data_path`` (the Criteo 1TB layout
    with ``--test_files DIR/day_23``) is refused: its rows would be trained on."""
    from shark_torchrec.errors import FlagError
    from shark_torchrec.run_config import DataSection
    from shark_torchrec.training.datasets import find_split_files
    from shark_torchrec.training.train_dlrm import data_spec_from

    for day in (0, 1, 10, 2, 23):
        (tmp_path / f"day_{day}").write_text("1\t" + "\t" * 12 + "\t".join(["a"] * 26) + "\n")
    assert find_split_files(str(tmp_path), "train") == [str(tmp_path / f"day_{d}") for d in (0, 1, 2, 10, 23)]
    with pytest.raises(FlagError, match=r"day_23 is a test file and a train file too"):
        data_spec_from(DataSection(data="criteo", data_path=str(tmp_path), test_files=[str(tmp_path / "day_23")]))
    spec = data_spec_from(DataSection(data="criteo", train_files=[str(tmp_path / "day_[0-9]")],
                                      test_files=[str(tmp_path / "day_23")]))
    assert str(tmp_path / "day_23") not in spec.train_files and len(spec.train_files) == 3
