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


# (--attribute_quant_loss: its report section is checked, and resuming must reproduce it too)
ARGS = [*SMALL, "--attribute_quant_loss"]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """One uninterrupted run of the pipeline, the reference of the resumed ones — with every
    way of gathering a sharded table made to raise (tests/scripts/no_gather_run.py): it
    compresses, evaluates and exports where the shards lie."""
    out = tmp_path_factory.mktemp("shark_recipe") / "full"
    run_torchrun(ROOT / "tests" / "scripts" / "no_gather_run.py", [*ARGS, "--out", out], nproc=2)
    return out


@pytest.mark.slow
def test_pipeline_runs_resumes_and_exports(tmp_path: Path, full: Path) -> None:
    part = tmp_path / "part"
    args = ARGS
    run_torchrun(RECIPE, [*args, "--out", part, "--stop_after", "prune"], nproc=2)
    assert (part / "prune" / "done.json").is_file() and not (part / "quantize").exists()
    run_torchrun(RECIPE, [*args, "--out", part], nproc=2)
    a = json.loads((full / "report.json").read_text())
    b = json.loads((part / "report.json").read_text())
    a.pop("lookup_speed_vs_fp32"), b.pop("lookup_speed_vs_fp32")  # a timing: differs run to run
    assert a == b  # every stage's metrics, bytes and the plan
    for name in ("report.md", "field_scores.png", "auc_by_stage.png", "bytes_per_table.png",
                 "row_priorities.png"):
        assert (full / name).stat().st_size > 0, name
    assert "saved; rows padded to 1 byte)" in (full / "report.md").read_text()  # auto on CPU
    assert a["plan"]["fields_after"] == 4
    # Paired comparisons (rank 0, unsharded models) agree with the stages' own evaluations
    # (sharded over 2 processes for the trained models, torchmetrics' AUC).
    paired = a["paired"]
    c = paired["compressed vs uncompressed"]
    assert c["examples"] == a["stages"]["quantized"]["examples"] == 3 * 64
    assert c["auc"] == pytest.approx(a["stages"]["quantized"]["auc"], abs=1e-6)
    assert c["auc_reference"] == pytest.approx(a["stages"]["uncompressed, fine-tuned"]["auc"], abs=1e-5)
    assert paired["pruning step (pruned vs uncompressed)"]["auc"] == pytest.approx(
        a["stages"]["pruned"]["auc"], abs=1e-5)
    assert c["delta_auc_ci"][0] <= c["delta_auc"] <= c["delta_auc_ci"][1]
    assert "ΔAUC" in c["verdict"] and "Paired on the same" in (full / "report.md").read_text()
    # The loss attribution's end points are the quantized and the pruned (fp32) models.
    attribution = a["quant_loss_attribution"]
    assert attribution["auc"]["quantized"] == pytest.approx(c["auc"], abs=1e-9)
    assert attribution["auc"]["fp32"] == pytest.approx(
        paired["quantization step (quantized vs pruned)"]["auc_reference"], abs=1e-9)
    kept_tables = {f"t_cat_{i}" for i in range(8)} - set(a["plan"]["dropped_tables"])
    assert set(attribution["tables"]) == kept_tables and len(kept_tables) == 4 and attribution["tiers"]
    assert "Where the quantization step loses" in (full / "report.md").read_text()
    q = a["stages"]["quantized"]
    # 4 of 8 equal tables kept, then half of their fp32 bytes (id maps and padding included).
    assert q["embedding_bytes"] <= 0.5 * (q["fp32_embedding_bytes"] * 4 / 8)
    assert q["bytes_saved_fraction"] >= 0.75
    # the sharded export, loaded whole by this one process
    model_a, info = load_export(str(full / "model"))
    model_b, _ = load_export(str(part / "model"))
    assert info["metadata"]["test_auc"] == q["auc"]
    assert {p["rank"] for p in json.loads((full / "model" / "manifest.json").read_text())["parts"]} == {0, 1}
    kept = [f for t in info["placement"].tables for f in t["features"]]
    cfg = SyntheticConfig.default(num_fields=8, num_informative=3, cardinality=500, seed=0)
    batch = SyntheticClickDataset(cfg, 64, 1, batch_offset=123).global_batch(0)
    kjt = batch.sparse_features
    batch.sparse_features = kjt.permute([kjt.keys().index(f) for f in kept])
    with torch.no_grad():
        assert torch.equal(model_a(batch)[1][1], model_b(batch)[1][1])
    # The quantized stage was evaluated sharded over 2 processes (AUC and log loss reduced over
    # ranks); this one process, reading the same test rows whole, gets the same figures.
    from shark_torchrec.cli_run import parse_pipeline
    from shark_torchrec.training.distributed import DistEnv
    from shark_torchrec.training.train_dlrm import data_spec_from
    from shark_torchrec.training.trainer import evaluate_model

    run = parse_pipeline(ARGS)
    spec = data_spec_from(run.data, run.training.seed)
    rows = spec.batches(spec.dataset("test", 2 * run.training.batch_size, 0, 1), 0)  # 2 ranks' global batches
    one = evaluate_model(model_a, rows, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    assert one["examples"] == q["examples"]
    assert one["auc"] == pytest.approx(q["auc"], abs=1e-6)
    assert one["log_loss"] == pytest.approx(q["log_loss"], rel=1e-6)


@pytest.mark.slow
def test_killed_after_pruning_resumes_to_the_same_result(tmp_path: Path, full: Path) -> None:
    """SIGKILL the whole torchrun job as soon as the pruning stage has finished (mid-way through
    quantization, typically), then start it again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    part = tmp_path / "part"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(RECIPE), *map(str, ARGS), "--out", str(part)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline = time.time() + 240
    while not (part / "prune" / "done.json").exists():
        assert proc.poll() is None, "the run ended before the pruning stage finished"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_torchrun(RECIPE, [*ARGS, "--out", part], nproc=2)
    a = json.loads((full / "report.json").read_text())
    b = json.loads((part / "report.json").read_text())
    a.pop("lookup_speed_vs_fp32"), b.pop("lookup_speed_vs_fp32")
    assert a == b


KILL_ARGS = [*map(str, SMALL), "--epochs", "2", "--finetune_epochs", "2", "--checkpoint_every", "2"]


def _run_killable(out: Path, kill_at: int, loop: str = ""):
    """The pipeline in one process, SIGKILLed after step ``kill_at`` of ``loop`` (0: never)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, KILL_AT_STEP=str(kill_at), KILL_IN=loop, STEPS_FILE=str(out) + ".steps",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "kill_at_step.py"), str(RECIPE),
                           *KILL_ARGS, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill") / "full"
    assert _run_killable(out, 0).returncode == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage, loop, at, resumed_steps", [
    ("train", "epoch", 7, 18 - 6),                            # 9 steps an epoch, 2 epochs
    ("prune", "fine-tune (pruned)", 3, 6 - 2),                # 3 steps an epoch, 2 epochs
    ("prune", "fine-tune (reference)", 5, 6 - 4)])
