"""The tier choice of :mod:`shark_torchrec.quant.budget`: the C++ kernels against FBGEMM's
quantizers and against plain-torch and brute-force references; the exact lowest price; row
fractions by selection against a stable sort."""

import math

import pytest
import torch

from shark_torchrec.quant import TIER_ORDER, Tier, assign_by_fractions, quantization_error, row_bytes
from shark_torchrec.quant import budget as B
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available

TIERS = [Tier.FP32, Tier.FP16, Tier.INT8, Tier.INT4, Tier.INT2, Tier.DROP]


def _kernel_or_skip():
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels could not be built here")


@pytest.mark.parametrize("dim", [8, 12, 64])
def test_kernel_errors_are_fbgemm_quantization_errors(dim) -> None:
    _kernel_or_skip()
    torch.manual_seed(0)
    w = (torch.randn(3000, dim) * torch.rand(3000, 1)).contiguous()
    w[7] = 0.3  # a constant row: FBGEMM's range-0 corner case
    w[8] = 0.0
    # (FBGEMM quantizes INT2 rows only when they fill whole pairs of bytes: dims of 8s)
    tiers = [t for t in TIERS if t is not Tier.INT2 or dim % 8 == 0]
    err = torch.ops.shark_torchrec.row_tier_errors(w, [B._BITS[t] for t in tiers])
    for k, t in enumerate(tiers):
        ref = quantization_error(w, t)
        torch.testing.assert_close(err[:, k], ref, rtol=2e-6, atol=1e-12, msg=lambda m: f"{t}: {m}")
    # A strided view (a column block of a wider table) reads the same as a copy.
    wide = torch.randn(100, dim + 8)
    torch.testing.assert_close(torch.ops.shark_torchrec.row_tier_errors(wide[:, 4:4 + dim], [8, 0]),
                               torch.ops.shark_torchrec.row_tier_errors(wide[:, 4:4 + dim].contiguous(), [8, 0]),
                               rtol=0, atol=0)


def test_non_finite_rows_get_nan_errors_and_name_the_row() -> None:
    w = torch.randn(10, 16)
    w[3, 2] = float("nan")
    w[6, 0] = float("-inf")
    err = B.tier_errors(w, [Tier.INT8, Tier.DROP])
    assert torch.isnan(err[3]).all() and torch.isnan(err[6]).all() and not torch.isnan(err[[0, 1, 2, 4]]).any()
    from shark_torchrec.quant import assign_by_budget

    with pytest.raises(ValueError, match=r"table 'a': row 3 of the weights is not finite"):
        assign_by_budget({"a": torch.ones(10)}, {"a": w}, 10_000)


