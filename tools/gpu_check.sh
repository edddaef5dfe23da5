#!/usr/bin/env bash
# GPU check for the row-wise mixed-precision collection (issue 4), sized for < 5 minutes on one GPU:
#   1. the CUDA variants of the module tests (FBGEMM tables in EmbeddingLocation.DEVICE):
#      every tier (INT2 through its fp16-output call) against F.embedding_bag on the rows as
#      CUDA dequantizes them, the upstream INT2 fp32-output bug still being there, and a
#      forward with no host sync (check_ids=False) or exactly one (check_ids=True);
#   2. the lookup benchmark on the GPU (int32 ids, as FBGEMM's CUDA kernels take them), with
#      an INT2 mix and the remap in forward with and without the id check.
# Needs the CUDA stack: `make setup-gpu` (scripts/setup_env_gpu.sh) or PYTHON pointing at an
# interpreter with CUDA torch + fbgemm-gpu + torchrec.  Results: $OUT (default runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv-gpu/bin/python}"
OUT="${OUT:-runs}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
# SHARK_REQUIRE_CUDA turns "no GPU" skips into failures: this check must not pass vacuously.
SHARK_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:warnings -m gpu tests/test_mixed_ebc.py 2>&1 | tee "$OUT/gpu_tests.txt"
"$PY" tools/bench_lookup.py --device cuda --int32 --iters 20 --rounds 3 --out "$OUT/bench_lookup_cuda.json" \
    2>&1 | tee "$OUT/bench_lookup_cuda.txt"
