"""Checkpoint → resume gives the same model and optimizer state as an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import ROOT, run_torchrun

RECIPE = ROOT / "recipes" / "train_dlrm.py"
SMALL = ["--data", "synthetic", "--synthetic_num_fields", 5, "--synthetic_informative", 2,
         "--synthetic_cardinality", 200, "--synthetic_train_batches", 6,
         "--synthetic_test_batches", 2, "--embedding_dim", 8, "--dense_arch_layer_sizes", "16,8",
         "--over_arch_layer_sizes", "16,1", "--batch_size", 32, "--epochs", 2,
         "--score_fields", "mean", "--log_level", "WARNING"]


def _final_state(out: Path) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    flat = out / "final.pt"
    dcp_to_torch_save(out / "checkpoints" / latest, flat)
    return torch.load(flat, weights_only=False)


def _flatten(prefix: str, obj, into: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}", v, into)
    elif isinstance(obj, torch.Tensor):
        into[prefix] = obj
    return into


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    run_torchrun(RECIPE, [*SMALL, "--out", full], nproc=2)
    # Interrupt in the middle of epoch 1 (6 steps per epoch), then resume.
    run_torchrun(RECIPE, [*SMALL, "--out", part, "--max_steps", 8, "--checkpoint_every", 3], nproc=2)
    stopped = json.loads((part / "metrics.json").read_text())
    assert not stopped["finished"] and stopped["steps"] == 8
    run_torchrun(RECIPE, [*SMALL, "--out", part, "--resume"], nproc=2)

    a, b = json.loads((full / "metrics.json").read_text()), json.loads((part / "metrics.json").read_text())
    assert a["finished"] and b["finished"] and a["steps"] == b["steps"] == 12
    assert b["test_auc"] == a["test_auc"] and b["test_log_loss"] == a["test_log_loss"]
    # Field scoring survives the interruption too (its state is in the checkpoint).
    sa_scores = json.loads((full / "field_scores.json").read_text())
    sb_scores = json.loads((part / "field_scores.json").read_text())
    assert sb_scores["samples"] == sa_scores["samples"] == {f"cat_{i}": 12 * 64 for i in range(5)}
    for f, v in sa_scores["scores"].items():
        assert sb_scores["scores"][f] == pytest.approx(v, rel=1e-9)

    # The run is finished with these settings (OUT/train/done.json): running it again trains
    # nothing, and --resume with other settings is refused, naming them.
    latest = part / "checkpoints" / (part / "checkpoints" / "latest").read_text().strip()
    stamp, metrics = latest.stat().st_mtime_ns, (part / "metrics.json").read_text()
    run_torchrun(RECIPE, [*SMALL, "--out", part], nproc=2)
    assert latest.stat().st_mtime_ns == stamp and (part / "metrics.json").read_text() == metrics
    with pytest.raises(AssertionError, match=r"--resume: .* was written with other settings "
                                             r"\(--learning_rate 0.05 -> 0.1\)"):
        run_torchrun(RECIPE, [*SMALL, "--out", part, "--resume", "--learning_rate", 0.1], nproc=2)

    sa = _flatten("", _final_state(full), {})
    sb = _flatten("", _final_state(part), {})
    assert sa.keys() == sb.keys()
    assert any("embedding_bags" in k for k in sa) and any("momentum" in k or "state" in k for k in sa)
    for key in sa:
        # The importance totals are float64 sums whose order of addition differs on resume
        # (restored totals + new steps, then the all-reduce): equal up to reassociation.
        rtol = 1e-12 if ".importance." in key else 0
        torch.testing.assert_close(sb[key], sa[key], rtol=rtol, atol=0, msg=key)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    from shark_torchrec.training.checkpoint import CheckpointError, CheckpointManager

    root = tmp_path / "ck"
    (root / "step_00000001").mkdir(parents=True)
    (root / "step_00000001" / "meta.json").write_text(json.dumps(
        {"progress": {"global_step": 1}, "fingerprint": {"embedding_dim": 8, "data": "synthetic"}}))
    (root / "latest").write_text("step_00000001")
    mgr = CheckpointManager(str(root), {"embedding_dim": 16, "data": "synthetic"})
    with pytest.raises(CheckpointError, match=r"embedding_dim: checkpoint 8 vs run 16"):
        mgr.load({})


def test_optimizer_states_resume_and_data_parallel_tables_take_the_embedding_optimizer(tmp_path: Path) -> None:
    """Found by audit, both silent: a resumed Adam restarted from zero moments (a fresh Adam has
    no state for the checkpoint to load into), and data-parallel tables were stepped by the dense
    optimizer at the dense learning rate."""
    out = tmp_path / "optim.json"
    run_torchrun(ROOT / "tests" / "scripts" / "optimizer_state_run.py", ["--out", out], nproc=1)
    r = json.loads(out.read_text())
    assert r["adam"]["adam_keys"] > 0 and r["adam"]["keys_differ"] == []
    assert r["adam"]["max_diff"] == 0.0
    for kind in ("table_wise", "data_parallel"):
        assert r["data_parallel"][kind]["embedding_lr"] < 1e-6 < r["data_parallel"][kind]["dense_lr"], r


def test_a_step_saved_again_gets_its_own_directory(tmp_path: Path) -> None:
    """Saving the step ``latest`` names again (mid-epoch, then at the epoch's end) rewrote that
    checkpoint in place (interrupted, it was half-written where ``latest`` points); now each save
    has its own directory, and ``latest`` moves only once it is complete."""
    import torch as t

    from shark_torchrec.training.checkpoint import CheckpointManager

    ckpt = CheckpointManager(str(tmp_path), {"model": 1}, keep=3)
    first = ckpt.save({"w": t.zeros(3)}, {"global_step": 12, "epoch": 0})
    second = ckpt.save({"w": t.ones(3)}, {"global_step": 12, "epoch": 1})
    assert first != second and second.endswith("step_00000012.1") and ckpt.latest() == second
    state = {"w": t.zeros(3)}
    assert ckpt.load(state)["epoch"] == 1 and t.equal(state["w"], t.ones(3))
    state = {"w": t.ones(3)}
    ckpt.load(state, first)
    assert t.equal(state["w"], t.zeros(3))  # the first save is as it was written
