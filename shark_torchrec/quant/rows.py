"""How one embedding row is stored in each tier: FBGEMM's row formats, and what a stored row
reads as on CPU and on CUDA (the reference the tests and the error reports use).

An integer row (INT8/INT4/INT2) is ``q * scale + bias`` with an fp16 scale and bias.  How they
are chosen is the row fit (``row_fit``): ``"minmax"`` as FBGEMM's quantizers do (bias = the
row's minimum, scale = its range / (2^bits - 1)), or ``"lsq"``, fitted to the row by least
squares (:func:`fit_scale_bias`).  Both are FBGEMM's layout, read by the same kernels; the fit
only lowers the error (on trained 64-dim rows: INT2 -48%, INT4 -12%, INT8 -7% squared error).
The CPU kernels fit rows the same way (``fit_row`` in ``csrc/quantize_rows.cpp``)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torchrec.modules.embedding_configs import DataType

from shark_torchrec.quant.tiers import Tier, check_row_fit

DATA_TYPE = {Tier.FP32: DataType.FP32, Tier.FP16: DataType.FP16, Tier.INT8: DataType.INT8,
             Tier.INT4: DataType.INT4, Tier.INT2: DataType.INT2}
BITS = {Tier.INT8: 8, Tier.INT4: 4, Tier.INT2: 2}
#: Rounds of the least-squares refit at most (as ``kFitRounds`` in ``csrc/quantize_rows.cpp``).
FIT_ROUNDS = 8


def fit_scale_bias(w: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fp16 scale and bias (as float32 [n] each) of ``bits``-bit rows fitted to the rows
    ``w`` [n, d] (finite float32) by least squares.

    From FBGEMM's parameters it alternates, per row: the codes nearest each value
    (round-to-nearest-even of ``(x - bias) / scale``, clamped, as FBGEMM computes them), then
    the scale and bias minimising the squared error of those codes (a line fit of x on the
    codes, rounded to fp16), while the error falls (at most :data:`FIT_ROUNDS` refits).  Each
    half-step can only lower the error but for the fp16 rounding, and a refit that does not
    lower it ends the row's search: a row is never stored worse than by FBGEMM's quantizer."""
    w = w.detach().float()
    n, D = w.shape
    top = float((1 << bits) - 1)
    if n == 0:
        return torch.zeros(0), torch.zeros(0)
    lo, hi = torch.aminmax(w, dim=1)
    bias = lo.half().float()
    span = hi - bias
    scale = torch.where(span == 0, torch.ones_like(span), span / top).half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = 1.0 / scale
    inf = torch.isinf(inv)
    scale, inv = torch.where(inf, 1.0, scale), torch.where(inf, 1.0, inv)
    wd = w.double()
    sx, sxx = wd.sum(1), (wd * wd).sum(1)

    def code_sums(bias, inv):  # sum q, sum q^2, sum x q of the codes under (bias, 1 / scale)
        q = torch.clamp(torch.round((w - bias[:, None]) * inv[:, None]), 0, top).double()
        return torch.stack([q.sum(1), (q * q).sum(1), (wd * q).sum(1)])

    def code_error(sums, s, b):  # the squared error, from the sums (as csrc/quantize_rows.cpp)
        sq, sqq, sxq = sums
        s, b = s.double(), b.double()
        return sxx - 2.0 * s * sxq - 2.0 * b * sx + s * s * sqq + 2.0 * s * b * sq + D * b * b

    sums = code_sums(bias, inv)
    err = code_error(sums, scale, bias)
    active = torch.ones(n, dtype=torch.bool)
    for _ in range(FIT_ROUNDS):
        sq, sqq, sxq = sums
        den = D * sqq - sq * sq
        s = (D * sxq - sq * sx) / torch.where(den > 0, den, 1.0)
        b = (sx - s * sq) / D
        s_h, b_h = s.float().half().float(), b.float().half().float()
        inv_h = 1.0 / s_h
        ok = (active & (den > 0) & (s_h > 0) & torch.isfinite(s_h) & torch.isfinite(b_h)
              & ~torch.isinf(inv_h))
        if not bool(ok.any()):
            break
        s_h, b_h, inv_h = torch.where(ok, s_h, scale), torch.where(ok, b_h, bias), torch.where(ok, inv_h, inv)
        new = code_sums(b_h, inv_h)
        new_err = code_error(new, s_h, b_h)
        better = ok & (new_err < err)
        scale, bias, inv = torch.where(better, s_h, scale), torch.where(better, b_h, bias), torch.where(better, inv_h, inv)
        sums, err = torch.where(better, new, sums), torch.where(better, new_err, err)
        active = better
    return scale, bias


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``[rows, dim]`` → FBGEMM's packed row data (the inverse of :func:`unpack_rows`)."""
    per_byte = 8 // bits
    pad = (-q.shape[1]) % per_byte
    q = torch.nn.functional.pad(q.to(torch.int32), (0, pad)).view(q.shape[0], -1, per_byte)
    packed = torch.zeros(q.shape[:2], dtype=torch.int32)
    for j in range(per_byte):
        packed |= q[:, :, j] << (j * bits)
    return packed.to(torch.uint8)


