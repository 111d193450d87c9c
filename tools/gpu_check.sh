#!/usr/bin/env bash
# Everything worth checking on a machine with an NVIDIA GPU, in one pass (a GPU is lent rarely):
#   1. build the extension in place (CUDA kernels for this GPU's arch only: quick),
#   2. the test suite on the cuda devices (torch, triton and cuda backends; past-2^31 tests too),
#      with compute-sanitizer memcheck over the parity/bad-input tests running beside it,
#   3. the forward/backward benchmark of the headline shape, Swin-T/ConvNeXt-T end to end, and
#      torch.compile last (slow to compile), each with its report.
# Logs and results go to $OUT (default gpu-check/).
#   4. (issue 12) `e2e`: the bf16 end-to-end benchmark, side by side in one process per run:
#      ViT-S/B/L at B = 64/256 eager (unpruned, PaPr and the bound at z = 0.7/0.5/0.3, the
#      proposal alone; ViT-B: also the proposal's levers, benchmarks/test_e2e.py PROPOSAL_LEVERS;
#      last, ViT-B at B = 1/8/32 eager and replayed from a CUDA graph, SMALL_BATCHES),
#      Swin-T / ConvNeXt-T at B = 64/256 bf16 eager at z = 0.65/0.5 (issue 17),
#      then, in what is left of E2E_BUDGET_S (default 300 s), torch.compile of ViT-B at B = 256,
#      z = 0.5 (unpruned, PaPr, bound, proposal). `e2e-compile`: that compile run with its own
#      time; `e2e-compile-hier`: Swin-T / ConvNeXt-T compiled at B = 256 (issue 17, about 8
#      minutes); `e2e-fp32`: Swin-T / ConvNeXt-T in fp32; `e2e-cp`: ViT-B eager with the proposal
#      compiled (Proposal(compiled=True)) beside the plain eager rows (about 3 minutes);
#      `e2e-families`: Hiera-B, NaFlexVit-B and CAFormer-S18 bf16 eager (about a minute).
#      Each run writes $OUT/<run>.json (also when its timeout stops it: SIGINT, and pytest-benchmark
#      saves what was measured) and <run>.log; the tables go to stdout.
#   5. (issue 14) `percall`: benchmarks/per_call_gpu.py, host and GPU time per call of every
#      backend against the copy floor, into $OUT/per-call-gpu.md.
#   Usage: [PY=python3] bash tools/gpu_check.sh [build|wheel] [tests] [bench] [compile] [percall]
#          [e2e] [e2e-compile] [e2e-compile-hier] [e2e-fp32] [e2e-cp] [e2e-families]
# Default: build tests bench (about 7 minutes on an H100 with 16 cores). `compile` (torch.compile
# provider, up to 5 minutes) is a separate call: one call may run 10 minutes at most.
# A session's 15 device minutes (machine start included) fit two calls, most important first,
# both with carry ["dist"] after `make wheel`:
#   1. `wheel tests percall` (about 6 minutes): issues 13, 15, 16 (suite + memcheck on CUDA, the
#      wheel on the GPU's torch) and 14's table;
#   2. `wheel e2e` (at most E2E_BUDGET_S + ~30 s): issues 12 and 17. Without `build`, the wheel
#      is unpacked whenever no extension is here and dist/ holds one (a call on a fresh machine).
# The checkout is measured, not an installed papr_kernels: PYTHONPATH starts with the repo root.
# Dry run on a CPU machine: GPU_CHECK_DEVICE=cpu runs percall and the e2e runs on tiny cases
# (tests/test_bench_scripts.py does, so that the lent GPU gets a script that works).
set -u
STEPS=" ${*:-build tests bench} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
OUT=${OUT:-gpu-check}
PY=${PY:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PAPR_KERNELS_REQUIRE=torch-cuda,triton-cuda,cuda-cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A step's timeout sends SIGINT first: pytest then reports the failures so far and
# pytest-benchmark writes the JSON of what was measured (SIGTERM lost both); SIGKILL 20 s later.
STOP="timeout -s INT -k 20"
# The card as found (its clocks are never changed here: METHOD.md), read before and after timing.
gpu_state() {
    nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv,noheader 2>/dev/null |
        sed "s/^/GPU state $1 (SM, max SM, memory clocks, temperature, power): /"
}
{ nvidia-smi -L; gpu_state "at start"; nproc; $PY -c "import torch, triton, timm, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'timm', timm.__version__, *((torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)) \
if torch.cuda.is_available() else ('no CUDA device',)))"
} 2>&1 | tee "$OUT/env.txt"

# `wheel` instead of `build` (issue 16): no compile here; the extension's libraries come out of
# the newest dist/papr_kernels-*.whl built on the CPU machine against its torch (run with
# carry ["dist"]), unpacked into papr_kernels/ beside the sources, and run on this machine's torch.
# Every step unpacks it when no extension is here and `build` is not asked (a fresh machine).
has_extension() { compgen -G "papr_kernels/_C*.so" >/dev/null; }
if step wheel || { ! step build && ! has_extension && compgen -G "dist/papr_kernels-*.whl" >/dev/null; }
then
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
has_extension || echo "NO EXTENSION (papr_kernels/_C*.so): the cpp/cuda backends are not" \
    "measured; run with the step wheel and carry [\"dist\"] after make wheel"
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
$STOP 260 $PY -m pytest tests -q -p no:cacheprovider -rfE --maxfail=40 \
    -k "cuda or test_triton.py" \
    >"$OUT/tests.log" 2>&1
echo "tests rc=$? in $((SECONDS - start)) s"; tail -45 "$OUT/tests.log"
wait $sanitizer; echo "sanitizer rc=$? (9: memcheck found errors, 124: timed out)"
tail -15 "$OUT/sanitizer.log"
fi

# Benchmarks, fastest first: the kernels without torch.compile, the end-to-end hierarchical
# models, then torch.compile, whose first compiles took over 100 s for 4 cases on the lent H100
# (2026-11-27). GPU_CHECK_DEVICE=cpu: their tiny --bench-quick cases (a dry run of this script).
BENCH="$PY -m pytest --benchmark-only --bench-device $DEVICE --benchmark-min-rounds=10 \
    --benchmark-max-time=0.05 --benchmark-warmup=off -q -rfE -p no:cacheprovider"
PERCALL_CPU=""
if [ "$DEVICE" = cpu ]; then
    BENCH="$BENCH --bench-quick"
    PERCALL_CPU="--device cpu --dtypes fp32 --batches 2 --rounds 2"
fi
start=$SECONDS
if step bench; then
$STOP 120 $BENCH benchmarks/test_prune.py --benchmark-json="$OUT/bench-kernels.json" \
    -k "test_prune and vit-b16-224- and (B1- or B64- or B1024-) and not fwdbwd and not compile" \
    >"$OUT/bench.log" 2>&1
echo "kernel bench rc=$? in $((SECONDS - start)) s"
$STOP 120 $BENCH benchmarks/test_e2e.py -k hierarchical --benchmark-json="$OUT/bench-e2e.json" \
    >>"$OUT/bench.log" 2>&1
echo "e2e bench rc=$? in $((SECONDS - start)) s"
fi
if step compile; then
$STOP 300 $BENCH benchmarks/test_prune.py --benchmark-json="$OUT/bench-compile.json" \
    -k "test_prune and vit-b16-224- and (B64- or B1024-) and fwd- and (compile or eager)" \
    >>"$OUT/bench.log" 2>&1
echo "compile bench rc=$? in $((SECONDS - start)) s"
fi
# Issue 14: host and GPU (CUDA graph) time per call of every backend, the floor and the user's
# eager code, forward and forward+backward, bf16 and fp32, B = 1/64/256/1024 (about a minute;
# the timeouts of tests and percall, 280 + 230 s at most, fit one 10-minute call).
# per_call_tables FROM: what per_call_gpu.py appended to per-call-gpu.md from line FROM on: its
# heading and final tables, or (stopped by its timeout) the rows it measured. The output's tail
# that comes back is short: no row twice.
per_call_tables() {
    local part; part=$(tail -n +"$1" "$OUT/per-call-gpu.md")
    if grep -q "^| dtype" <<<"$part"; then sed -n '1p;/^| dtype/,$p' <<<"$part"; else echo "$part"; fi
}
if step percall; then
start=$SECONDS
timeout 150 $PY benchmarks/per_call_gpu.py $PERCALL_CPU >"$OUT/per-call-gpu.md" \
    2>"$OUT/per-call-gpu.log"
echo "per-call rc=$? in $((SECONDS - start)) s"; per_call_tables 1
# f as the proposal hands it over (channels_last): read without a copy since 2026-11-30
from=$(( $(wc -l <"$OUT/per-call-gpu.md") + 1 ))
timeout 80 $PY benchmarks/per_call_gpu.py --f-layout channels_last --dtypes bf16 \
    --batches 64 256 $PERCALL_CPU >>"$OUT/per-call-gpu.md" 2>>"$OUT/per-call-gpu.log"
echo "per-call channels_last rc=$? in $((SECONDS - start)) s"; per_call_tables "$from"
tail -5 "$OUT/per-call-gpu.log"
fi
# Issues 12 and 17: side by side in one process per run (CUDA-event medians of >= 10 rounds).
# e2e_run NAME SECONDS KEXPR [OPTION...]: the test_e2e.py cases matching KEXPR (with the pytest
# OPTIONs) into $OUT/NAME.json and NAME.log, stopped after SECONDS or at E2E_END (SECONDS of this
# shell) when that is sooner; prints its exit status, failures and summary line.
E2E_END=
e2e_run() {
    local start=$SECONDS limit=$2
    if [ -n "$E2E_END" ] && [ $((E2E_END - SECONDS)) -lt "$limit" ]; then
        limit=$((E2E_END - SECONDS))
    fi
    if [ "$limit" -lt 30 ]; then
        echo "$1 SKIPPED: ${limit} s left of E2E_BUDGET_S"; return
    fi
    $STOP "$limit" $BENCH benchmarks/test_e2e.py -k "$3" "${@:4}" \
        --benchmark-json="$OUT/$1.json" >"$OUT/$1.log" 2>&1
    echo "$1 rc=$? in $((SECONDS - start)) s (limit $limit s)"
    grep -E "^(FAILED|ERROR) " "$OUT/$1.log" | cut -c1-300 | head -20
    grep -E "KeyboardInterrupt|^=* ?[0-9].* in [0-9.]+s" "$OUT/$1.log" | tail -2
}
# The dry run's tiny cases are fp32 (CPU); on the GPU the runs below take the bf16 ones.
BF16=bf16; [ "$DEVICE" = cpu ] && BF16=fp32
COMPILE_CASES="test_e2e_gpu and compile and vit_base_patch16_224 and $BF16 and B256 and \
(unpruned or z0.5 or proposal)"
if step e2e; then   # the ViTs, Swin-T and ConvNeXt-T in bf16, then ViT-B compiled, in the budget
E2E_END=$((SECONDS + ${E2E_BUDGET_S:-300}))
e2e_run bench-e2e-gpu 170 "test_e2e_gpu and eager and vit_ and $BF16 and not cp"
e2e_run bench-e2e-gpu-hierarchical 120 "test_e2e_gpu and eager and not vit_ and $BF16"
e2e_run bench-e2e-gpu-compile 300 "$COMPILE_CASES"
E2E_END=
gpu_state "after the e2e runs"
fi
if step e2e-compile && ! step e2e; then
e2e_run bench-e2e-gpu-compile 300 "$COMPILE_CASES"
fi
# Issue 17 under torch.compile: Swin-T and ConvNeXt-T at B = 256 (8 compiles: a call of its own).
if step e2e-compile-hier; then
e2e_run bench-e2e-gpu-compile-hier 480 \
    "test_e2e_gpu and compile and not vit_ and $BF16 and B256"
fi
# The families added after the GPU runs (test_e2e.py FAMILY_MODELS: Hiera-B, NaFlexVit-B,
# CAFormer-S18), bf16 eager at B = 64 / 256: about a minute, when a lease has it to spare.
if step e2e-families; then
e2e_run bench-e2e-gpu-families 150 "test_e2e_gpu and eager and $BF16" --bench-families
fi
if step e2e-fp32; then
e2e_run bench-e2e-gpu-fp32 150 "test_e2e_gpu and eager and not vit_ and fp32"
fi
# The compiled-proposal lever (Proposal(compiled=True), ViT-B eager, B = 64 and 256): two compiles
# of MobileOne-S0, so a step of its own (the other proposal levers come with `proposal`: seconds).
# Not the small batches (B < 64: the e2e step's).
if step e2e-cp; then
e2e_run bench-e2e-gpu-cp 240 "test_e2e_gpu and eager and vit_base_patch16_224 and \
(B64 or B256) and (unpruned or z0.5 or proposal)"
fi
# Reports: made in a scratch folder (only 8 files come back from the lent machine: $OUT keeps
# the JSON and logs), printed here. The e2e runs make one report, so that the targets of issues
# 12 and 17 are checked across them.
REPORT=$(mktemp -d)
e2e_json=("$OUT"/bench-e2e-gpu*.json)
if [ -f "${e2e_json[0]}" ]; then
    if $PY benchmarks/report.py "${e2e_json[@]}" --combined "$REPORT/e2e-gpu.json" --no-plot \
            >"$REPORT/report.log" 2>&1; then
        sed -n '/^\*\*End to end, side by side/,$p' "$REPORT/e2e-gpu.md"
    else
        echo "report.py failed on ${e2e_json[*]}:"; tail -5 "$REPORT/report.log"
    fi
fi
for j in "$OUT"/bench-*.json; do
    case "$j" in *bench-e2e-gpu*) continue ;; esac
    [ -f "$j" ] || continue
    cp "$j" "$REPORT/" && $PY benchmarks/report.py "$REPORT/$(basename "$j")" --no-plot \
        >/dev/null 2>&1 && grep -A14 "^| shape\|^| model" "$REPORT/$(basename "${j%.json}").md" \
        | head -30
done
rm -rf "$REPORT"