def _random_costs(n=4000, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    err = torch.rand(n, K, generator=g, dtype=torch.float64).sort(1, descending=False).values
    err[:, 0] = 0.0
    err[: n // 10] = err[: n // 10].round(decimals=1)  # ties between tiers
    p = torch.rand(n, generator=g, dtype=torch.float64) ** 3
    p[: n // 7] = 0.0  # unused rows
    p[n // 7 : n // 5] = 1.0  # equal priorities
    return err, p


@pytest.mark.parametrize("drop_rows", ["any", "unused"])
def test_kernel_hull_equals_the_torch_one(drop_rows, monkeypatch) -> None:
    _kernel_or_skip()
    err, p = _random_costs()
    tiers = [Tier.FP16, Tier.INT8, Tier.INT4, Tier.INT2, Tier.DROP]
    # 1-byte rows at dim 8: INT8 and FP16 differ; 16-byte rows: INT8 and FP16 tie at 16 bytes.
    for align in (1, 16):
        sizes = B.tier_sizes([8], tiers, align)
        fast = B.row_choices(err, p, tiers, sizes, drop_rows)
        with monkeypatch.context() as m:
            m.setattr(B, "cpu_kernel_available", lambda: False)
            slow = B.row_choices(err, p, tiers, sizes, drop_rows)
        assert torch.equal(fast.seq, slow.seq)
        assert torch.equal(fast.breakpoints, slow.breakpoints)
        assert (fast.top_bytes, fast.bottom_bytes) == (slow.top_bytes, slow.bottom_bytes)
        assert fast.top_bytes == int(sizes[slow.seq[:, 0].long()].sum()) > fast.bottom_bytes
        for price in (-1, 0, 0x3A000000, 0x3F000000, 0x7F000000):
            assert torch.equal(B.pick(fast, price), _pick_torch(slow, price, monkeypatch))


def _pick_torch(choices, price, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(B, "cpu_kernel_available", lambda: False)
        return B.pick(choices, price)


def test_the_tier_at_a_price_is_the_least_lagrangian_cost() -> None:
    """Brute force: at a price between breakpoints every row takes argmin p·err + price·bytes."""
    err, p = _random_costs(seed=1)
    tiers = [Tier.FP16, Tier.INT8, Tier.INT4, Tier.INT2, Tier.DROP]
    sizes = B.tier_sizes([16], tiers, 1)
    ch = B.row_choices(err, p, tiers, sizes)
    bps = ch.breakpoints[torch.isfinite(ch.breakpoints)].unique()
    g = torch.Generator().manual_seed(3)
    for lam in torch.rand(40, generator=g, dtype=torch.float64) * float(bps.max()) * 1.2:
        lam32 = torch.tensor([float(lam)], dtype=torch.float32)
        if bool((bps == lam32).any()):
            continue
        got = B.pick(ch, int(lam32.view(torch.int32)))
        cost = p.unsqueeze(1) * err + float(lam32) * sizes.double().unsqueeze(0)
        best = cost.min(1).values
        chosen = cost.gather(1, torch.tensor([tiers.index(TIER_ORDER[int(i)]) for i in got]).unsqueeze(1)).squeeze(1)
        # the chosen tier's cost is the least (breakpoints are float32: allow their rounding)
        assert bool((chosen <= best + 1e-6 * best.abs() + 1e-12).all())


def test_the_price_is_the_lowest_that_meets_the_budget() -> None:
    err, p = _random_costs(seed=2)
    tiers = [Tier.FP16, Tier.INT8, Tier.INT4, Tier.INT2, Tier.DROP]
    sizes = B.tier_sizes([32], tiers, 1)
    halves = [B.row_choices(err[:2500], p[:2500], tiers, sizes), B.row_choices(err[2500:], p[2500:], tiers, sizes)]
    full = B.RowChoices.concat(halves)
    top = B.bytes_at_price_zero(full)
    assert top == sum(B.bytes_at_price_zero(h) for h in halves)
    bps = torch.sort(full.breakpoints[torch.isfinite(full.breakpoints)].unique()).values
    for budget in (top, top - 1, int(top * 0.6), int(top * 0.2), B.smallest_bytes(full)):
        price = B.price_for_budget(halves, budget)
        used = sum(int(sizes[[tiers.index(TIER_ORDER[int(i)]) for i in B.pick(h, price)]].sum()) for h in halves)
        assert used <= budget
        if price >= 0:  # and the breakpoint just below it would not have met the budget
            value = B.price_value(price)
            assert bool((bps == value).any())
            below = bps[bps < value]
            if below.numel():
                lower = int(below[-1:].view(torch.int32)[0])
                assert sum(int(sizes[[tiers.index(TIER_ORDER[int(i)]) for i in B.pick(h, lower)]].sum())
                           for h in halves) > budget
        else:
            assert budget >= top


@pytest.mark.parametrize("split", [[1000], [1, 999], [400, 0, 350, 250]])
def test_fractions_by_selection_equal_a_stable_sort(split) -> None:
    g = torch.Generator().manual_seed(5)
    p = (torch.rand(1000, generator=g, dtype=torch.float64) * 20).floor()  # many ties
    p[::17] = 0.0
    for fr in ({"fp16": 0.1, "int8": 0.3, "int4": 0.6}, {"int8": 0.5, "drop": 0.5},
               {"fp16": 0.0, "int8": 0.999, "int2": 0.001}, {"int4": 1.0}):
        ref = assign_by_fractions({"t": p}, {"t": 8}, fr).tiers["t"]
        order = [t for t in TIER_ORDER if fr.get(t.value, 0) > 0]
        parts = list(torch.split(p, split))
        got = B.fraction_tiers(parts, list(range(len(parts))), len(parts), 1000, order,
                               [fr[t.value] for t in order])
        assert torch.equal(torch.cat(got), ref), fr


def test_sizes_sum_over_column_blocks() -> None:
    s = B.tier_sizes([8, 8], [Tier.INT4, Tier.DROP], 1)
    assert s.tolist() == [2 * row_bytes(Tier.INT4, 8, 1), 0]
    assert math.isclose(B.price_value(-1), 0.0)
