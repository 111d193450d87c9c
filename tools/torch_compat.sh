#!/usr/bin/env bash
# One wheel, two torch versions: install the newest dist/papr_kernels-*.whl (built against the
# pinned torch, 2.14.1) into a fresh venv with another torch (default 2.13.0, the CPU build on
# this machine's disk; TORCH_COMPAT_VERSION overrides: 2.10.0, the oldest the wheel claims, passed
# on 2026-12-03) and run the extension's tests there, from
# a copy of tests/ outside the source tree, so they import the wheel and not the checkout.
# The wheel is never rebuilt for that torch: the stable ABI (csrc/stable.h) is what lets it load.
# timm is not installed there (its torchvision dependency does not import beside torch 2.13.0),
# so the one test of `python -m papr_kernels info` (which imports timm) is left out.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_VERSION="${TORCH_COMPAT_VERSION:-2.13.0}"
VENV="$ROOT/build/venv-torch-$TORCH_VERSION"
WHEEL="$(ls -t "$ROOT"/dist/papr_kernels-*.whl | head -1)"
pin() { grep -E "^$1==" "$ROOT/requirements.txt"; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "$(pin pytest)" "$(pin hypothesis)" \
  "$(pin numpy)"
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$WHEEL"

WORK="$(mktemp -d /tmp/papr-torch-compat.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT/tests" "$WORK/"
cd "$WORK"
echo "wheel: $(basename "$WHEEL") in a venv with torch $TORCH_VERSION"
"$VENV/bin/python" - "$TORCH_VERSION" <<'PYEOF'
import os, sys, torch, papr_kernels
from papr_kernels.ops import extension
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert os.path.dirname(papr_kernels.__file__).startswith(sys.prefix), papr_kernels.__file__
info = extension.build_info()
assert info is not None, extension.unavailable_reason("cpu")
print(f"torch {torch.__version__} loaded the extension built against torch {info['torch']} "
      f"(stable ABI >= {info['stable_abi']}, {info['python_abi']}-abi3); prune on cpu runs: "
      f"{papr_kernels.backends.pick(None, 'cpu')}")
PYEOF
PAPR_KERNELS_REQUIRE=cpp-cpu "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts=-ra \
  -k "(cpp or extension or build_info) and not test_info_says" tests/test_cpp.py tests/test_parity.py tests/test_rows.py \
  tests/test_errors.py tests/test_autograd.py
