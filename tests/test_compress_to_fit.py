"""Compress-to-fit and `shark-torchrec plan`: planning only, for a topology this machine does not
have (TorchRec's DLRM example for Criteo 1TB on one 80 GiB GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import PlannerError

from conftest import ROOT
from shark_torchrec.planning.compress import (
    choose_compression,
    compress_to_fit,
    compressed_bytes,
    criteo_1tb_tables,
    device_storage,
    plan_inference,
    zipf_bucket_mass,
)
from shark_torchrec.quant import Tier, row_bytes

GiB = 1024 ** 3


def test_criteo_1tb_does_not_fit_one_80gb_gpu_until_compressed() -> None:
    tables = criteo_1tb_tables()
    rows = sum(t.num_embeddings for t in tables)
    assert 177_000_000 < rows < 179_000_000
    assert 90e9 < rows * 128 * 4 < 92e9  # about 91 GB in fp32
    topology = Topology(world_size=1, compute_device="cuda", hbm_cap=80 * GiB)
    with pytest.raises(PlannerError):
        plan_inference(tables, topology)
    compression, plan, planner = compress_to_fit(tables, topology)
    used = device_storage(planner, 1)[0]
    assert used["ddr"] == 0 and used["hbm"] <= 80 * GiB
    # Every table is in the plan, as its tier sub-tables, all on the one device.
    placed = {so.name.split("@")[0] for so in planner._best_plan}
    assert placed == {t.name for t in tables}
    # The planner's storage for a sub-table is FBGEMM's bytes for its rows (+ its I/O buffers).
    for so in planner._best_plan:
        name, tier = so.name.split("@")
        rows_in_tier = compression[name].rows[tier]
        weights = rows_in_tier * row_bytes(Tier(tier), 128)
        assert weights <= so.shards[0].storage.hbm <= weights + 256 * 1024 ** 2
    assert sum(c.bytes for c in compression.values()) < sum(c.fp32_bytes for c in compression.values())


def test_choose_compression_meets_budgets_and_pins() -> None:
    tables = criteo_1tb_tables(dim=64)
    fp32 = sum(t.num_embeddings * 64 * 4 for t in tables)
    previous_loss = -1.0
    for fraction in (0.9, 0.5, 0.3, 0.15):
        c = choose_compression(tables, int(fraction * fp32), pins={"t_cat_0": "int8", "t_cat_3": "exclude"})
        assert sum(x.bytes for x in c.values()) <= fraction * fp32
        assert c["t_cat_0"].rows == {"int8": tables[0].num_embeddings}
        assert c["t_cat_3"].rows == {"fp32": tables[3].num_embeddings}
        loss = sum(x.predicted_loss for x in c.values())
        assert loss >= previous_loss  # less memory, more predicted loss
        previous_loss = loss
    with pytest.raises(ValueError, match="cannot fit"):
        choose_compression(tables, 1000, tiers=["int8"])


def test_zipf_buckets_and_bytes() -> None:
    counts, mass = zipf_bucket_mass(1_000_000, 1.05, 32)
    assert sum(counts) == 1_000_000 and abs(sum(mass) - 1) < 1e-9
    assert mass[0] > mass[-1] and counts[0] < counts[-1]  # few popular rows, long tail
    # Each tier's sub-table aligned to 128 bytes (as FBGEMM allocates it), plus the id map, which
    # every converted table has (one tier too), bit-packed in the bits its rows and most
    # centroids need (rounded up to 4 bytes): 10 rows (12 renumbered) 4 bits, 5 bytes; 11 rows 4
    # bits, 5.5 bytes; 70,005 rows (71,029) 17 bits, 148,760.6 bytes
    assert compressed_bytes({Tier.FP32: 10}, 64) == 10 * 256 + 8
    assert compressed_bytes({Tier.FP16: 5, Tier.INT8: 5}, 64) == 5 * 128 + 512 + 8  # 400 -> 512
    assert compressed_bytes({Tier.FP16: 5, Tier.INT8: 6}, 64) == 5 * 128 + 512 + 8  # 480 -> 512
    assert compressed_bytes({Tier.FP16: 5, Tier.INT8: 70_000}, 64) == 5 * 128 + 70_000 * 80 + 148_764


@pytest.mark.parametrize("row_alignment", [1, 16])
@pytest.mark.parametrize("mix", [{Tier.FP16: 100, Tier.INT8: 300, Tier.INT4: 600}, {Tier.INT8: 1000},
                                 {Tier.FP16: 10, Tier.INT2: 890, Tier.DROP: 100}])
def test_planned_bytes_are_the_bytes_the_collection_holds(mix, row_alignment) -> None:
    """The planner's bytes for a table are what the converted collection holds for it (its
    sub-tables and id map; the group's map tail aside): a table in one tier has an id map too,
    and sub-tables are cache-line aligned (the planner once counted neither)."""
    from torchrec import EmbeddingBagConfig

    from shark_torchrec.quant.id_map import TAIL_BYTES
    from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection
    from shark_torchrec.quant.tiers import TIER_ORDER

    tiers = torch.cat([torch.full((n,), TIER_ORDER.index(t), dtype=torch.int8) for t, n in mix.items()])
    cfg = [EmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"])]
    m = RowwiseMixedEmbeddingBagCollection.from_weights(cfg, {"t": torch.randn(1000, 16)}, {"t": tiers},
                                                        row_alignment=row_alignment)
    g = m.groups[0]
    held = sum(int(getattr(t, a).numel()) for t in g._tbes() for a in ("weights_host", "weights_dev", "weights_uvm"))
    held += g.input_transform.row_map.numel()
    assert compressed_bytes(mix, 16, row_alignment) + TAIL_BYTES == held


def test_plan_command_line(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "shark_torchrec.cli", "plan", "--preset", "criteo1tb",
                           "--hbm_gb", "80", "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "before compression (fp32): does not fit" in proc.stdout
    assert "| t_cat_19 |" in proc.stdout
    r = json.loads(out.read_text())
    assert r["before"]["fits"] is False and r["after"]["fits"] is True
    assert r["after"]["devices"][0]["hbm"] <= 80 * GiB


def test_per_table_settings_are_respected() -> None:
    tables = criteo_1tb_tables(dim=64)
    fp32 = sum(t.num_embeddings * 64 * 4 for t in tables)
    c = choose_compression(tables, int(0.4 * fp32), pins={"t_cat_1": "int4"},
                           fractions={"t_cat_0": {"fp16": 0.25, "int4": 0.75}},
                           table_budgets={"t_cat_9": 500_000_000})
    n0 = tables[0].num_embeddings
    assert c["t_cat_0"].rows == {"fp16": round(0.25 * n0), "int4": n0 - round(0.25 * n0)}
    assert c["t_cat_1"].rows == {"int4": tables[1].num_embeddings}
    assert c["t_cat_9"].bytes <= 500_000_000
    assert sum(x.bytes for x in c.values()) <= 0.4 * fp32


def test_cpu_rows_unpadded_are_planned_by_their_real_bytes() -> None:
    """With 1-byte rows (FBGEMM's CPU layout) a 64-dim INT4 row takes 36 bytes, not 48: the
    tier choice and TorchRec's planner both see that."""
    from torchrec import EmbeddingBagConfig

    from shark_torchrec.quant.id_map import table_map_bytes
    from shark_torchrec.quant.tiers import align_to_cacheline

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=50_000,
                                 feature_names=[f"f{i}"]) for i in range(2)]
    rows = 2 * 50_000
    assert row_bytes(Tier.INT4, 64, 1) == 36 and row_bytes(Tier.INT4, 64, 16) == 48
    stored = {}
    for align in (1, 16):
        c = choose_compression(tables, 10 * GiB, tiers=["int4"], row_alignment=align)
        assert all(x.rows == {"int4": 50_000} for x in c.values())
        # (a table in one tier: its sub-table, aligned to 128 bytes, and its 16-bit id map)
        assert sum(x.bytes for x in c.values()) == 2 * (align_to_cacheline(50_000 * row_bytes(Tier.INT4, 64, align))
                                                       + table_map_bytes(50_000))
        topology = Topology(world_size=1, compute_device="cpu", local_world_size=1, ddr_cap=GiB)
        _, planner = plan_inference(tables, topology, c, row_alignment=align)
        stored[align] = device_storage(planner, 1)[0]["ddr"]
    # The planner's estimate differs by the padding the 16-byte layout adds (plus a little of
    # TorchRec's per-table buffer estimates, which grow with the row size).
    assert rows * (48 - 36) <= stored[16] - stored[1] <= 1.03 * rows * (48 - 36)


