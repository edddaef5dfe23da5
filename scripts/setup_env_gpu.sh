#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the CUDA stack (for machines with NVIDIA GPUs).
#
#   scripts/setup_env_gpu.sh                       # CUDA 12.8 builds into .venv-gpu
#   CUDA_VARIANT=cu126 VENV=/path scripts/setup_env_gpu.sh
#
# torch 2.13.0 and fbgemm-gpu 1.8.0 are the same releases as the CPU stack, in their CUDA
# builds, both taken from PyTorch's wheel index for CUDA_VARIANT so that they are built
# against the same CUDA.  torchrec 1.8.0 again goes in with --no-deps (it would otherwise
# resolve fbgemm-gpu from PyPI, possibly for another CUDA).  The recipes then pick nccl and
# EmbeddingLocation.DEVICE automatically (`--device auto`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-gpu}"
PYTHON="${PYTHON:-python3}"
CUDA_VARIANT="${CUDA_VARIANT:-cu128}"
INDEX="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$CUDA_VARIANT}"
STAMP_CONTENT="torch==2.13.0 fbgemm-gpu==1.8.0 $CUDA_VARIANT torchrec==1.8.0 torchmetrics==1.0.3 faiss-cpu==1.15.1 v2"
STAMP="$VENV/.shark-torchrec-stack"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_CONTENT" ] && "$VENV/bin/python" -c "import shark_torchrec" 2>/dev/null; then
    exit 0
fi

echo "[setup-gpu] creating the environment in $VENV ($CUDA_VARIANT from $INDEX)"
"$PYTHON" -m venv "$VENV"
LOG="$VENV/setup.log"
: > "$LOG"
pip_install() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >>"$LOG" 2>&1 \
        || { cat "$LOG"; echo "[setup-gpu] pip install $* failed (log: $LOG)" >&2; exit 1; }
}
pip_install "torch==2.13.0" --index-url "$INDEX"
pip_install "fbgemm-gpu==1.8.0" --index-url "$INDEX"
pip_install --no-deps "torchrec==1.8.0"
pip_install -r "$ROOT/requirements/runtime.txt"
pip_install -r "$ROOT/requirements/dev.txt"
pip_install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec  # noqa: F401  (fbgemm must load its CUDA ops)
assert torch.cuda.is_available(), "torch sees no GPU: check the driver and CUDA_VARIANT"
print("[setup-gpu] torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(0))
PY
echo "$STAMP_CONTENT" > "$STAMP"
