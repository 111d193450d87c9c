#!/usr/bin/env bash
# Everything worth checking on a machine with an NVIDIA GPU, in one pass (a GPU is lent rarely):
#   1. build the extension in place (CUDA kernels for this GPU's arch only: quick),
#   2. the test suite on the cuda devices (torch, triton and cuda backends; past-2^31 tests too),
#      with compute-sanitizer memcheck over the parity/bad-input tests running beside it,
#   3. the forward/backward benchmark of the headline shape on the GPU, then its report.
# Logs and results go to $OUT (default gpu-check/). Usage: [PY=python3] bash tools/gpu_check.sh
set -u
OUT=${OUT:-gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PAPR_KERNELS_REQUIRE=torch-cuda,triton-cuda,cuda-cuda
{ nvidia-smi -L; nproc; $PY -c "import torch, triton, timm, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'timm', timm.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
} 2>&1 | tee "$OUT/env.txt"

arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
start=$SECONDS
TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=1 MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1
echo "build rc=$? in $((SECONDS - start)) s"; grep -A8 "build configuration" "$OUT/build.log"
$PY -m papr_kernels info 2>&1 | tee -a "$OUT/env.txt"

start=$SECONDS
PATH=$PATH:/usr/local/cuda/bin PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY -m pytest tests/test_parity.py tests/test_errors.py -q -p no:cacheprovider -x \
    -k "triton-cuda or cuda-cuda" >"$OUT/sanitizer.log" 2>&1 &
sanitizer=$!
timeout 260 $PY -m pytest tests -q -p no:cacheprovider -rfE --maxfail=40 -k cuda \
    >"$OUT/tests.log" 2>&1
echo "tests rc=$? in $((SECONDS - start)) s"; tail -45 "$OUT/tests.log"
wait $sanitizer; echo "sanitizer rc=$? (9: memcheck found errors, 124: timed out)"
tail -15 "$OUT/sanitizer.log"

start=$SECONDS
timeout 170 $PY -m pytest benchmarks/test_prune.py --benchmark-only --bench-device cuda \
    -k "test_prune and vit-b16-224- and (B1- or B64- or B1024-) and not fwdbwd" \
    --benchmark-min-rounds=10 --benchmark-max-time=0.05 --benchmark-warmup=off -q \
    -p no:cacheprovider --benchmark-json="$OUT/bench-cuda.json" >"$OUT/bench.log" 2>&1
echo "bench rc=$? in $((SECONDS - start)) s"
$PY benchmarks/report.py "$OUT/bench-cuda.json" --no-plot >"$OUT/bench-cuda.md" 2>&1
cat "$OUT/bench-cuda.md"
