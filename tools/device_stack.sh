#!/usr/bin/env bash
# The lent GPU machine's stack on this CPU machine: a venv with its torch and triton (see
# ../shared/FACTS.md: torch 2.11.0+cu130, triton 3.6.0; the torch wheel from PyPI runs on CPU),
# then, with the extension of the checkout (`make install`, built against the pinned torch and
# loaded through the stable ABI, as the wheel is there):
#   1. the test suite but test_large (CUDA tests skip; Triton runs under its interpreter),
#   2. the Triton compile report (tools/gpu_report.py triton rows) with that triton.
# What would fail on the GPU machine for its versions fails here, not in its 15 device minutes.
# numpy stays below 2.4 in that venv: triton 3.6's interpreter calls int() on 1-element arrays,
# which numpy 2.4 refuses (the compiled path is unaffected).
# The venv takes ~5 GB (torch's CUDA wheel and its nvidia libraries): with less than
# DEVICE_STACK_MIN_FREE_GB (default 8) free, this says so and stops without failing; with
# DEVICE_STACK_CLEAN=1 (CI) the venv is removed afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_VERSION="${DEVICE_TORCH:-2.11.0}"
TORCHVISION_VERSION="${DEVICE_TORCHVISION:-0.26.0}"
TRITON_VERSION="${DEVICE_TRITON:-3.6.0}"
# its Python too (3.12) where pyenv has one, else python3
PYTHON="${DEVICE_PYTHON:-}"
if [ -z "$PYTHON" ]; then
  PYTHON="$(ls -d "$(pyenv root 2>/dev/null || true)"/versions/3.12*/bin/python3.12 2>/dev/null \
    | tail -1 || true)"
fi
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/build/venv-device-torch-$TORCH_VERSION-$("$PYTHON" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"
pin() { grep -E "^$1==" "$ROOT/requirements.txt"; }

mkdir -p "$ROOT/build"
FREE_GB=$(( $(df -Pk "$ROOT/build" | awk 'NR == 2 { print $4 }') / 1024 / 1024 ))
if [ ! -x "$VENV/bin/python" ] && [ "$FREE_GB" -lt "${DEVICE_STACK_MIN_FREE_GB:-8}" ]; then
  echo "device stack: SKIPPED, only $FREE_GB GB free on $ROOT/build (the venv needs ~5 GB;" \
    "DEVICE_STACK_MIN_FREE_GB=${DEVICE_STACK_MIN_FREE_GB:-8})" >&2
  exit 0
fi
# Its own Inductor cache: CI runs this beside `make test` (the pinned torch compiling too).
export TORCHINDUCTOR_CACHE_DIR="$ROOT/build/inductor-device-stack"
[ "${DEVICE_STACK_CLEAN:-0}" = 1 ] && trap 'rm -rf "$VENV" "$TORCHINDUCTOR_CACHE_DIR"' EXIT

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --no-cache-dir "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
  "triton==$TRITON_VERSION" "numpy==2.3.5" "$(pin timm)" "$(pin pytest)" "$(pin pytest-benchmark)" \
  "$(pin hypothesis)" "$(pin onnx)" "$(pin onnxruntime)" "$(pin onnxscript)" "$(pin matplotlib)"
"$VENV/bin/python" -c "import sys, torch, triton; print('device stack: Python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__)"

cd "$ROOT"
export PYTHONPATH="$ROOT"
# test_large is left to `make test`: it checks only this package's kernels (64-bit offsets, no
# torch-version-dependent code) and needs ~11 GB; two of it at once would not fit in 24 GB.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_large.py
"$VENV/bin/python" tools/gpu_report.py triton rows ${GPU_REPORT_ARGS:-}
