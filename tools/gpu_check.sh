#!/usr/bin/env bash
# Everything worth checking on a machine with an NVIDIA GPU, in one pass (a GPU is lent rarely):
#   1. build the extension in place (CUDA kernels for this GPU's arch only: quick),
#   2. the test suite on the cuda devices (torch, triton and cuda backends; past-2^31 tests too),
#      with compute-sanitizer memcheck over the parity/bad-input tests running beside it,
#   3. the forward/backward benchmark of the headline shape, Swin-T/ConvNeXt-T end to end, and
#      torch.compile last (slow to compile), each with its report.
# Logs and results go to $OUT (default gpu-check/).
#   4. (issue 12) `e2e`: the bf16 end-to-end benchmark of ViT-S/B/L, Swin-T, ConvNeXt-T at
#      B = 64/256, eager (unpruned, bound, PaPr z = 0.7/0.5/0.3, proposal alone; under 4 minutes;
#      issue 17: Swin-T / ConvNeXt-T at z = 0.65/0.5 in bf16 and fp32),
#      and `e2e-compile`: its torch.compile cases for ViT-B at B = 256, z = 0.5 (a separate step:
#      compiling is slow). They write $OUT/bench-e2e-gpu{,-hierarchical,-cp,-compile}.{json,log,csv,md}.
#      `e2e-cp`: ViT-B eager with the proposal compiled (Proposal(compiled=True)) beside the plain
#      eager rows (about 3 minutes).
#   5. (issue 14) `percall`: benchmarks/per_call_gpu.py, host and GPU time per call of every
#      backend against the copy floor, into $OUT/per-call-gpu.md.
#   Usage: [PY=python3] bash tools/gpu_check.sh [build|wheel] [tests] [bench] [compile] [percall]
#          [e2e] [e2e-cp] [e2e-compile]
# Default: build tests bench (about 7 minutes on an H100 with 16 cores). `compile` (torch.compile
# provider, up to 5 minutes) is a separate call: one call may run 10 minutes at most.
# A session's 15 device minutes (machine start included) fit two calls, most important first:
#   1. `wheel tests percall` (run with carry ["dist"] after `make wheel`; about 6 minutes):
#      issues 13, 15, 16 (suite + memcheck on CUDA, the wheel on the GPU's torch) and 14's table;
#   2. `e2e` (about 5 minutes): issues 12 and 17; then `e2e-cp`, `e2e-compile` in a later session.
set -u
STEPS=" ${*:-build tests bench} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
OUT=${OUT:-gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PAPR_KERNELS_REQUIRE=torch-cuda,triton-cuda,cuda-cuda
{ nvidia-smi -L; nproc; $PY -c "import torch, triton, timm, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'timm', timm.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
} 2>&1 | tee "$OUT/env.txt"

# `wheel` instead of `build` (issue 16): no compile here; the extension's libraries come out of
# the newest dist/papr_kernels-*.whl built on the CPU machine against its torch (run with
# carry ["dist"]), unpacked into papr_kernels/ beside the sources, and run on this machine's torch.
if step wheel; then
$PY - <<'PYEOF'
import glob, os, zipfile
wheel = max(glob.glob("dist/papr_kernels-*.whl"), key=os.path.getmtime)
with zipfile.ZipFile(wheel) as z:
    libs = [n for n in z.namelist() if n.startswith("papr_kernels/_C") and n.endswith(".so")]
    for name in libs:
        with open(name, "wb") as fh:
            fh.write(z.read(name))
print("extension from", os.path.basename(wheel), ":", ", ".join(libs))
PYEOF
fi

if step build; then
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
start=$SECONDS
TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=1 MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1
echo "build rc=$? in $((SECONDS - start)) s"; grep -A8 "build configuration" "$OUT/build.log"
fi
$PY -m papr_kernels info 2>&1 | tee -a "$OUT/env.txt"

if step tests; then
start=$SECONDS
PATH=$PATH:/usr/local/cuda/bin PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY -m pytest tests/test_parity.py tests/test_errors.py tests/test_rows.py \
    -q -p no:cacheprovider -x \
    -k "cuda and not compile and not opcheck" >"$OUT/sanitizer.log" 2>&1 &
sanitizer=$!
# test_triton.py picks its device at import (ids without "cuda"): named by its file.
timeout 260 $PY -m pytest tests -q -p no:cacheprovider -rfE --maxfail=40 \
    -k "cuda or test_triton.py" \
    >"$OUT/tests.log" 2>&1
echo "tests rc=$? in $((SECONDS - start)) s"; tail -45 "$OUT/tests.log"
wait $sanitizer; echo "sanitizer rc=$? (9: memcheck found errors, 124: timed out)"
tail -15 "$OUT/sanitizer.log"
fi

# Benchmarks, fastest first (each writes its JSON only when it completes): the kernels without
# torch.compile, the end-to-end hierarchical models, then torch.compile, whose first compiles
# took over 100 s for 4 cases on the lent H100 (2026-11-27).
BENCH="$PY -m pytest --benchmark-only --bench-device cuda --benchmark-min-rounds=10 \
    --benchmark-max-time=0.05 --benchmark-warmup=off -q -p no:cacheprovider"
start=$SECONDS
if step bench; then
timeout 120 $BENCH benchmarks/test_prune.py --benchmark-json="$OUT/bench-kernels.json" \
    -k "test_prune and vit-b16-224- and (B1- or B64- or B1024-) and not fwdbwd and not compile" \
    >"$OUT/bench.log" 2>&1
echo "kernel bench rc=$? in $((SECONDS - start)) s"
timeout 120 $BENCH benchmarks/test_e2e.py -k hierarchical --benchmark-json="$OUT/bench-e2e.json" \
    >>"$OUT/bench.log" 2>&1
echo "e2e bench rc=$? in $((SECONDS - start)) s"
fi
if step compile; then
timeout 300 $BENCH benchmarks/test_prune.py --benchmark-json="$OUT/bench-compile.json" \
    -k "test_prune and vit-b16-224- and (B64- or B1024-) and fwd- and (compile or eager)" \
    >>"$OUT/bench.log" 2>&1
echo "compile bench rc=$? in $((SECONDS - start)) s"
fi
# Issue 14: host and GPU (CUDA graph) time per call of every backend, the floor and the user's
# eager code, forward and forward+backward, bf16 and fp32, B = 1/64/256/1024 (about a minute).
if step percall; then
start=$SECONDS
timeout 200 $PY benchmarks/per_call_gpu.py >"$OUT/per-call-gpu.md" 2>"$OUT/per-call-gpu.log"
echo "per-call rc=$? in $((SECONDS - start)) s"; cat "$OUT/per-call-gpu.md"
# f as the proposal hands it over (channels_last): read without a copy since 2026-11-30
timeout 80 $PY benchmarks/per_call_gpu.py --f-layout channels_last --dtypes bf16 \
    --batches 64 256 >>"$OUT/per-call-gpu.md" 2>>"$OUT/per-call-gpu.log"
echo "per-call channels_last rc=$? in $((SECONDS - start)) s"; tail -12 "$OUT/per-call-gpu.md"
fi
# Issue 12: side by side in one process each; 10 rounds per case (CUDA-event medians).
# e2e_run NAME SECONDS KEXPR: the test_e2e.py cases matching KEXPR into $OUT/NAME.json (a run
# writes its JSON only when it completes) and NAME.log; prints its exit status and log tail.
e2e_run() {
    local start=$SECONDS
    timeout "$2" $BENCH benchmarks/test_e2e.py -k "$3" --benchmark-json="$OUT/$1.json" \
        >"$OUT/$1.log" 2>&1
    echo "$1 rc=$? in $((SECONDS - start)) s"; tail -3 "$OUT/$1.log"
}
if step e2e; then   # two runs: the ViTs, then Swin-T and ConvNeXt-T
e2e_run bench-e2e-gpu 170 "test_e2e_gpu and eager and vit_ and not cp"
e2e_run bench-e2e-gpu-hierarchical 150 "test_e2e_gpu and eager and not vit_"
fi
# The compiled-proposal lever (Proposal(compiled=True), ViT-B eager, B = 64 and 256): two compiles
# of MobileOne-S0, so a step of its own.
if step e2e-cp; then
e2e_run bench-e2e-gpu-cp 240 \
    "test_e2e_gpu and eager and vit_base_patch16_224 and (unpruned or z0.5 or proposal)"
fi
if step e2e-compile; then
e2e_run bench-e2e-gpu-compile 280 \
    "test_e2e_gpu and compile and vit_base_patch16_224 and B256 and (unpruned or z0.5 or proposal)"
fi
for j in "$OUT"/bench-e2e-gpu*.json; do
    [ -f "$j" ] || continue
    $PY benchmarks/report.py "$j" --no-plot >/dev/null 2>&1 && sed -n '/^\*\*End to end, side by side/,$p' "${j%.json}.md"
done
for j in "$OUT"/bench-*.json; do
    case "$j" in *bench-e2e-gpu*) continue ;; esac
    $PY benchmarks/report.py "$j" --no-plot >/dev/null 2>&1 && grep -A14 "^| shape\|^| model" "${j%.json}.md" | head -30
done
