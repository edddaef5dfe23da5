"""The mixed collection's CPU lookup kernel: ``torch.ops.shark_torchrec.mixed_embedding_bag``.

FBGEMM has no CPU op that reads a bag whose rows sit in sub-tables of different precisions:
its TBE reads each sub-table's part of a bag apart, so the ids must first be split by tier
(``block_bucketize_sparse_features``) and the parts added afterwards.  This kernel
(``csrc/mixed_lookup.cpp``) does the id-map gather, the tier split, the lookup and the pooling
in one pass over the ids, reading the rows where FBGEMM's TBE holds them (so the weights, the
state dict, sharding and the CUDA path stay FBGEMM's).

It is compiled on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; about 20 s
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

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "mixed_lookup.cpp")
_lock = threading.Lock()
_state = {"loaded": None}  # None: not tried yet; then True / False


def cpu_kernel_available() -> bool:
    """Whether ``torch.ops.shark_torchrec.mixed_embedding_bag`` can be used (building it on
    the first call)."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is None:
            _state["loaded"] = _load()
    return _state["loaded"]


def _load() -> bool:
    if os.environ.get("SHARK_TORCHREC_CPU_KERNEL", "1") == "0":
        return False
    if hasattr(torch.ops.shark_torchrec, "mixed_embedding_bag"):  # loaded by another copy
        return True
    try:
        from torch.utils.cpp_extension import load

        logger.info("building the mixed collection's CPU kernel (once per machine)")
        load(name="shark_torchrec_mixed_lookup", sources=[_SOURCE], is_python_module=False,
             extra_cflags=["-O3", "-march=native"], verbose=False)
        return hasattr(torch.ops.shark_torchrec, "mixed_embedding_bag")
    except Exception as e:  # no compiler, no ninja, read-only cache, ...
        warnings.warn(f"shark_torchrec: the mixed collection's CPU kernel could not be built "
                      f"({type(e).__name__}: {e}); using FBGEMM's block_bucketize + TBE path, "
                      f"which is slower", RuntimeWarning)
        return False
