"""recipes/train_dlrm.py --score_fields + recipes/prune_dlrm.py, sharded, end to end."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_torchrun

SMALL = ["--data", "synthetic", "--synthetic_num_fields", 8, "--synthetic_informative", 3,
         "--synthetic_cardinality", 500, "--synthetic_train_batches", 40,
         "--synthetic_test_batches", 4, "--embedding_dim", 8, "--dense_arch_layer_sizes", "16,8",
         "--over_arch_layer_sizes", "16,1", "--batch_size", 64, "--log_level", "WARNING"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One trained model (field scores collected while training) for the pruning tests."""
    out = tmp_path_factory.mktemp("prune_recipe") / "base"
    run_torchrun(ROOT / "recipes" / "train_dlrm.py", [*SMALL, "--score_fields", "shuffle",
                                                      "--out", out], nproc=2)
    return out


@pytest.mark.slow
def test_score_while_training_then_prune_and_fine_tune(tmp_path: Path, base: Path) -> None:
    scores = json.loads((base / "field_scores.json").read_text())
    assert scores["method"] == "shark-shuffle" and len(scores["scores"]) == 8
    assert set(scores["ranking"][:3]) == {"cat_0", "cat_1", "cat_2"}  # the planted fields
    assert all(n == 40 * 128 for n in scores["samples"].values())

    pruned = tmp_path / "pruned"
    run_torchrun(ROOT / "recipes" / "prune_dlrm.py", [*SMALL, "--from_run", base, "--keep_fields", 3,
                                                      "--protect", "cat_7", "--out", pruned], nproc=2)
    m = json.loads((pruned / "metrics.json").read_text())
    plan = json.loads((pruned / "plan.json").read_text())
    assert m["plan"]["fields_after"] == 3 and "cat_7" not in plan["dropped_features"]
    assert m["plan"]["bytes_after"] == 3 * 500 * 8 * 4
    assert m["after"]["examples"] == m["before"]["examples"] == 4 * 128
    assert m["after"]["auc"] > 0.6
    # finished with these settings (OUT/prune/done.json): the same command prunes nothing again
    stamp = (pruned / "checkpoints" / "latest").stat().st_mtime_ns
    run_torchrun(ROOT / "recipes" / "prune_dlrm.py", [*SMALL, "--from_run", base, "--keep_fields", 3,
                                                      "--protect", "cat_7", "--out", pruned], nproc=2)
    assert (pruned / "checkpoints" / "latest").stat().st_mtime_ns == stamp
    assert json.loads((pruned / "metrics.json").read_text()) == m

    # The saved plan applies again as is; a plan for another model is refused.
    again = tmp_path / "again"
    run_torchrun(ROOT / "recipes" / "prune_dlrm.py", [*SMALL, "--from_run", base, "--plan",
                                                      pruned / "plan.json", "--out", again], nproc=1)
    assert json.loads((again / "plan.json").read_text())["dropped_features"] == plan["dropped_features"]
    other = dict(plan, tables={"t_x": ["x"]}, table_bytes={"t_x": 1}, dropped_features=[])
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(AssertionError, match=r"fields unknown to the model of .*: \['x'\]"):
        run_torchrun(ROOT / "recipes" / "prune_dlrm.py", [*SMALL, "--from_run", base, "--plan",
                                                          tmp_path / "other.json", "--out", tmp_path / "x"], nproc=1)


