"""Compile every Triton kernel of papr_kernels ahead of time for sm_80 and sm_90 (no GPU needed)
and report registers, spills and shared memory per kernel specialization.

Exits non-zero on any spill or on shared memory above the architecture's limit.
Configs: N in (196, 576, 1568, 3136), C in (384, 768, 1024, 1280), K in (1024, 2048), x/f dtype in
(fp16, bf16, fp32); C and K are runtime arguments, so they do not create specializations:
only distinct constexpr sets are compiled.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from papr_kernels.ops import triton_prune as tp  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # max dynamic shared memory per block
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
# (N, grid, f spatial size, video): realistic pairs of token grid and proposal map
PROBLEMS = [(196, 49, False), (576, 144, False), (1568, 392, True), (3136, 784, True)]
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def fwd_signature(dtype):
    sig = {"x_ptr": f"*{dtype}", "f_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "idx_ptr": "*i64"}
    for name in ("stride_xb", "stride_xn", "stride_xc"):
        sig[name] = "i64"
    for name in ("C", "K", "S", "N", "P", "KEEP", "in_t", "in_h", "in_w", "out_t", "out_h",
                 "out_w"):
        sig[name] = "i32"
    for name in ("scale_t", "scale_h", "scale_w"):
        sig[name] = "fp32"
    sig["rows_per_prog"] = sig["chans_per_prog"] = "i32"
    return sig


def bwd_signature(dtype):
    sig = {"g_ptr": f"*{dtype}", "idx_ptr": "*i64", "gx_ptr": f"*{dtype}"}
    for name in ("stride_gb", "stride_gn", "stride_gc"):
        sig[name] = "i64"
    for name in ("C", "NT", "P", "KEEP", "toks_per_prog", "chans_per_prog"):
        sig[name] = "i32"
    return sig


def resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", fh.name], check=True,
                              capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    smem = int(re.search(r"SHARED:(\d+)", text).group(1))
    spills = sum(int(v) for v in re.findall(r"(?:LOCAL|spill\w*):(\d+)", text))
    return regs, spills, stack, smem


def compile_one(fn, signature, constexprs, arch, num_warps=4):
    for name, value in constexprs.items():
        signature[name] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def main() -> int:
    jobs = []
    for dtype in DTYPES:
        for n, source, video in PROBLEMS:
            for spatial in (False, True):
                meta = tp.fwd_constexprs(n, source, video, True, spatial)
                jobs.append(("fwd", tp._prune_fwd_kernel, fwd_signature(dtype), meta, tp.fwd_num_warps(n),
                             f"N={n} S={source} {dtype} {'video' if video else 'image'} "
                             f"{'spatial' if spatial else 'score'}"))
        jobs.append(("bwd", tp._prune_bwd_kernel, bwd_signature(dtype), tp.bwd_constexprs(), 4,
                     f"{dtype}"))
    if "--quick" in sys.argv:
        jobs = [j for j in jobs if "fp16" in j[5]]
    rows, failures = [], []
    start = time.time()
    for arch in (80, 90):
        for kind, fn, sig, meta, warps, config in jobs:
            compiled = compile_one(fn, dict(sig), dict(meta), arch, warps)
            regs, spills, stack, smem = resources(compiled.asm["cubin"])
            smem = max(smem, compiled.metadata.shared)
            rows.append((kind, f"sm_{arch}", config, regs, spills, stack, smem))
            if spills:
                failures.append(f"{kind} sm_{arch} {config}: {spills} bytes spilled")
            if smem > SMEM_LIMIT[arch]:
                failures.append(f"{kind} sm_{arch} {config}: {smem} B shared > {SMEM_LIMIT[arch]}")
    print(f"| kernel | arch | config | regs | spills | stack | smem (B) |")
    print(f"| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
    print(f"\n{len(rows)} compilations in {time.time() - start:.0f} s; max regs "
          f"{max(r[3] for r in rows)}, max spills {max(r[4] for r in rows)}, max smem "
          f"{max(r[6] for r in rows)} B")
    for line in failures:
        print("FAIL:", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
