#!/usr/bin/env bash
# The oldest timm that pyproject.toml admits (`timm>=X`): the patches reach into timm's model
# classes (ViT's _pos_embed, Swin/ConvNeXt stages, Attention's layers), so every test that
# builds a timm model runs again with that timm in front of the pinned one (pip --target, no
# other package changes; the Triton interpreter cases are left to `make test`).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
MIN="$(sed -n 's/.*"timm>=\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")"
[ -n "$MIN" ] || { echo "timm-compat: no timm>= in pyproject.toml" >&2; exit 1; }
TARGET="$ROOT/build/timm-$MIN"
[ -f "$TARGET/timm/__init__.py" ] || "$PY" -m pip install -q --no-deps --no-cache-dir \
  --target "$TARGET" "timm==$MIN"
cd "$ROOT"
PYTHONPATH="$TARGET" "$PY" -c "import timm; assert timm.__version__ == '$MIN', timm.__file__; \
print('timm', timm.__version__, 'from', timm.__file__)"
PYTHONPATH="$TARGET" "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra -k "not triton" \
  tests/test_timm.py tests/test_timm_usage.py tests/test_timm_merge.py tests/test_timm_video.py \
  tests/test_timm_eva.py tests/test_timm_beit.py tests/test_timm_cait.py tests/test_timm_relpos.py \
  tests/test_timm_hiera.py tests/test_timm_naflexvit.py \
  tests/test_proposal.py tests/test_hierarchical.py tests/test_hierarchical_fused.py \
  tests/test_onnx.py tests/test_cuda_graphs.py
