"""recipes/shark_dlrm.py end to end on small synthetic data with 2 processes: every stage runs,
the export loads and predicts like the pipeline's model, and a run stopped after pruning and
resumed ends with exactly the uninterrupted run's result."""

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_torchrun
from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.export import load_export

RECIPE = ROOT / "recipes" / "shark_dlrm.py"
SMALL = ["--data", "synthetic", "--synthetic_num_fields", 8, "--synthetic_informative", 3,
         "--synthetic_cardinality", 500, "--synthetic_train_batches", 12, "--synthetic_test_batches", 3,
         "--embedding_dim", 8, "--dense_arch_layer_sizes", "16,8", "--over_arch_layer_sizes", "16,1",
         "--batch_size", 32, "--keep_fields", 4, "--quant_budget_fraction", 0.5,
         "--log_level", "WARNING"]


@pytest.mark.slow
def test_pipeline_runs_resumes_and_exports(tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    run_torchrun(RECIPE, [*SMALL, "--out", full], nproc=2)
    run_torchrun(RECIPE, [*SMALL, "--out", part, "--stop_after", "prune"], nproc=2)
    assert (part / "prune" / "done.json").is_file() and not (part / "quantize").exists()
    run_torchrun(RECIPE, [*SMALL, "--out", part], nproc=2)
    a = json.loads((full / "report.json").read_text())
    b = json.loads((part / "report.json").read_text())
    a.pop("lookup_speed_vs_fp32"), b.pop("lookup_speed_vs_fp32")  # a timing: differs run to run
    assert a == b  # every stage's metrics, bytes and the plan
    for name in ("report.md", "field_scores.png", "auc_by_stage.png", "bytes_per_table.png",
                 "row_priorities.png"):
        assert (full / name).stat().st_size > 0, name
    assert "saved" in (full / "report.md").read_text()
    assert a["plan"]["fields_after"] == 4
    q = a["stages"]["quantized"]
    # 4 of 8 equal tables kept, then half of their fp32 bytes (id maps and padding included).
    assert q["embedding_bytes"] <= 0.5 * (q["fp32_embedding_bytes"] * 4 / 8)
    assert q["bytes_saved_fraction"] >= 0.75
    model_a, info = load_export(str(full / "model.pt"))
    model_b, _ = load_export(str(part / "model.pt"))
    assert info["metadata"]["test_auc"] == q["auc"]
    kept = [f for t in info["model"]["embedding"]["tables"] for f in t["features"]]
    cfg = SyntheticConfig.default(num_fields=8, num_informative=3, cardinality=500, seed=0)
    batch = SyntheticClickDataset(cfg, 64, 1, batch_offset=123).global_batch(0)
    kjt = batch.sparse_features
    batch.sparse_features = kjt.permute([kjt.keys().index(f) for f in kept])
    with torch.no_grad():
        assert torch.equal(model_a(batch)[1][1], model_b(batch)[1][1])
