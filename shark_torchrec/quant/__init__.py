"""Row-wise mixed precision (SHARK's F-Quantization): tiers per embedding row.

* :class:`Tier`, :data:`TIER_ORDER` — FP32, FP16, INT8, INT4, INT2 (FBGEMM's inference
  precisions), SHARED (a row read as one of its table's centroids,
  :mod:`~shark_torchrec.quant.shared_rows`) and DROP.
* :func:`assign_by_fractions`, :func:`assign_by_budget` → :class:`TierAssignment` — from row
  priorities to per-row tiers, with byte reports computed by FBGEMM's own helpers.
* :class:`RowwiseMixedEmbeddingBagCollection` (+ its input transform,
  :class:`MixedInputTransform`) — the mixed-precision collection on TorchRec's quantized
  collection / FBGEMM's IntNBit TBE, in pieces that can be read and profiled apart:
  :mod:`~shark_torchrec.quant.rows` (row formats), :mod:`~shark_torchrec.quant.layout` (tier
  layout), :mod:`~shark_torchrec.quant.remap` (id-to-tier step), :mod:`~shark_torchrec.quant.lookup`
  and :mod:`~shark_torchrec.quant.cpu_kernel` (lookups), :mod:`~shark_torchrec.quant.mixed_ebc`
  (the module), :mod:`~shark_torchrec.quant.serialization` (save / load).
* :func:`quantize_` + :class:`RowwiseQuantConfig` — swap a model's collections in place.
"""

from shark_torchrec.quant.api import RowwiseQuantConfig, assign_tiers, quantize_
from shark_torchrec.quant.layout import MixedLayout
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection
from shark_torchrec.quant.remap import MixedInputTransform, RowwiseInputTransform
from shark_torchrec.quant.rows import dequantize_rows, quantize_rows
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
    "MixedLayout",
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
