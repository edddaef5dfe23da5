"""Integer rows fitted by least squares (``row_fit="lsq"``, shark_torchrec/quant/rows.py and
csrc/quantize_rows.cpp): never worse than FBGEMM's min/max quantizer, the codes the nearest
levels of the stored scale and bias, the CPU kernels and torch agreeing, and the byte budget
measuring the errors of the fit it stores."""

import pytest
import torch

from shark_torchrec.quant import RowwiseQuantConfig, Tier, assign_by_budget, dequantize_rows, quantize_rows
from shark_torchrec.quant import budget as B
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.quant.rows import BITS, fit_scale_bias, fused_nbit_rows, pack_rows, unpack_rows
from shark_torchrec.quant.tiers import quantization_error

INTEGER = [Tier.INT8, Tier.INT4, Tier.INT2]


def _rows(n=3000, dim=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, dim, generator=g) * torch.rand(n, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    w[0] = 0.25  # a constant row (FBGEMM's range-0 case)
    w[1] = 0.0
    w[2, :] = 0.0
    w[2, 5] = 3.0  # one outlier
    w[3] = torch.linspace(-1e4, 1e4, dim)  # a wide row
    return w


def _error(w: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    return ((w.double() - back.double()) ** 2).sum(1)


@pytest.mark.parametrize("tier", INTEGER)
def test_fitted_rows_are_never_worse_and_their_codes_are_the_nearest_levels(tier) -> None:
    w = _rows()
    bits = BITS[tier]
    minmax = _error(w, dequantize_rows(w, tier))  # FBGEMM's own quantizer and dequantizer
    fitted = _error(w, dequantize_rows(w, tier, row_fit="lsq"))
    assert bool((fitted <= minmax).all())
    # the stored codes are those FBGEMM's rule gives for the stored scale and bias
    fused = fused_nbit_rows(w, bits, "lsq")
    scale, bias = fused[:, -4:].contiguous().view(torch.float16).float().unbind(1)
    q = unpack_rows(fused[:, :-4], bits, w.shape[1]).float()
    want = torch.clamp(torch.round((w - bias[:, None]) * (1.0 / scale)[:, None]), 0, (1 << bits) - 1)
    assert torch.equal(q, want)
    assert torch.equal(torch.stack([scale, bias], 1), torch.stack(fit_scale_bias(w, bits), 1))
    # the fp16 scale is positive: FBGEMM's kernels read any such row
    assert bool((scale > 0).all())


def test_the_fit_lowers_the_error_most_where_levels_are_few() -> None:
    """On Gaussian rows the squared error of INT2 about halves (4 levels spent on the extremes
    by min/max), INT4's falls by about a tenth."""
    w = torch.randn(4000, 64, generator=torch.Generator().manual_seed(3))
    ratio = {t: float(_error(w, dequantize_rows(w, t, row_fit="lsq")).sum() / _error(w, dequantize_rows(w, t)).sum())
             for t in INTEGER}
    assert ratio[Tier.INT2] < 0.65 and ratio[Tier.INT4] < 0.95 and ratio[Tier.INT8] < 1.0


def test_pack_rows_is_fbgemms_layout() -> None:
    w = _rows(50, 24)
    for bits in (8, 4, 2):
        fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
        assert torch.equal(pack_rows(unpack_rows(fused[:, :-4], bits, 24), bits), fused[:, :-4])
        assert torch.equal(fused_nbit_rows(w, bits, "minmax"), fused)


def test_the_kernels_measure_the_errors_torch_measures() -> None:
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels could not be built here")
    w = _rows()
    tiers = [Tier.FP16, *INTEGER, Tier.DROP]
    for fit in ("minmax", "lsq"):
        got = torch.ops.shark_torchrec.row_tier_errors(w, [B._BITS[t] for t in tiers], fit == "lsq")
        want = torch.stack([quantization_error(w, t, fit) for t in tiers], 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_a_byte_budget_chooses_by_the_fitted_errors() -> None:
    """With the fit, INT2 costs less error, so a budget that must choose between INT4 and INT2
    puts more rows in INT2's place it would otherwise buy elsewhere — and the assignment
    records the fit, which the conversion then stores."""
    w = {"t": _rows(2000, 32, seed=5)}
    p = {"t": torch.rand(2000, generator=torch.Generator().manual_seed(6)).double()}
    budget = 2000 * 20  # between all-INT2 (12 bytes) and all-INT4 (20 bytes) with 1-byte rows
    plain = assign_by_budget(p, w, budget, tiers=("int4", "int2"), row_alignment=1)
    fitted = assign_by_budget(p, w, budget, tiers=("int4", "int2"), row_alignment=1, row_fit="lsq")
    assert plain.row_fit == "minmax" and fitted.row_fit == "lsq"
    errors = {f: (p["t"] * torch.stack([quantization_error(w["t"], t, f) for t in (Tier.INT4, Tier.INT2)], 1)
                  .gather(1, (a.tiers["t"].long() - 3).unsqueeze(1)).squeeze(1)).sum()
              for f, a in (("minmax", plain), ("lsq", fitted))}
    assert float(errors["lsq"]) < float(errors["minmax"])
    with pytest.raises(ValueError, match="row_fit must be one of"):
        assign_by_budget(p, w, budget, tiers=("int4", "int2"), row_fit="best")
    with pytest.raises(ValueError, match="RowwiseQuantConfig.row_fit"):
        RowwiseQuantConfig(budget_fraction=0.2, row_fit="best")


def test_quantize_rows_stores_the_fitted_scale_and_bias_separately() -> None:
    w = _rows(40, 16)
    rows, sb = quantize_rows(w, Tier.INT4, "lsq")
    fused = fused_nbit_rows(w, 4, "lsq")
    assert torch.equal(rows, fused[:, :-4]) and torch.equal(sb, fused[:, -4:])
