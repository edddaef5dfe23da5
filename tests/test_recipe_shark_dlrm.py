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


@pytest.mark.slow
def test_killed_after_pruning_resumes_to_the_same_result(tmp_path: Path) -> None:
    """SIGKILL the whole torchrun job as soon as the pruning stage has finished (mid-way through
    quantization, typically), then start it again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    full, part = tmp_path / "full", tmp_path / "part"
    run_torchrun(RECIPE, [*SMALL, "--out", full], nproc=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(RECIPE), *map(str, SMALL), "--out", str(part)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline = time.time() + 240
    while not (part / "prune" / "done.json").exists():
        assert proc.poll() is None, "the run ended before the pruning stage finished"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_torchrun(RECIPE, [*SMALL, "--out", part], nproc=2)
    a = json.loads((full / "report.json").read_text())
    b = json.loads((part / "report.json").read_text())
    a.pop("lookup_speed_vs_fp32"), b.pop("lookup_speed_vs_fp32")
    assert a == b


@pytest.mark.slow
def test_init_from_iterative_pruning_fractions_and_overrides(tmp_path: Path) -> None:
    base = tmp_path / "base"
    run_torchrun(ROOT / "recipes" / "train_dlrm.py", [*SMALL[:-8], "--out", base], nproc=2)
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("tables:\n  t_cat_7:\n    compression:\n      never_prune: true\n"
                         "  t_cat_0:\n    compression:\n      pin: fp16\n")
    out = tmp_path / "shark"
    args = [a for a in SMALL if a not in ("--quant_budget_fraction", 0.5)]
    run_torchrun(RECIPE, [*args, "--init_from", base, "--prune_rounds", 2, "--score_batches", 3,
                          "--finetune_steps", 2, "--quant_fractions", "fp16=0.5,int4=0.5",
                          "--planner_overrides", overrides, "--out", out], nproc=2)
    r = json.loads((out / "report.json").read_text())
    assert r["plan"]["fields_after"] == 4 and "cat_7" not in r["plan"]["dropped_features"]
    model, info = load_export(str(out / "model.pt"))
    tables = {t["name"]: t for t in info["model"]["embedding"]["tables"]}
    rows = info["model"]["embedding"]["rows"]
    tiers = info["model"]["embedding"]["tiers"]
    if "t_cat_0" in tables:  # pinned to one tier
        assert [t for t, n in zip(tiers, rows["t_cat_0"]) if n] == ["fp16"]
    others = [n for n in rows if n != "t_cat_0"]
    assert all(sorted(t for t, n in zip(tiers, rows[n]) if n) == ["fp16", "int4"] for n in others)
