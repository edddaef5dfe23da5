"""The README's worked example runs as shown: a DMP-sharded TorchRec DLRM trained with
TrainPipelineSparseDist, SHARK's trackers attached, compressed where its shards lie."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_torchrun


@pytest.mark.slow
def test_dmp_train_pipeline_example(tmp_path: Path) -> None:
    proc = run_torchrun(ROOT / "examples" / "dmp_train_pipeline.py",
                        ["--out", tmp_path, "--rows", 1000, "--steps", 40], nproc=2)
    r = json.loads((tmp_path / "result.json").read_text())
    scores = r["field_scores"]
    assert len(scores) == 8 and all(s > 0 for s in scores.values())
    # the planted informative fields score highest
    assert set(sorted(scores, key=scores.get, reverse=True)[:3]) == set(r["informative_fields"])
    # every row has a tier, most in the small ones; the compressed model still ranks well
    for counts in r["rows_per_tier"].values():
        assert sum(counts) == 1000 and counts[0] == 0  # no FP32 rows
    assert r["budget_bytes"] == int(0.15 * r["fp32_bytes"])
    assert r["trained_auc"] > 0.8 and abs(r["compressed_auc"] - r["trained_auc"]) < 0.02
    assert "top fields" in proc.stdout
