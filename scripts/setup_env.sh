#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the pinned CPU stack.
#
#   scripts/setup_env.sh            # CPU stack into .venv (default)
#   VENV=/path scripts/setup_env.sh # another location
#
# Idempotent: a stamp file records the pinned versions; when it matches, nothing is
# reinstalled and the editable install of the project is only refreshed if missing.
#
# Why each step looks the way it does (see docs/INSTALL.md):
# * torch 2.13.0 CPU build first, so nothing later can pull a CUDA build of torch.
# * fbgemm-gpu-cpu 1.8.0 is the CPU build of FBGEMM matching torch 2.13.
# * torchrec 1.8.0 goes in with --no-deps: its metadata requires `fbgemm-gpu` (the CUDA
#   build) which would replace the CPU one.  Its real runtime deps are listed explicitly.
# * torchmetrics is pinned to 1.0.3: newer versions break torchrec.metrics' compute().
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP_CONTENT="torch==2.13.0 fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 torchmetrics==1.0.3 faiss-cpu==1.15.1 v6"
STAMP="$VENV/.shark-torchrec-stack"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_CONTENT" ] && "$VENV/bin/python" -c "import shark_torchrec" 2>/dev/null; then
    exit 0
fi

echo "[setup] creating the environment in $VENV"
"$PYTHON" -m venv "$VENV"
LOG="$VENV/setup.log"
: > "$LOG"
pip_install() {  # quiet on success; the full pip log on failure
    "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >>"$LOG" 2>&1 \
        || { cat "$LOG"; echo "[setup] pip install $* failed (log: $LOG)" >&2; exit 1; }
}
# TORCH_INDEX_URL (optional): where pip finds the +cpu build of torch 2.13.0, e.g.
# https://download.pytorch.org/whl/cpu on a machine whose pip would otherwise pick the
# CUDA build from PyPI.  Machines with a local wheel cache for pip need nothing.
TORCH_ARGS=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL"); fi
pip_install "torch==2.13.0" numpy "${TORCH_ARGS[@]}"
pip_install "fbgemm-gpu-cpu==1.8.0"
pip_install --no-deps "torchrec==1.8.0"
pip_install -r "$ROOT/requirements/runtime.txt"
pip_install -r "$ROOT/requirements/dev.txt"
pip_install --no-deps --no-build-isolation -e "$ROOT"
echo "$STAMP_CONTENT" > "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, torchrec, fbgemm_gpu; print("torch", torch.__version__, "torchrec", torchrec.__version__ if hasattr(torchrec, "__version__") else "1.8.0")' 2>/dev/null)"
