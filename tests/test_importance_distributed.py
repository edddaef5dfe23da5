"""SHARK field scores and row priorities on DMP-sharded models under torchrun: world-size
independence, TorchRec's train pipelines, and the planted fields of the synthetic data."""

from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_torchrun

SCRIPT = ROOT / "tests" / "scripts" / "importance_run.py"


@pytest.mark.slow
def test_two_processes_and_train_pipeline_match_one_process(tmp_path: Path) -> None:
    runs = {}
    for name, nproc, pipeline in [("1", 1, "none"), ("2", 2, "none"), ("2-sparse-dist", 2, "sparse_dist")]:
        out = tmp_path / f"{name}.pt"
        run_torchrun(SCRIPT, ["--out", out, "--steps", 4, "--global_batch", 64, "--pipeline", pipeline],
                     nproc=nproc)
        runs[name] = torch.load(out, weights_only=False)
    ref = runs["1"]["scores"]
    for name in ("2", "2-sparse-dist"):
        for baseline, scores in runs[name]["scores"].items():
            assert runs[name]["seen"][baseline] == runs["1"]["seen"][baseline]
            for f, v in scores.items():
                assert v == pytest.approx(ref[baseline][f], rel=1e-5), (name, baseline, f)
    # Row priorities: equal to the single-process ones after reduction.
    for name in ("2", "2-sparse-dist"):
        for table, ref_p in runs["1"]["priorities"].items():
            assert ref_p.sum() > 0
            torch.testing.assert_close(runs[name]["priorities"][table], ref_p, rtol=1e-5, atol=1e-9)
    # The baselines really differ (a test that cannot tell them apart would prove nothing).
    assert ref["mean"] != ref["shuffle"] != ref["zero"]


@pytest.mark.slow
def test_every_baseline_ranks_planted_fields_above_noise(tmp_path: Path) -> None:
    out = tmp_path / "planted.pt"
    run_torchrun(SCRIPT, ["--out", out, "--fields", 12, "--informative", 4, "--cardinality", 1000,
                          "--steps", 150, "--global_batch", 256, "--lr", 0.05], nproc=2)
    run = torch.load(out, weights_only=False)
    for baseline, scores in run["scores"].items():
        lowest_planted = min(scores[f] for f in run["informative"])
        highest_noise = max(scores[f] for f in run["noise"])
        assert lowest_planted > highest_noise, (baseline, scores)


def test_a_sharded_feature_processed_collection_is_refused() -> None:
    """No forward hook sees a batch of a DMP-sharded FeatureProcessedEmbeddingBagCollection
    (every score was NaN, silently): the tracker refuses it; the unsharded one is scored."""
    proc = run_torchrun(ROOT / "tests" / "scripts" / "fp_ebc_sharded_run.py", [], nproc=1)
    assert "refused: the collection at" in proc.stdout
