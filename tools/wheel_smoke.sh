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

# The source distribution carries every tracked file a build or a reader needs (not CI's
# files), and a wheel builds from it alone (CPU kernels: FORCE_CUDA=0 keeps this quick).
cd "$ROOT"
PAPR_NO_EXTENSION=1 "$PY" setup.py -q egg_info --egg-base "$SMOKE" sdist -d "$SMOKE/sdist" \
    >/dev/null 2>&1   # a fresh egg-info: an old SOURCES.txt would hide a missing file
SDIST="$(ls "$SMOKE"/sdist/papr_kernels-*.tar.gz)"
"$PY" - "$SDIST" <<'PYEOF'
import subprocess, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout
missing = [p for p in tracked.split() if not p.startswith((".ci/", ".gitignore")) and p not in names]
assert not missing, f"the sdist lacks {missing} (MANIFEST.in)"
print(f"sdist: {len(names)} files, every tracked file included")
PYEOF
mkdir -p "$SMOKE/from-sdist" && cd "$SMOKE/from-sdist"
FORCE_CUDA=0 PAPR_BUILD_TEMP="$SMOKE/from-sdist/build" "$PY" -m pip wheel -q --no-build-isolation \
    --no-deps -w "$SMOKE/from-sdist" "$SDIST" >"$SMOKE/from-sdist.log" 2>&1 \
    || { tail -30 "$SMOKE/from-sdist.log"; exit 1; }
"$PY" -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
assert 'papr_kernels/_C.abi3.so' in names and 'papr_kernels/timm/vit.py' in names, names; \
print('wheel from the sdist:', sys.argv[1].rsplit('/', 1)[1], '(CPU kernels)')" \
    "$(ls "$SMOKE"/from-sdist/papr_kernels-*.whl)"
