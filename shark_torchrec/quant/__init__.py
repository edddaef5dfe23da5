"""Row-wise mixed precision (SHARK's F-Quantization): tiers per embedding row.

* :class:`Tier`, :data:`TIER_ORDER` — FP32, FP16, INT8, INT4, INT2 (FBGEMM's inference
  precisions) and DROP.
* :func:`assign_by_fractions`, :func:`assign_by_budget` → :class:`TierAssignment` — from row
  priorities to per-row tiers, with byte reports computed by FBGEMM's own helpers.
"""

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
