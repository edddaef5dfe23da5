"""Tier assignment: FBGEMM byte sizes, fractions, the byte-budget optimiser, bad input."""

import itertools

import pytest
import torch

from shark_torchrec.quant import (
    TIER_ORDER,
    Tier,
    assign_by_budget,
    assign_by_fractions,
    quantization_error,
    row_bytes,
    sub_table_bytes,
)
from shark_torchrec.quant.tiers import weighted_error


def test_row_bytes_follow_fbgemm_layout() -> None:
    # dim 64: fp32 4 B/elem; fp16 2; int8 1 + 4 B fp16 scale/bias; int4 ½; int2 ¼; rows padded to 16.
    # SHARED and DROP rows store nothing of their own
    assert [row_bytes(t, 64) for t in TIER_ORDER] == [256, 128, 80, 48, 32, 0, 0]
    assert [row_bytes(t, 64, row_alignment=1) for t in TIER_ORDER] == [256, 128, 68, 36, 20, 0, 0]
    assert sub_table_bytes(Tier.INT4, 3, 64) == 256  # 3 × 48 = 144, padded to a 128-byte line
    assert sub_table_bytes(Tier.DROP, 1000, 64) == 0 == sub_table_bytes(Tier.SHARED, 1000, 64)


def test_quantization_errors_are_ordered_by_precision() -> None:
    w = torch.randn(200, 32) * 0.1
    errs = [float(quantization_error(w, t).mean()) for t in TIER_ORDER if t is not Tier.SHARED]
    assert errs[0] == 0 and all(a < b for a, b in zip(errs, errs[1:]))
    assert quantization_error(w, Tier.DROP).allclose((w.double() ** 2).sum(1))


def test_fractions_put_the_highest_priorities_in_the_best_tier() -> None:
    p = {"a": torch.tensor([5.0, 1.0, 9.0, 1.0, 0.0, 3.0, 7.0, 2.0, 8.0, 4.0])}
    a = assign_by_fractions(p, {"a": 16}, {"fp16": 0.2, "int8": 0.3, "int4": 0.5})
    tiers = [TIER_ORDER[i] for i in a.tiers["a"].tolist()]
    assert {i for i, t in enumerate(tiers) if t is Tier.FP16} == {2, 8}       # 9, 8
    assert {i for i, t in enumerate(tiers) if t is Tier.INT8} == {6, 0, 9}    # 7, 5, 4
    assert a.rows_per_tier("a") == {Tier.FP16: 2, Tier.INT8: 3, Tier.INT4: 5}
    assert a.bytes_per_tier("a") == {Tier.FP16: 128, Tier.INT8: 128, Tier.INT4: 128}
    assert a.report()["a"]["fp32_bytes"] == 640
    # Ties: the lower row id goes first (rows 1 and 3 both have priority 1).
    b = assign_by_fractions(p, {"a": 16}, {"int8": 0.9, "drop": 0.1})
    assert TIER_ORDER[b.tiers["a"][4]] is Tier.DROP


def test_bad_fractions_and_priorities() -> None:
    p = {"a": torch.ones(4)}
    with pytest.raises(ValueError, match="sum to 1"):
        assign_by_fractions(p, {"a": 8}, {"fp16": 0.5, "int8": 0.4})
    with pytest.raises(ValueError, match="unknown tier 'int3'"):
        assign_by_fractions(p, {"a": 8}, {"int3": 1.0})
    with pytest.raises(ValueError, match=r"table 'a': priority of row 2 is nan"):
        assign_by_fractions({"a": torch.tensor([1.0, 2.0, float("nan"), 0.0])}, {"a": 8}, {"int8": 1.0})
    w = torch.randn(4, 8)
    w[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"table 'a': row 3 of the weights is not finite"):
        assign_by_budget(p, {"a": w}, 10_000)
    with pytest.raises(ValueError, match="below the smallest possible size"):
        assign_by_budget(p, {"a": torch.randn(4, 8)}, 10, tiers=["int8"])


