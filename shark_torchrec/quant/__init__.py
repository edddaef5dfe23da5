"""Row-wise mixed precision (SHARK's F-Quantization): tiers per embedding row.

* :class:`Tier`, :data:`TIER_ORDER` — FP32, FP16, INT8, INT4, INT2 (FBGEMM's inference
  precisions) and DROP.
* :func:`assign_by_fractions`, :func:`assign_by_budget` → :class:`TierAssignment` — from row
  priorities to per-row tiers, with byte reports computed by FBGEMM's own helpers.
* :class:`RowwiseMixedEmbeddingBagCollection` (+ its input transform,
  :class:`MixedInputTransform`) — the
  mixed-precision collection on TorchRec's quantized collection / FBGEMM's IntNBit TBE.
* :func:`quantize_` + :class:`RowwiseQuantConfig` — swap a model's collections in place.
"""

from shark_torchrec.quant.api import RowwiseQuantConfig, assign_tiers, quantize_
from shark_torchrec.quant.mixed_ebc import (
    MixedInputTransform,
    RowwiseInputTransform,
    RowwiseMixedEmbeddingBagCollection,
    dequantize_rows,
    quantize_rows,
)
from shark_torchrec.quant.tiers import (
    DEFAULT_ROW_ALIGNMENT,
    TIER_ORDER,
    Tier,
    TierAssignment,
    assign_by_budget,
    assign_by_fractions,
    quantization_error,
    row_bytes,
    sub_table_bytes,
)

__all__ = [
    "MixedInputTransform",
    "RowwiseInputTransform",
    "RowwiseMixedEmbeddingBagCollection",
    "RowwiseQuantConfig",
    "assign_tiers",
    "dequantize_rows",
    "quantize_",
    "quantize_rows",
    "DEFAULT_ROW_ALIGNMENT",
    "TIER_ORDER",
    "Tier",
    "TierAssignment",
    "assign_by_budget",
    "assign_by_fractions",
    "quantization_error",
    "row_bytes",
    "sub_table_bytes",
]
