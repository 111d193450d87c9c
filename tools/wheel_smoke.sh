#!/usr/bin/env bash
# Install the newest dist/papr_kernels-*.whl into a fresh venv and smoke-test it outside the
# source tree: import (from the wheel, not the checkout), `python -m papr_kernels info`, and
# prune on CPU equal to the reference. The fresh venv gets the project's torch through a .pth
# pointing at .venv's site-packages (no second 5 GB install); the .venv's own editable install
# of papr_kernels is not visible there (.pth files of an added path are not processed).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
WHEEL="$(ls -t "$ROOT"/dist/papr_kernels-*.whl | head -1)"
SMOKE="$(mktemp -d /tmp/papr-wheel-smoke.XXXXXX)"
trap 'rm -rf "$SMOKE"' EXIT
"$PY" -m venv --without-pip "$SMOKE/venv"
SITE_SRC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SITE_DST="$("$SMOKE/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$SITE_SRC" > "$SITE_DST/project-venv-deps.pth"
"$PY" -m pip --python "$SMOKE/venv/bin/python" install -q --no-deps "$WHEEL" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --target "$SITE_DST" "$WHEEL"
echo "wheel: $(basename "$WHEEL")"
cd "$SMOKE"
"$SMOKE/venv/bin/python" -m papr_kernels info
"$SMOKE/venv/bin/python" - <<'PYEOF'
import os, torch, papr_kernels
from papr_kernels import reference, backends
assert os.path.dirname(papr_kernels.__file__).startswith(os.getcwd()), papr_kernels.__file__
assert backends.unavailable_reason("cpp", "cpu") is None, backends.unavailable_reason("cpp", "cpu")
import papr_kernels._C as ext
print("extension:", ext.__file__)
x = torch.randn(4, 197, 768)
f = torch.randint(-9, 9, (4, 1024, 14, 14)).float()
for order in ("score", "spatial"):
    out, idx = papr_kernels.prune(x, f, 0.5, order=order, return_indices=True)
    ref_out, ref_idx = reference.prune(x, f, 0.5, order=order, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx), order
print("wheel smoke test passed: cpp backend == reference")
PYEOF