def fused_nbit_rows(w: torch.Tensor, bits: int, row_fit: str = "minmax") -> torch.Tensor:
    """Float rows → FBGEMM's fused ``bits``-bit form (packed codes, then the fp16 scale and
    bias), as ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`` returns it, with the row fit
    ``row_fit``."""
    w = w.detach().float().contiguous()
    if check_row_fit(row_fit) == "minmax":
        packed = -(-w.shape[1] // (8 // bits))
        if packed % 2 == 0 or w.shape[0] == 0:
            return torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
        # FBGEMM's op wants an even fused width: one more byte of columns, each the row's minimum
        # (its range, so its scale and bias, unchanged; their codes 0, as the unused bits of
        # FBGEMM's and the kernel's own rows), then that byte dropped.
        pad = w.amin(1, keepdim=True).expand(-1, (packed + 1) * (8 // bits) - w.shape[1])
        q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(torch.cat([w, pad], 1), bits)
        return torch.cat([q[:, :packed], q[:, -4:]], 1)
    scale, bias = fit_scale_bias(w, bits)
    q = torch.clamp(torch.round((w - bias[:, None]) * (1.0 / scale)[:, None]), 0, (1 << bits) - 1)
    sb = torch.stack([scale.half(), bias.half()], 1).view(torch.uint8)
    return torch.cat([pack_rows(q, bits), sb], 1)


def quantize_rows(w: torch.Tensor, tier: Tier, row_fit: str = "minmax") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Float rows → FBGEMM's stored form: ``(uint8 rows, uint8 [rows, 4] scale/bias or None)``
    (integer rows with the row fit ``row_fit``)."""
    w = w.detach().float().contiguous()
    if tier is Tier.FP32:
        return w.view(torch.uint8), None
    if tier is Tier.FP16:
        return w.half().contiguous().view(torch.uint8), None
    q = fused_nbit_rows(w, BITS[tier], row_fit)
    # The fused form puts the fp16 scale and bias last; the TBE keeps them in a separate view.
    return q[:, :-4].contiguous(), q[:, -4:].contiguous()


def read_fused_rows(fused: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """FBGEMM's CPU reading of fused ``bits``-bit rows (packed codes, fp16 scale and bias) as
    float32 ``[rows, dim]``.  FBGEMM's op wants an even fused width (its fp16 scale and bias
    aligned); rows whose packed codes take an odd number of bytes (INT8 at an odd dim, INT4 at
    dims 1 or 2 mod 4, INT2 at dims 1 to 4 mod 8), which the collection stores and reads, get one
    zero byte of codes more, whose columns are dropped: each element is read as before."""
    if fused.shape[1] % 2:
        fused = torch.cat([fused[:, :-4], torch.zeros(fused.shape[0], 1, dtype=torch.uint8), fused[:, -4:]], 1)
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits)[:, :dim]


def dequantize_rows(w: torch.Tensor, tier: Tier, device_type: str = "cpu", row_fit: str = "minmax") -> torch.Tensor:
    """What a row reads as after storage in ``tier`` (DROP: zeros), in FBGEMM's lookup on
    ``device_type``.

    The integer tiers store ``q`` with an fp16 ``scale`` and ``bias`` per row.  FBGEMM's CPU
    kernels read ``float(q) * scale + bias`` in fp32; its CUDA kernels compute the same with one
    fp16 fused multiply-add (``hfma2``), i.e. ``fp16(q * scale + bias)`` rounded once — so a row
    reads slightly differently on the two devices, and this returns exactly what each reads.
    """
    w = w.detach().float().contiguous().cpu()
    if tier is Tier.DROP:
        return torch.zeros_like(w)
    if tier in (Tier.FP32, Tier.FP16):
        return w if tier is Tier.FP32 else w.half().float()
    bits = BITS[tier]
    fused = fused_nbit_rows(w, bits, row_fit)
    if device_type == "cpu":
        return read_fused_rows(fused, bits, w.shape[1])
    if device_type != "cuda":
        raise ValueError(f"device_type must be 'cpu' or 'cuda', not {device_type!r}")
    q = unpack_rows(fused[:, :-4], bits, w.shape[1]).double()
    scale_bias = fused[:, -4:].contiguous().view(torch.float16).double()
    exact = q * scale_bias[:, :1] + scale_bias[:, 1:]  # exact in float64 (fp16 operands)
    # numpy rounds float64 -> float16 once (round to nearest even), as the fused op does.
    return torch.from_numpy(exact.numpy().astype(np.float16)).float()


def unpack_rows(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """FBGEMM's packed ``bits``-bit row data → integers ``[rows, dim]`` (element ``j`` sits in
    byte ``j * bits // 8`` at bit ``(j * bits) % 8``)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0], -1)[:, :dim]


def check_cuda_scale(table: str, scale_bias: torch.Tensor, rows: torch.Tensor) -> None:
    """FBGEMM's CUDA kernels multiply each row's fp16 scale by up to 512 in fp16 (see
    :func:`dequantize_rows`): a scale of 128 or more (a row spanning over 32,000 for INT8)
    would read as inf there."""
    scale = scale_bias.contiguous().view(torch.float16)[:, 0].float()
    bad = ~torch.isfinite((scale * 512).half())
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"table {table!r}: row {int(rows[i])} spans too wide a range "
                         f"(scale {float(scale[i]):g}) for FBGEMM's CUDA integer kernels")