def test_the_shared_tier_is_refused_by_planning_without_trained_rows() -> None:
    """Its loss depends on the trained rows' clusters: compress to fit refuses it (as a tier, a
    pin or in a table's fractions), naming what to do instead."""
    tables = criteo_1tb_tables(dim=16)[:3]
    fp32 = sum(t.num_embeddings * 16 * 4 for t in tables)
    for kwargs in ({"tiers": ["int8", "shared"]}, {"pins": {"t_cat_0": "shared"}},
                   {"fractions": {"t_cat_1": {"int8": 0.5, "shared": 0.5}}}):
        with pytest.raises(ValueError, match="SHARED tier's loss depends on the trained rows"):
            choose_compression(tables, int(0.3 * fp32), **kwargs)


def test_the_mix_holds_the_budget_with_its_padding() -> None:
    """The mixes' bytes as stored (each tier's sub-table padded to a cache line, the id map to a
    word) stay within the budget: the price counted rows and entries only, and went over by up
    to 2.3% on many small tables (audit)."""
    import random

    from torchrec import EmbeddingBagConfig

    from shark_torchrec.planning.compress import choose_compression

    rng = random.Random(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=rng.randint(1000, 1700),
                                 feature_names=[f"f{i}"]) for i in range(20)]
    fp32 = sum(t.num_embeddings * 64 for t in tables)
    for fraction in (0.06, 0.08, 0.1, 0.2, 0.3):
        budget = int(fraction * fp32)
        mix = choose_compression(tables, budget)
        total = sum(c.bytes for c in mix.values())
        assert budget * 0.98 < total <= budget, (fraction, total, budget)


def test_a_budget_no_price_meets_is_a_budget_error_not_a_hang() -> None:
    """lowest_price raised its upper price for ever (to inf) where no price met the budget:
    reached by choose_compression when the padding's excess takes the rows' target below the
    least they can take.  Now a BudgetError; a budget a little larger fits."""
    from torchrec import EmbeddingBagConfig

    from shark_torchrec.quant.tiers import BudgetError, lowest_price

    with pytest.raises(BudgetError, match=r"no price per byte brings the bytes within the budget of 50"):
        lowest_price(lambda lam: 100.0, 50.0)
    t = EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=1001, feature_names=["f"])
    for budget in (81460, 81500):
        with pytest.raises(BudgetError, match=rf"cannot fit {budget} bytes once their sub-tables and id maps"):
            choose_compression([t], budget, tiers=("fp16", "int8"))
    assert choose_compression([t], 81520, tiers=("fp16", "int8"))["t"].bytes <= 81520
