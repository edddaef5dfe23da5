"""The planner-overrides YAML file: parsing, globs and order, errors naming file and key path,
and its use by the planner, quantize_ and the pruning recipe's protected fields."""

from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torch import nn

from conftest import ROOT
from shark_torchrec.planning import AllShardingTypesEBCSharder, OverridesError, load_overrides
from shark_torchrec.quant import TIER_ORDER, RowwiseQuantConfig, Tier, quantize_

TABLES = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=8, num_embeddings=1000,
                             feature_names=[f"cat_{i}"]) for i in range(26)]


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "overrides.yaml"
    p.write_text(text)
    return str(p)


def test_example_file_is_valid_and_resolves_globs_in_order() -> None:
    o = load_overrides(str(ROOT / "examples" / "planner_overrides.yaml"), TABLES)
    assert len(o.constraints) == 26
    assert o.constraints["t_cat_0"].sharding_types == ["row_wise"]       # the later entry wins
    assert o.constraints["t_cat_5"].sharding_types == ["table_wise", "row_wise"]
    assert o.constraints["t_cat_5"].pooling_factors == [1.0]
    assert o.never_prune == ["t_cat_0"] and o.protected_features(TABLES) == ["cat_0"]
    assert o.pins == {"t_cat_0": "fp16", "t_cat_24": "exclude"}
    assert o.tier_fractions["t_cat_3"] == {"fp16": 0.1, "int8": 0.3, "int4": 0.6}
    assert "t_cat_0" not in o.tier_fractions and "t_cat_24" not in o.tier_fractions


@pytest.mark.parametrize("text, message", [
    ("tables:\n  t_x*:\n    sharding_types: [row_wise]\n",
     r"overrides\.yaml: tables\.t_x\*: matches no table"),
    ("tables:\n  t_cat_1:\n    sharding_types: [diagonal]\n",
     r"tables\.t_cat_1\.sharding_types: unknown sharding types \['diagonal'\]"),
    ("tables:\n  t_cat_1:\n    compute_kernels: [magic]\n",
     r"tables\.t_cat_1\.compute_kernels: unknown compute kernels \['magic'\]"),
    ("tables:\n  t_cat_1:\n    compression:\n      tiers: {fp16: 0.5, int8: 0.4}\n",
     r"tables\.t_cat_1\.compression\.tiers: fractions sum to 0\.9, not 1"),
    ("tables:\n  t_cat_1:\n    compression:\n      tiers: {int3: 1.0}\n",
     r"tables\.t_cat_1\.compression\.tiers\.int3: unknown tier 'int3'"),
    ("tables:\n  t_cat_1:\n    compression:\n      pin: int9\n",
     r"tables\.t_cat_1\.compression\.pin: unknown tier 'int9'"),
    ("tables:\n  t_cat_1:\n    compression:\n      pin: fp16\n      exclude: true\n",
     r"tables\.t_cat_1\.compression: set at most one of pin, exclude, tiers and budget_bytes"),
    ("tables:\n  t_cat_1:\n    compression:\n      budget_bytes: many\n",
     r"tables\.t_cat_1\.compression\.budget_bytes: expected a positive number of bytes"),
    ("tables:\n  t_cat_1:\n    shardng_types: [row_wise]\n",
     r"tables\.t_cat_1: unknown keys \['shardng_types'\]"),
    ("tables:\n  t_cat_1:\n    min_partition: -3\n",
     r"tables\.t_cat_1\.min_partition: expected a positive integer"),
    ("tables: [1, 2]\n", r"tables: expected a mapping"),
    ("tables:\n  t_cat_1: {\n", r"not valid YAML"),
])
def test_errors_name_file_key_path_and_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(OverridesError, match=message):
        load_overrides(_write(tmp_path, text), TABLES)


