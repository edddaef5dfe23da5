"""prune_dlrm.py's choice of fields: a saved plan is the only criterion it is given with, it
keeps protected fields, and protected names are read as written (stripped) and checked."""

import os
import types

import pytest
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from shark_torchrec.cli_run import parse_prune
from shark_torchrec.pruning.plan import PlanError, PruningPlan
from shark_torchrec.pruning.recipe import _load_plan_or_scores


def _tables():
    return [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=8, num_embeddings=10, feature_names=[f"cat_{i}"])
            for i in range(3)]


def test_a_saved_plan_that_drops_a_protected_field_is_refused(tmp_path) -> None:
    """--plan applied a plan dropping a field --protect (or never_prune) protects, silently."""
    tables = _tables()
    PruningPlan(tables={t.name: list(t.feature_names) for t in tables}, table_bytes={t.name: 320 for t in tables},
                dropped_features=["cat_0"]).save(str(tmp_path / "plan.json"))
    os.makedirs(tmp_path / "run")
    trainer = types.SimpleNamespace(model_config=types.SimpleNamespace(tables=lambda: tables))
    run = parse_prune(["--from_run", str(tmp_path / "run"), "--plan", str(tmp_path / "plan.json"),
                       "--protect", "cat_1, cat_0"])
    assert run.prune.protected == ["cat_1", "cat_0"]  # (" cat_0" once: a name no field has)
    with pytest.raises(PlanError, match=r"drops protected fields \['cat_0'\]"):
        _load_plan_or_scores(run, trainer)
    plain = parse_prune(["--from_run", str(tmp_path / "run"), "--plan", str(tmp_path / "plan.json")])
    assert _load_plan_or_scores(plain, trainer).dropped_features == ["cat_0"]


@pytest.mark.parametrize("extra", [["--keep_fields", "1"], ["--rounds", "2", "--keep_fields", "1"],
                                   ["--scores", "s.json"], ["--drop_fraction", "0.5"]])
def test_a_saved_plan_with_another_criterion_is_refused(tmp_path, capsys, extra) -> None:
    """--plan with --keep_fields/--drop_fraction/--scores/--rounds ignored one of them."""
    for name in ("p.json", "s.json"):
        (tmp_path / name).write_text("{}")
    extra = [str(tmp_path / x) if x.endswith(".json") else x for x in extra]
    with pytest.raises(SystemExit):  # (the command line's error, naming the flags)
        parse_prune(["--from_run", str(tmp_path), "--plan", str(tmp_path / "p.json"), *extra])
    assert "--plan gives the fields to drop" in capsys.readouterr().err


def test_iterative_pruning_refuses_protected_names_no_field_has() -> None:
    """Iterative rounds kept only the protected names that were fields and dropped the rest
    without a word (a typo left its field unprotected); now an error before any round."""
    from shark_torchrec.pruning.sharded import iterative_prune

    trainer = types.SimpleNamespace(features=["cat_0", "cat_1", "cat_2"])
    with pytest.raises(PlanError, match=r"protected names unknown fields \['cat_9'\]"):
        iterative_prune(trainer, iter(()), rounds=1, score_batches=1, finetune_steps=1, keep_fields=1,
                        work_dir="unused", batch_size=1, protected=["cat_0", "cat_9"])