@pytest.mark.slow
def test_field_scores_of_another_model_are_refused(tmp_path: Path, base: Path, capsys) -> None:
    """``prune_dlrm.py --from_run`` pruned a model trained again since (another seed, no
    ``--score_fields``) by the scores of the model before, whose ``field_scores.json`` stayed
    (audit): scores of another training are refused, and training again removes them."""
    import importlib
    import shutil

    from shark_torchrec.cli_run import parse_prune, parse_train
    from shark_torchrec.training import train_dlrm

    src = tmp_path / "src"
    shutil.copytree(base, src)
    doc = json.loads((src / "field_scores.json").read_text())
    assert doc["train_key"] == json.loads((src / "train" / "done.json").read_text())["key"]
    (src / "field_scores.json").write_text(json.dumps(dict(doc, train_key="another")))
    recipe = importlib.import_module("shark_torchrec.pruning.recipe")
    argv = [*map(str, SMALL), "--from_run", str(src), "--keep_fields", "3", "--out", str(tmp_path / "p")]
    with pytest.raises(SystemExit):
        recipe.run(parse_prune(argv))
    assert "scores the fields of another model than" in capsys.readouterr().err
    train_dlrm.run(parse_train([*map(str, SMALL), "--synthetic_train_batches", "4", "--seed", "1", "--out", str(src)]))
    assert not (src / "field_scores.json").exists()
    with pytest.raises(SystemExit):
        recipe.run(parse_prune(argv))
    assert "no field scores (train with --score_fields" in capsys.readouterr().err


@pytest.mark.slow
def test_iterative_pruning_recipe(tmp_path: Path, base: Path) -> None:
    out = tmp_path / "iter"
    run_torchrun(ROOT / "recipes" / "prune_dlrm.py", [*SMALL, "--from_run", base, "--rounds", 2,
                                                      "--keep_fields", 3, "--score_batches", 15,
                                                      "--finetune_steps", 5, "--out", out], nproc=2)
    m = json.loads((out / "metrics.json").read_text())
    assert [len(r["kept"]) for r in m["rounds"]] == [6, 3]
    assert set(m["rounds"][-1]["kept"]) == {"cat_0", "cat_1", "cat_2"}
    assert m["plan"]["fields_after"] == 3


@pytest.mark.slow
def test_planner_overrides_file_in_the_recipes(tmp_path: Path) -> None:
    small = ["--data", "synthetic", "--synthetic_cardinality", 300, "--synthetic_train_batches", 8,
             "--synthetic_test_batches", 2, "--embedding_dim", 8, "--dense_arch_layer_sizes", "16,8",
             "--over_arch_layer_sizes", "16,1", "--batch_size", 32, "--log_level", "WARNING",
             "--planner_overrides", ROOT / "examples" / "planner_overrides.yaml"]
    base = tmp_path / "base"
    run_torchrun(ROOT / "recipes" / "train_dlrm.py", [*small, "--score_fields", "zero", "--out", base], nproc=2)
    m = json.loads((base / "metrics.json").read_text())
    plan = m["sharding_plan"]["model.sparse_arch.embedding_bag_collection"]
    assert plan["t_cat_0"]["sharding_type"] == "row_wise"
    assert {p["sharding_type"] for p in plan.values()} <= {"row_wise", "table_wise"}
    out = tmp_path / "pruned"
    run_torchrun(ROOT / "recipes" / "prune_dlrm.py", [*small, "--from_run", base, "--keep_fields", 2,
                                                      "--out", out], nproc=1)
    kept = [f for f in json.loads((out / "plan.json").read_text())["tables"]
            if f not in json.loads((out / "metrics.json").read_text())["plan"]["dropped_tables"]]
    assert "t_cat_0" in kept  # never_prune in the overrides file
    # the pruned model is planned under the same constraints
    pruned_plan = json.loads((out / "metrics.json").read_text())["sharding_plan"]
    assert pruned_plan["model.sparse_arch.embedding_bag_collection"]["t_cat_0"]["sharding_type"] == "row_wise"


def test_flags_the_recipe_does_not_use_are_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    # a usage error (status 2) naming the flag and the recipe that takes it; every refused flag's
    # message is checked in-process in tests/test_bad_input.py
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "prune_dlrm.py"), *map(str, SMALL),
                           "--from_run", str(tmp_path), "--keep_fields", "3", "--resume",
                           "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--resume is not used by recipes/prune_dlrm.py; recipes/train_dlrm.py takes it" in proc.stderr