def test_constraints_drive_the_planner(tmp_path: Path) -> None:
    o = load_overrides(_write(tmp_path, "tables:\n  t_cat_[0-2]:\n    sharding_types: [row_wise]\n"
                                        "  t_cat_3:\n    sharding_types: [column_wise]\n"
                                        "    min_partition: 4\n"), TABLES[:6])

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables=TABLES[:6], device=torch.device("meta"))

    plan = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu", local_world_size=2),
                                    batch_size=256, constraints=o.constraints).plan(M(), [AllShardingTypesEBCSharder()])
    ps = plan.plan["ebc"]
    assert [ps[f"t_cat_{i}"].sharding_type for i in range(4)] == ["row_wise"] * 3 + ["column_wise"]


def test_compression_settings_feed_quantize(tmp_path: Path) -> None:
    tables = TABLES[:3]
    o = load_overrides(_write(tmp_path, "tables:\n  t_cat_0:\n    compression:\n      pin: int8\n"
                                        "  t_cat_1:\n    compression:\n      tiers: {fp16: 0.5, int4: 0.5}\n"
                                        "  t_cat_2:\n    compression:\n      budget_bytes: 30000\n"), tables)
    ebc = EmbeddingBagCollection(tables=tables)
    config = o.quant_config(RowwiseQuantConfig(fractions={"int4": 1.0}))
    mixed = quantize_(ebc, config)
    a = mixed.assignment
    assert set(a.tiers["t_cat_0"].tolist()) == {TIER_ORDER.index(Tier.INT8)}
    assert a.rows_per_tier("t_cat_1") == {Tier.FP16: 500, Tier.INT4: 500}
    # t_cat_2's own budget: its rows, id map and padding within 30,000 bytes (fp32: 32,000).
    assert mixed.memory_report()["tables"]["t_cat_2"] and \
        sum(mixed.memory_report()["tables"]["t_cat_2"].values()) + 4 * 1000 <= 30_000


def test_per_feature_lists_fit_the_table_and_exclude_false_clears_nothing(tmp_path: Path) -> None:
    """A per-feature planner list (pooling_factors, num_poolings, batch_sizes) must have one
    value (every feature's) or one per feature (TorchRec zipped a wrong length with the features
    and estimated from it); ``exclude: false`` no longer clears an earlier entry's pin."""
    two = [EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=100, feature_names=["a", "b"]),
           *TABLES[:2]]
    ok = load_overrides(_write(tmp_path, "tables:\n  t2: {pooling_factors: [3.0]}\n"), two)
    assert ok.constraints["t2"].pooling_factors == [3.0, 3.0]
    with pytest.raises(OverridesError, match=r"pooling_factors: 4 values for table 't_cat_0', which has 1 feature"):
        load_overrides(_write(tmp_path, "tables:\n  t_cat_0: {pooling_factors: [4, 4, 4, 4]}\n"), two)
    o = load_overrides(_write(tmp_path, "tables:\n  't_cat_*': {compression: {pin: int8}}\n"
                                        "  t_cat_1: {compression: {exclude: false, never_prune: true}}\n"), TABLES[:3])
    assert o.pins == {"t_cat_0": "int8", "t_cat_1": "int8", "t_cat_2": "int8"} and o.never_prune == ["t_cat_1"]


def test_a_table_named_with_glob_characters_is_itself(tmp_path: Path) -> None:
    """A key that is a table's own name means that table, even where it reads as a glob
    (``user[1]`` matched ``user1`` only, audit); other keys are still patterns."""
    tables = [EmbeddingBagConfig(name=n, embedding_dim=8, num_embeddings=100, feature_names=[f"f_{i}"])
              for i, n in enumerate(["user[1]", "user1"])]
    o = load_overrides(_write(tmp_path, "tables:\n  'user[1]': {compression: {pin: int4}}\n"), tables)
    assert o.quant_config(RowwiseQuantConfig(fractions={"int8": 1.0})).table_overrides == {"user[1]": "int4"}
    o = load_overrides(_write(tmp_path, "tables:\n  'user[0-9]': {compression: {pin: int4}}\n"), tables)
    assert o.quant_config(RowwiseQuantConfig(fractions={"int8": 1.0})).table_overrides == {"user1": "int4"}
