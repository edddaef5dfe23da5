"""How one embedding row is stored in each tier: FBGEMM's row formats, and what a stored row
reads as on CPU and on CUDA (the reference the tests and the error reports use)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torchrec.modules.embedding_configs import DataType

from shark_torchrec.quant.tiers import Tier

DATA_TYPE = {Tier.FP32: DataType.FP32, Tier.FP16: DataType.FP16, Tier.INT8: DataType.INT8,
             Tier.INT4: DataType.INT4, Tier.INT2: DataType.INT2}
BITS = {Tier.INT8: 8, Tier.INT4: 4, Tier.INT2: 2}


def quantize_rows(w: torch.Tensor, tier: Tier) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Float rows → FBGEMM's stored form: ``(uint8 rows, uint8 [rows, 4] scale/bias or None)``."""
    w = w.detach().float().contiguous()
    if tier is Tier.FP32:
        return w.view(torch.uint8), None
    if tier is Tier.FP16:
        return w.half().contiguous().view(torch.uint8), None
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, BITS[tier])
    # The op puts the fp16 scale and bias last; the TBE keeps them in a separate view.
    return q[:, :-4].contiguous(), q[:, -4:].contiguous()


def dequantize_rows(w: torch.Tensor, tier: Tier, device_type: str = "cpu") -> torch.Tensor:
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
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    if device_type == "cpu":
        return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits)
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
