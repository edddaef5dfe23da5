"""Pruning a DMP-sharded DLRM under torchrun equals pruning the gathered unsharded model;
iterative pruning reaches its target."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_torchrun

SCRIPT = ROOT / "tests" / "scripts" / "prune_run.py"


@pytest.mark.slow
@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_sharded_pruning_matches_unsharded_reference(tmp_path: Path, interaction: str) -> None:
    run_torchrun(SCRIPT, ["--out", tmp_path, "--interaction", interaction], nproc=2)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["new_features"] == ["cat_0", "cat_1", "cat_2"]
    assert r["max_weight_err"] == 0.0  # every carried weight is exactly the reference's
    assert r["max_logit_err"] < 1e-5
    # a fine-tuning step equals the unpruned model's step with the dropped tables zeroed:
    # the optimizer state came along (a fresh state moves weights by ~ the learning rate)
    assert r["max_finetune_step_change"] > 1e-3
    assert r["max_finetune_step_err"] < 1e-5
    assert len(r["iterative_features"]) == 1
    # by mean replacement: the same means and predictions as the unsharded reference
    assert r["mean_filled"] == ["cat_3", "cat_4", "cat_5"]
    assert r["max_mean_err"] < 1e-6 and r["max_mean_logit_err"] < 1e-5
    assert len(r["iterative_mean_features"]) == 1 and sorted(r["iterative_mean_filled"]) == sorted(
        f"cat_{i}" for i in range(6) if f"cat_{i}" not in r["iterative_mean_features"])
