"""The project's CPU kernels: the mixed collection's lookup
(``torch.ops.shark_torchrec.mixed_embedding_bag``, ``csrc/mixed_lookup.cpp``) and the tier
choice of a byte budget (``row_tier_errors``, ``tier_hull``, ``hull_histogram``, ``hull_pick``,
``csrc/tier_choice.cpp``; see :mod:`shark_torchrec.quant.budget`) and the conversion of rows
into sub-tables (``quantize_into``, ``csrc/quantize_rows.cpp``), an id check
(``first_id_outside``, ``csrc/check_ids.cpp``) and the field-importance tracker's per-step sums
(``taylor_sums``, ``column_stats``, ``csrc/taylor_sums.cpp``; ``row_counts_add``,
``csrc/row_counts.cpp``).

FBGEMM has no CPU op that reads a bag whose rows sit in sub-tables of different precisions:
its TBE reads each sub-table's part of a bag apart, so the ids must first be split by tier
(``block_bucketize_sparse_features``) and the parts added afterwards.  This kernel
(``csrc/mixed_lookup.cpp``) does the id-map gather, the tier split, the lookup and the pooling
in one pass over the ids, reading the rows where FBGEMM's TBE holds them (so the weights, the
state dict, sharding and the CUDA path stay FBGEMM's).

Both are compiled together, on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; about 20 s
once, then cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) for the
machine it runs on (``-march=native``: AVX2/F16C where the CPU has them, a scalar loop
otherwise).  Where it cannot be built the collection falls back to FBGEMM's ops, with one
warning; ``SHARK_TORCHREC_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

import torch

logger = logging.getLogger(__name__)

_SOURCES = [os.path.join(os.path.dirname(__file__), "csrc", name)
            for name in ("mixed_lookup.cpp", "tier_choice.cpp", "quantize_rows.cpp", "check_ids.cpp",
                         "taylor_sums.cpp", "row_counts.cpp", "nearest_centroid.cpp")]
_lock = threading.Lock()
_state = {"loaded": None}  # None: not tried yet; then True / False


def cpu_kernel_available() -> bool:
    """Whether the kernels (``torch.ops.shark_torchrec.*``) can be used (building them on the
    first call)."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is None:
            _state["loaded"] = _load()
    return _state["loaded"]


def _registered() -> bool:
    return all(hasattr(torch.ops.shark_torchrec, op) for op in
               ("mixed_embedding_bag", "tier_hull", "quantize_into", "first_id_outside", "taylor_sums",
                "row_counts_add_batch", "nearest_centroid"))


def _load() -> bool:
    if os.environ.get("SHARK_TORCHREC_CPU_KERNEL", "1") == "0":
        return False
    if _registered():  # loaded by another copy
        return True
    try:
        from torch.utils.cpp_extension import load

        logger.info("building shark_torchrec's CPU kernels (once per machine)")
        load(name="shark_torchrec_kernels", sources=_SOURCES, is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
        return _registered()
    except Exception as e:  # no compiler, no ninja, read-only cache, ...
        warnings.warn(f"shark_torchrec: the CPU kernels could not be built "
                      f"({type(e).__name__}: {e}); using FBGEMM's block_bucketize + TBE path for "
                      f"lookups and plain torch for tier choices, which are slower", RuntimeWarning)
        return False