def test_budget_is_met_and_beats_fractions_of_the_same_size() -> None:
    torch.manual_seed(0)
    w = {"a": torch.randn(2000, 32) * 0.05, "b": torch.randn(1000, 32) * 0.05}
    p = {"a": torch.rand(2000) ** 6, "b": torch.rand(1000) ** 2}
    frac = assign_by_fractions(p, {"a": 32, "b": 32}, {"fp16": 0.1, "int8": 0.3, "int4": 0.6})
    budget = sum(row_bytes(TIER_ORDER[int(i)], 32) for t in frac.tiers.values() for i in t)
    opt = assign_by_budget(p, w, budget)
    assert opt.details["row_bytes"] <= budget

    def objective(a):
        def err(n, t):  # (no SHARED rows here: assign_by_budget refuses the tier)
            return quantization_error(w[n], t) if t is not Tier.SHARED else torch.zeros(w[n].shape[0], dtype=torch.float64)

        return sum(float((p[n].double() * torch.stack([err(n, t) for t in TIER_ORDER], 1)
                          .gather(1, a.tiers[n].long().unsqueeze(1)).squeeze(1)).sum()) for n in w)

    assert objective(opt) == pytest.approx(weighted_error(opt, p, w), rel=1e-9)
    assert objective(opt) < objective(frac)


def test_budget_solution_is_optimal_for_its_size_by_brute_force() -> None:
    torch.manual_seed(1)
    w = {"a": torch.randn(4, 16) * 0.1}
    p = {"a": torch.tensor([3.0, 0.5, 1.0, 0.05])}
    tiers = [Tier.FP16, Tier.INT8, Tier.INT4, Tier.DROP]
    err = torch.stack([quantization_error(w["a"], t) for t in tiers], 1)
    size = [row_bytes(t, 16) for t in tiers]
    for budget in (60, 100, 150, 200):
        opt = assign_by_budget(p, w, budget, tiers=tiers)
        used = opt.details["row_bytes"]
        best = min(sum(float(p["a"][r] * err[r, k]) for r, k in enumerate(choice))
                   for choice in itertools.product(range(4), repeat=4)
                   if sum(size[k] for k in choice) <= used)
        assert weighted_error(opt, p, w) == pytest.approx(best, rel=1e-9, abs=1e-15)
        assert used <= budget


def test_drop_rows_unused_drops_only_rows_never_read() -> None:
    from shark_torchrec.quant.tiers import BudgetError

    torch.manual_seed(1)
    w = {"a": torch.randn(400, 32)}
    p = {"a": torch.cat([torch.zeros(100), torch.rand(300) ** 8])}  # rows 0-99 never read
    int2, int4 = row_bytes(Tier.INT2, 32), row_bytes(Tier.INT4, 32)
    budget = 300 * int2 + 20 * (int4 - int2)  # every used row in INT2, 20 of them in INT4
    drop = TIER_ORDER.index(Tier.DROP)
    anyrow = assign_by_budget(p, w, budget).tiers["a"]
    # By default rarely used rows are dropped too (cheap under the priority-weighted error) ...
    assert bool((anyrow[100:] == drop).any())
    unused = assign_by_budget(p, w, budget, drop_rows="unused").tiers["a"]
    # ... with "unused" only the 100 rows never read may be, and the budget still holds.
    assert bool((unused[:100] == drop).all()) and not bool((unused[100:] == drop).any())
    assert sum(row_bytes(TIER_ORDER[int(i)], 32) for i in unused) <= budget
    with pytest.raises(BudgetError, match="below the smallest possible size"):
        assign_by_budget(p, w, 300 * int2 - 1, drop_rows="unused")
    with pytest.raises(ValueError, match="drop_rows must be 'any' or 'unused'"):
        assign_by_budget(p, w, budget, drop_rows="used")


