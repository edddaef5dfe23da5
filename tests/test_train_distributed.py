"""Sharded training equals single-process training on the same global batches."""

from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_torchrun

SCRIPT = ROOT / "tests" / "scripts" / "train_equivalence.py"


_ONE_PROCESS: dict = {}


def _run(tmp_path: Path, extra, nproc: int) -> dict:
    out = tmp_path / f"ws{nproc}.pt"
    run_torchrun(SCRIPT, ["--out", out, "--steps", 5, "--global_batch", 64, *extra], nproc=nproc)
    return torch.load(out, weights_only=False)


def _one_and_two_processes(tmp_path: Path, extra, reference_extra=None) -> tuple:
    """Run the equivalence script with 2 processes and compare its losses and final parameters
    with a 1-process run of ``reference_extra`` (default ``extra``; one process has one shard
    whatever the sharding type, so those share a reference run); return both results."""
    key = tuple(map(str, extra if reference_extra is None else reference_extra))
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = _run(tmp_path, list(key), 1)
    one, two = _ONE_PROCESS[key], _run(tmp_path, extra, 2)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert one["state"].keys() == two["state"].keys()
    for key, ref in one["state"].items():
        torch.testing.assert_close(two["state"][key], ref, rtol=1e-4, atol=1e-5, msg=key)
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_two_process_training_matches_one_process(tmp_path: Path, interaction: str) -> None:
    one, two = _one_and_two_processes(tmp_path, ["--interaction", interaction])
    # The 2-process plan really spreads tables over both ranks.
    assert "rank:1" in two["plan"] and "rank:1" not in one["plan"]
    # Training moved the loss, so equal losses are not equal starting points only.
    assert one["losses"][0] != pytest.approx(one["losses"][-1], rel=1e-3)
    assert len([k for k in one["state"] if "embedding_bags" in k]) == 6


@pytest.mark.slow
@pytest.mark.parametrize("sharding_type", ["row_wise", "table_row_wise"])
def test_planner_places_row_wise_tables_on_cpu_and_training_matches(tmp_path: Path, sharding_type: str) -> None:
    """The planner, with AllShardingTypesEBCSharder, plans row-wise tables for gloo/CPU (TorchRec's
    own sharder refuses them there); the sharded run equals one process on the same batches."""
    _, two = _one_and_two_processes(tmp_path, ["--sharding_type", sharding_type],
                                    reference_extra=["--interaction", "dot"])
    assert two["plan"].count(sharding_type) >= 6 and "rank:1" in two["plan"]