def test_killed_mid_stage_resumes_from_its_checkpoint(tmp_path: Path, uninterrupted: Path, stage: str,
                                                      loop: str, at: int, resumed_steps: int) -> None:
    """SIGKILL in the middle of a stage's training loop (one process); the run started again
    resumes from the loop's last --checkpoint_every checkpoint, takes only the steps after it,
    and ends exactly where the uninterrupted run does."""
    part = tmp_path / "part"
    killed = _run_killable(part, at, loop)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (part / stage / "done.json").exists()
    done = _run_killable(part, 0, loop)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(Path(str(part) + ".steps").read_text()) == resumed_steps
    a = json.loads((uninterrupted / "report.json").read_text())
    b = json.loads((part / "report.json").read_text())
    a.pop("lookup_speed_vs_fp32"), b.pop("lookup_speed_vs_fp32")
    assert a == b


@pytest.mark.slow
def test_a_recorded_checkpoint_another_run_rewrote_is_refused(tmp_path: Path, uninterrupted: Path) -> None:
    """A finished stage's record names a checkpoint that the stage with its key wrote; one
    rewritten by a run with other settings (which stopped before its own record) is refused,
    naming it, instead of being loaded as the stage's result."""
    import shutil

    part = tmp_path / "copy"
    shutil.copytree(uninterrupted, part)
    record = json.loads((part / "train" / "done.json").read_text())
    meta_file = part / record["result"]["checkpoint"] / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["progress"]["stage_key"] = "0123456789abcdef"  # as a run with other settings leaves it
    meta_file.write_text(json.dumps(meta))
    proc = _run_killable(part, 0)
    assert proc.returncode != 0
    assert "not the checkpoint the 'train' stage's record" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_init_from_iterative_pruning_fractions_and_overrides(tmp_path: Path) -> None:
    base = tmp_path / "base"
    run_torchrun(ROOT / "recipes" / "train_dlrm.py", [*SMALL[:-8], "--out", base], nproc=2)
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("tables:\n  t_cat_7:\n    sharding_types: [row_wise]\n    compression:\n"
                         "      never_prune: true\n"
                         "  t_cat_0:\n    compression:\n      pin: fp16\n")
    out = tmp_path / "shark"
    args = [a for a in SMALL if a not in ("--quant_budget_fraction", 0.5)]
    run_torchrun(RECIPE, [*args, "--init_from", base, "--prune_rounds", 2, "--score_batches", 3,
                          "--finetune_steps", 2, "--quant_fractions", "fp16=0.5,int4=0.5",
                          "--planner_overrides", overrides, "--out", out], nproc=2)
    r = json.loads((out / "report.json").read_text())
    assert r["plan"]["fields_after"] == 4 and "cat_7" not in r["plan"]["dropped_features"]
    # the reference trains as many steps as the rounds did, 2 x (3 + 2) (it got one pass over
    # the held-out part while the report said "both fine-tuned the same way")
    from shark_torchrec.training.checkpoint import CheckpointManager

    ref = json.loads((out / "prune" / "done.json").read_text())["result"]["reference_checkpoint"]
    assert CheckpointManager.progress_of(str(out / ref))["global_step"] == 10
    model, info = load_export(str(out / "model"))
    # the file's sharding constraint reached the planner of the (pruned) model the pipeline trained
    placed = {t: p["sharding_type"] for m in info["sharding_plan"].values() for t, p in m.items()}
    assert placed["t_cat_7"] == "row_wise" and len(placed) == 4
    rows = info["rows_per_tier"]
    if "t_cat_0" in rows:  # pinned to one tier
        assert [t for t, n in rows["t_cat_0"].items() if n] == ["fp16"]
    others = [n for n in rows if n != "t_cat_0"]
    assert others and all(sorted(t for t, n in rows[n].items() if n) == ["fp16", "int4"] for n in others)