def test_tiers_do_not_depend_on_the_priorities_scale() -> None:
    """Scaling every priority by one constant leaves the problem as it was: the same tiers,
    budget and weighted error (over 1e-44 .. 1e300, where the float32 breakpoints underflowed to
    0 or overflowed to inf before: every row dropped with room to spare), in assign_by_budget
    and in the budget of quantize_'s policy alike."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from shark_torchrec.quant import RowwiseQuantConfig, assign_tiers

    torch.manual_seed(0)
    w = torch.randn(2000, 16) * 0.05
    p0 = (torch.rand(2000) + 0.01).double()
    budget = 2000 * row_bytes(Tier.INT4, 16, 16)
    ref = assign_by_budget({"t": p0}, {"t": w}, budget)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=2000,
                                                            feature_names=["f"])])
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.copy_(w)
    config = RowwiseQuantConfig(budget_fraction=0.3, row_alignment=1, tiers=("fp16", "int8", "int4", "int2", "drop"))
    ref_policy = assign_tiers(ebc, config, priorities={"t": p0})
    assert len(set(ref.tiers["t"].tolist())) > 1  # (a mix: what could change)
    for c in (1e-44, 1e-40, 1e-20, 1e20, 1e40, 1e300):
        a = assign_by_budget({"t": p0 * c}, {"t": w}, budget)
        assert torch.equal(a.tiers["t"], ref.tiers["t"]), c
        assert a.details["lambda"] == pytest.approx(ref.details["lambda"] * c, rel=1e-6)
        b = assign_tiers(ebc, config, priorities={"t": p0 * c})
        assert torch.equal(b.tiers["t"], ref_policy.tiers["t"]), c


def test_rows_beyond_fp16_range_take_a_tier_that_stores_them_or_are_named() -> None:
    """A finite row beyond FP16's range cannot be stored FP16 (it reads inf), nor INT with a
    minimum below -65504 (its fp16 bias overflows): with priority 0 it took FP16 (0 * inf was
    NaN, which no cost beat); now such tiers are closed to it.  Where none is open, the error
    names the table and row and says why; a row within range but with DROP closed to it by
    drop_rows='unused' and no other tier is refused up front.  A row in use that only DROP could
    take was dropped (read as zeros) for want of a tier: named too; one of priority 0 may be."""
    w = torch.randn(4, 8) * 0.1
    w[0, 3] = 7e4  # positive: INT rows still store it (bias = its minimum)
    w[1, 3] = -7e4  # negative: only FP32 or DROP
    p = torch.tensor([1.0, 0.0, 1.0, 0.0]).double()
    w[3] = w[0]
    a = assign_by_budget({"t": p}, {"t": w}, budget_bytes=10 ** 6)
    got = [TIER_ORDER[i] for i in a.tiers["t"].tolist()]
    assert got[0] is not Tier.FP16 and got[3] is not Tier.FP16  # (priority 0: FP16 before)
    assert got[1] is Tier.DROP and got[2] is Tier.FP16  # row 1 unused: DROP may take it
    used = p.clone()
    used[1] = 1.0
    with pytest.raises(ValueError, match=r"table 't': row 1 of the weights holds 70000, beyond FP16's range"):
        assign_by_budget({"t": used}, {"t": w}, budget_bytes=10 ** 6)  # (it was dropped)
    with_fp32 = assign_by_budget({"t": used}, {"t": w}, budget_bytes=10 ** 6, tiers=("fp32", "fp16", "int8"))
    assert TIER_ORDER[int(with_fp32.tiers["t"][1])] is Tier.FP32
    with pytest.raises(ValueError, match=r"table 't': row 1 of the weights holds 70000, beyond FP16's range"):
        assign_by_budget({"t": used}, {"t": w}, budget_bytes=10 ** 6, tiers=("fp16", "int8", "int4"))
    from shark_torchrec.quant import budget as B

    err = B.tier_errors(w, [Tier.FP16, Tier.INT8, Tier.DROP])  # the torch path (SHARED's) too
    assert B._choices_of_errors(err, used, [Tier.FP16, Tier.INT8, Tier.DROP], torch.tensor([16, 12, 0]),
                                "any")[1] == 1
    assert B._choices_of_errors(err, p, [Tier.FP16, Tier.INT8, Tier.DROP], torch.tensor([16, 12, 0]), "any")[1] == -1
    with pytest.raises(ValueError, match=r"drop_rows='unused' closes DROP to rows in use"):
        assign_by_budget({"t": p}, {"t": w}, budget_bytes=10 ** 6, tiers=("drop",), drop_rows="unused")
    from shark_torchrec.quant import RowwiseQuantConfig

    with pytest.raises(ValueError, match=r"drop_rows='unused' closes DROP to rows in use"):
        RowwiseQuantConfig(budget_fraction=0.5, tiers=("drop",), drop_rows="unused")


def test_priorities_of_another_shape_are_refused() -> None:
    """Priorities [n, 1] were sorted along their last dim: every row ranked first, the tiers
    garbage (rows left as torch.empty had them)."""
    p = torch.rand(10)
    with pytest.raises(ValueError, match=r"table 't': priorities must be one per row \(1-D\), got shape \(10, 1\)"):
        assign_by_fractions({"t": p.reshape(10, 1)}, {"t": 8}, {"fp16": 0.3, "int4": 0.7})
