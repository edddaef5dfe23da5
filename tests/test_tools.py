"""The evaluation and benchmark tools run end to end on small shapes (numbers are not
asserted here: they are measured by the tools and reported in BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))


def test_spearman_against_hand_computed_values() -> None:
    from eval_field_pruning import spearman

    a = {"x": 1.0, "y": 2.0, "z": 3.0, "w": 4.0}
    assert spearman(a, {"x": 10, "y": 20, "z": 30, "w": 40}) == pytest.approx(1.0)
    assert spearman(a, {"x": 4, "y": 3, "z": 2, "w": 1}) == pytest.approx(-1.0)
    # ranks (0,1,2,3) vs (1,0,3,2): 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*4/60 = 0.6
    assert spearman(a, {"x": 2, "y": 1, "z": 4, "w": 3}) == pytest.approx(0.6)


def _run(script: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_eval_field_pruning_runs_end_to_end(tmp_path: Path) -> None:
    _run("eval_field_pruning.py", "--data", "synthetic", "--synthetic_num_fields", 6,
         "--synthetic_informative", 2, "--synthetic_cardinality", 300,
         "--synthetic_train_batches", 12, "--synthetic_test_batches", 2, "--embedding_dim", 8,
         "--dense_arch_layer_sizes", "16,8", "--over_arch_layer_sizes", "16,1",
         "--keep", "6,2", "--seeds", "0,1", "--out", tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["keep"] == [6, 2] and set(r["seeds"]) == {"0", "1"}
    s = r["seeds"]["0"]
    assert set(s["scores"]) == {"shark-mean", "shark-shuffle", "shark-zero", "permutation", "random"}
    assert set(s["auc"]["random"]) == {"6", "2"}
    assert (tmp_path / "auc_vs_fields.png").stat().st_size > 10_000
    assert "Spearman vs permutation" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_bench_importance_overhead_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    _run("bench_importance_overhead.py", "--fields", 4, "--rows", 1000, "--dim", 8,
         "--batch_size", 64, "--steps", 2, "--rounds", 1, "--out", out)
    r = json.loads(out.read_text())
    assert set(r["variants"]) == {"none", "pipeline (taylor mean + row counters)", "taylor (mean)",
                                  "taylor (shuffle)", "taylor (zero)", "row counters"}
    assert r["variants"]["none"]["ratio"][0] == 1.0 and r["variants"]["none"]["hook_ms"][0] == 0.0
    v = r["variants"]  # the trackers really ran (their hooks were entered)
    assert all(v[k]["hook_ms"][0] > 0 for k in v if k != "none")


@pytest.mark.slow
def test_eval_shark_pipeline_shares_training_and_scores_against_the_truth(tmp_path: Path) -> None:
    _run("eval_shark_pipeline.py", "--seeds", "0", "--variants", "shark,random", "--out", tmp_path,
         "--", "--data", "synthetic", "--synthetic_num_fields", 6, "--synthetic_informative", 2,
         "--synthetic_cardinality", 300, "--synthetic_train_batches", 8, "--synthetic_test_batches", 2,
         "--embedding_dim", 8, "--dense_arch_layer_sizes", "16,8", "--over_arch_layer_sizes", "16,1",
         "--batch_size", 32, "--keep_fields", 3, "--quant_budget_fraction", 0.5, "--bootstrap", 50)
    r = json.loads((tmp_path / "results.json").read_text())
    shark, rnd = r["runs"]["shark"]["0"], r["runs"]["random"]["0"]
    # one trained model: the variants' uncompressed references are the same model
    ref = "compressed vs uncompressed"
    assert shark["paired"][ref]["auc_reference"] == rnd["paired"][ref]["auc_reference"]
    assert shark["auc"]["trained"] == rnd["auc"]["trained"]
    truth = r["true_field_importance"]["0"]
    assert sorted(f for f, v in truth.items() if v > 0) == ["cat_0", "cat_1"]
    assert 0 <= shark["fields_vs_truth"]["recall_informative"] <= 1
    assert sum(shark["row_importance_by_tier"].values()) == pytest.approx(1.0)
    assert "Spearman vs truth" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "delta_auc.png").stat().st_size > 5_000


@pytest.mark.slow
def test_eval_rowwise_quant_runs_with_paired_intervals(tmp_path: Path) -> None:
    _run("eval_rowwise_quant.py", "--data", "synthetic", "--synthetic_num_fields", 4,
         "--synthetic_informative", 2, "--synthetic_cardinality", 3000,
         "--synthetic_train_batches", 6, "--synthetic_test_batches", 2, "--embedding_dim", 16,
         "--dense_arch_layer_sizes", "16,16", "--over_arch_layer_sizes", "16,1",
         "--seeds", "0", "--bootstrap", 50, "--out", tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    q = r["seeds"]["0"]["quantized"]
    fp32 = r["seeds"]["0"]["fp32"]["auc"]
    for row in q.values():  # the paired ΔAUC is the AUC difference on the same rows
        assert row["paired"]["delta_auc"] == pytest.approx(row["auc"] - fp32, abs=1e-5)
        lo, hi = row["paired"]["ci"]
        assert lo <= row["paired"]["delta_auc"] <= hi
    assert "CI per seed" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_sweep_shares_the_stages_a_setting_does_not_change(tmp_path: Path) -> None:
    _run("sweep_shark_pipeline.py", "--out", tmp_path, "--grid", "quant_budget_fraction=0.2,0.1",
         "--", "--data", "synthetic", "--synthetic_num_fields", 4, "--synthetic_informative", 2,
         "--synthetic_cardinality", 2000, "--synthetic_train_batches", 6, "--synthetic_test_batches", 2,
         "--embedding_dim", 16, "--dense_arch_layer_sizes", "16,16", "--over_arch_layer_sizes", "16,1",
         "--batch_size", 32, "--keep_fields", 3, "--bootstrap", 50)
    r = json.loads((tmp_path / "results.json").read_text())
    a, b = r["points"]
    step = "pruning step (pruned vs uncompressed)"
    assert a["paired"][step] == b["paired"][step]  # one pruned model for both budgets
    assert a["bytes_saved"] < b["bytes_saved"]
    assert (tmp_path / "tradeoff.png").stat().st_size > 5_000


@pytest.mark.slow
def test_frontier_plans_every_method_with_its_flags() -> None:
    """Each method's runs and the flags that make it that method (every point's budget, the
    tiers, the row fit, the priorities; the hashed runs train their own model)."""
    import frontier

    runs = {name: (method, point, flags, shares) for method, point, name, flags, shares
            in frontier.planned_runs(list(frontier.METHODS), [0.8, 0.93])}
    assert len(runs) == 4 * 2 + 3 + 2 + 2
    shared = ["--quant_tiers", "fp16,int8,int4,int2,shared"]
    assert runs["shark_0.2"] == ("shark", "80%", ["--quant_budget_fraction", "0.2", *shared], True)
    assert runs["shark-drop_0.07"][2] == ["--quant_budget_fraction", "0.07", "--quant_tiers", "fp16,int8,int4,int2,drop"]
    assert runs["shark-lsq_0.2"][2] == ["--quant_budget_fraction", "0.2", *shared, "--quant_row_fit", "lsq"]
    assert runs["frequency_0.07"][:3] == ("frequency", "93%", ["--quant_budget_fraction", "0.07", *shared,
                                                              "--row_priority", "frequency"])
    assert runs["uniform_int2"][2] == ["--quant_fractions", "int2=1"]
    assert runs["uniform-lsq_int4"][2] == ["--quant_fractions", "int4=1", "--quant_row_fit", "lsq"]
    assert runs["hashed_0.2"] == ("hashed", "80%", ["--hash_rows_fraction", "0.2", "--quant_fractions", "fp32=1"], False)
    assert all(shares for name, (_, _, _, shares) in runs.items() if not name.startswith("hashed"))


def test_frontier_pairs_every_method_against_the_same_uncompressed_model(tmp_path: Path) -> None:
    recipe = ["--data", "synthetic", "--synthetic_num_fields", 4, "--synthetic_informative", 2,
              "--synthetic_cardinality", 300, "--synthetic_train_batches", 8, "--synthetic_test_batches", 2,
              "--embedding_dim", 32, "--dense_arch_layer_sizes", "16,32", "--over_arch_layer_sizes", "16,1",
              "--batch_size", 32, "--bootstrap", 50]
    # (a subset of the methods keeps this test's time down: shark-drop, frequency and uniform-lsq
    # are the same runs with other flags: test_frontier_plans_every_method_with_its_flags)
    methods = "shark,shark-lsq,uniform,hashed"
    _run("frontier.py", "--seeds", 0, "--saved", "0.8", "--bootstrap", 50, "--methods", methods,
         "--out", tmp_path, "--", *recipe)
    r = json.loads((tmp_path / "results.json").read_text())
    m = r["methods"]
    assert set(m) == {"shark", "shark-lsq", "uniform int8", "uniform int4", "uniform int2", "hashed"}
    # TorchRec's layout, 1-byte rows: dim 32 -> int8 36 bytes, int4 20, int2 12 (fp16 scale and
    # bias) per 128-byte fp32 row, no id map
    for tier, row in (("int8", 36), ("int4", 20), ("int2", 12)):
        assert m[f"uniform {tier}"][tier]["bytes_saved"] == pytest.approx(1 - row / 128)
    fitted = (tmp_path / "seed0" / "shark-lsq_0.2" / "quantize" / "done.json").read_text()
    assert '"quant_row_fit": "lsq"' in fitted  # the fit keys its quantize stage
    assert m["hashed"]["80%"]["bytes_saved"] == pytest.approx(1 - 60 / 300)  # 300-row tables -> 60 rows
    # the tool's pairing reproduces the pipeline's own paired comparison (same rows, same model)
    own = json.loads((tmp_path / "seed0" / "uniform_int4" / "report.json").read_text())
    paired = own["paired"]["compressed vs uncompressed"]
    assert m["uniform int4"]["int4"]["per_seed"]["0"]["delta_auc"] == pytest.approx(paired["delta_auc"], abs=1e-12)
    shark = json.loads((tmp_path / "seed0" / "shark_0.2" / "report.json").read_text())
    assert m["shark"]["80%"]["bytes_saved"] == shark["stages"]["quantized"]["bytes_saved_fraction"] >= 0.8
    # one trained model: the hashed run trained its own, the others share the first run's
    assert (tmp_path / "seed0" / "uniform_int4" / "train" / "done.json").read_text() == (
        tmp_path / "seed0" / "shark_0.2" / "train" / "done.json").read_text()
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert "| hashed | 80% | 80.0% |" in (tmp_path / "summary.md").read_text()
    # A finished run that compressed another model than the one it is paired against (e.g. one
    # left by other code) is refused by name, never paired: its ΔAUC would mix in the models'
    # difference.
    import torch

    path = tmp_path / "seed0" / "uniform_int4" / "quantize" / "predictions.pt"
    pred = torch.load(path, weights_only=True)
    torch.save({**pred, "reference": pred["reference"] + 0.5}, path)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "frontier.py"), "--seeds", "0", "--saved", "0.8",
                           "--bootstrap", "50", "--methods", methods, "--out", str(tmp_path), "--", *map(str, recipe)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode != 0 and "uniform_int4: compresses another model than" in proc.stderr, proc.stderr[-3000:]