def test_other_scorers_priorities_and_the_dev_split(tmp_path: Path) -> None:
    """Permutation / random field scores, frequency priorities and evaluation on dev (one
    process): the plan drops the lowest scores of the chosen scorer, and the row counters the
    priorities come from equal the id counts of the training batches, counted directly."""
    import subprocess
    import sys

    import numpy as np

    from shark_torchrec.training.datasets import SYNTHETIC_OFFSETS

    reports = {}
    for scorer in ("permutation", "random"):
        out = tmp_path / scorer
        proc = subprocess.run([sys.executable, str(RECIPE), *map(str, SMALL), "--out", str(out),
                               "--field_scorer", scorer, "--row_priority", "frequency",
                               "--eval_split", "dev", "--bootstrap", "50"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[scorer] = json.loads((out / "report.json").read_text())
        pdone = json.loads((out / "prune" / "done.json").read_text())["result"]
        scores = pdone["scores"]
        dropped = sorted(scores, key=lambda f: (scores[f], f))[:4]
        assert sorted(pdone["plan"]["dropped_features"]) == sorted(dropped)
        assert pdone["scorer"] == scorer
    r = reports["random"]
    assert r["eval_split"] == "dev" and r["row_priority"] == "frequency"
    assert r["paired"]["compressed vs uncompressed"]["bootstrap"] == 50
    # Row counters vs a direct count over the train part (75% of 12 batches of 32 = 9).
    from shark_torchrec.importance import RowPriority
    from shark_torchrec.cli_run import parse_pipeline
    from shark_torchrec.pipeline import _row_counters
    from shark_torchrec.training.model import DLRMConfig

    cfg = SyntheticConfig.default(num_fields=8, num_informative=3, cardinality=500, seed=0)
    ds = SyntheticClickDataset(cfg, 32, 9, batch_offset=SYNTHETIC_OFFSETS["train"])
    pos = {f: np.zeros(500) for f in cfg.feature_names}
    neg = {f: np.zeros(500) for f in cfg.feature_names}
    for b in ds:
        for f in cfg.feature_names:
            jt = b.sparse_features[f]
            y = torch.repeat_interleave(b.labels, jt.lengths()).numpy()
            np.add.at(pos[f], jt.values().numpy(), y)
            np.add.at(neg[f], jt.values().numpy(), 1 - y)
    tables = DLRMConfig(feature_names=cfg.feature_names, num_embeddings_per_feature=[500] * 8,
                        embedding_dim=8, dense_arch_layer_sizes=(16, 8)).tables()
    counts = RowPriority(tables, channels=_row_counters(parse_pipeline([]).quant))
    counts.load(str(tmp_path / "random" / "train" / "row_counts"))
    for f in cfg.feature_names:
        np.testing.assert_allclose(counts.priorities("positive_plain")[f"t_{f}"].numpy(), pos[f], rtol=1e-6)
        np.testing.assert_allclose(counts.priorities("negative_plain")[f"t_{f}"].numpy(), neg[f], rtol=1e-6)


@pytest.mark.slow
def test_changed_flags_rerun_the_stages_they_reach(tmp_path: Path, full: Path) -> None:
    """A finished run started again with other quantize flags reuses train and prune (their
    records untouched) and reruns quantize, saying why; its report is the new run's."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(full, out)  # (records hold paths relative to the run: the copy reads its own)
    before = {s: (out / s / "done.json").read_bytes() for s in ("train", "prune", "quantize")}
    proc = run_torchrun(RECIPE, [*SMALL[:-4], "--quant_budget_fraction", 0.3, "--out", out], nproc=2)
    assert "stage 'quantize'" in proc.stderr and (
        "its inputs changed: attribute_quant_loss True -> False, quant_budget_fraction 0.5 -> 0.3") in proc.stderr
    assert "stage 'train'" not in proc.stderr and "stage 'prune'" not in proc.stderr
    for s in ("train", "prune"):
        assert (out / s / "done.json").read_bytes() == before[s]
    record = json.loads((out / "quantize" / "done.json").read_text())
    assert record["inputs"]["quant_budget_fraction"] == 0.3 and not record["inputs"]["attribute_quant_loss"]
    a = json.loads((full / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    assert b["stages"]["pruned"] == a["stages"]["pruned"] and b["stages"]["trained"] == a["stages"]["trained"]
    # the smaller budget holds: 0.3 of the kept tables' fp32 bytes (4 of 8 tables, dim 8), which
    # the first run's compressed tables (budget 0.5, not all spent: the unused rows share) exceed
    kept = sum(sum(r) for r in record["result"]["rows_per_tier"].values()) * 8 * 4
    assert b["stages"]["quantized"]["embedding_bytes"] <= 0.3 * kept < a["stages"]["quantized"]["embedding_bytes"]
    assert b["stages"]["quantized"]["bytes_saved_fraction"] > a["stages"]["quantized"]["bytes_saved_fraction"]
    assert "quant_loss_attribution" not in b


def test_bad_run_directories_and_unused_flags_are_refused(tmp_path: Path) -> None:
    """One line naming the file or flag, before anything trains (flags the pipeline does not
    take, and flags that contradict each other, are usage errors: status 2; tests/test_bad_input.py
    has each message)."""
    import subprocess
    import sys

    def run(*extra, status=1):
        proc = subprocess.run([sys.executable, str(RECIPE), *map(str, SMALL), *map(str, extra)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == status, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        return proc.stderr

    out = tmp_path / "run"
    (out / "prune").mkdir(parents=True)
    (out / "prune" / "done.json").write_text('{"metrics": {"auc": 0.7}, "checkp')  # killed mid-write
    assert f"{out}/prune/done.json: damaged stage record" in run("--out", out)
    (tmp_path / "file").write_text("")
    assert "--out" in run("--out", tmp_path / "file" / "sub") and "cannot be a directory" in run(
        "--out", tmp_path / "file" / "sub")
    assert "--max_steps is not used by the SHARK pipeline" in run("--max_steps", 5, "--out", tmp_path / "x", status=2)
    assert "--drop_rows unused: drop is not among --quant_tiers" in run(
        "--drop_rows", "unused", "--out", tmp_path / "x", status=2)


def test_every_table_is_weighted_by_its_gradient_scale_or_none_is(caplog) -> None:
    """``--tier_weighting gradient``: a table whose fields had no finite scale stayed unscaled
    (1.0) among tables scaled by ~0.01, its rows 40-100x over-counted in the shared budget
    (audit); and a feature several tables read is scored per table (``f@t``), which the lookup
    by plain feature name missed."""
    from torchrec import EmbeddingBagConfig

    from shark_torchrec.pipeline import _priority_mix
    from shark_torchrec.run_config import QuantSection

    tables = [EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0", "s"]),
              EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["s"]),
              EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"])]
    scales = {"f0": 0.01, "s@t0": 0.03, "s@t1": 0.02, "f2": 0.005}
    mix, scale = _priority_mix(QuantSection(), scales, tables)
    assert mix == {"positive": 1.0, "negative": 0.2}
    assert scale == {"t0": 0.03, "t1": 0.02, "t2": 0.005}
    with caplog.at_level("WARNING"):
        _, scale = _priority_mix(QuantSection(), dict(scales, f2=float("nan")), tables)
    assert scale == {} and "tables ['t2'] have no gradient scale" in caplog.text
    assert _priority_mix(QuantSection(tier_weighting="none"), scales, tables)[1] == {}
