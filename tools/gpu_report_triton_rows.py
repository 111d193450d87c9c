"""Compile the hierarchical row kernels (papr_kernels/ops/triton_rows.py) ahead of time for sm_90
(no GPU needed) and report registers, spills, stack and shared memory per specialization.

Configs: Swin-T stage grids (56x56x96, 14x14x384, 7x7x768) at z = 0.5, B = 64; x (B, H, W, C)
contiguous, NCHW seen channels-last, and (B, N, C); fp16 and fp32. Specialization, spill and
resource parsing are tools/gpu_report_triton.py's. Exits non-zero on any spill or stack frame.

    python tools/gpu_report_triton_rows.py
"""
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpu_report_triton as report  # noqa: E402

GRIDS = ((56, 56, 96), (14, 14, 384), (7, 7, 768))
BATCH, ARCH = 64, 90


def jobs():
    from papr_kernels.ops import triton_rows as tr
    for dtype in ("fp16", "fp32"):
        for h, w, c in GRIDS:
            n, k = h * w, h * w // 2
            for layout in ("nhwc", "nchw", "bnc"):
                sb, sh, sw, sc = {"nhwc": (n * c, w * c, c, 1), "nchw": (c * n, w, 1, n),
                                  "bnc": (n * c, 0, c, 1)}[layout]
                blocks = tr.block_sizes(c)
                common = dict(s_xb=sb, s_xh=sh, s_xw=sw, s_xc=sc, s_ib=k, s_ij=1, N=n, W=w, C=c,
                              KEEP=k, num_chunks=1, chans_per_prog=c)
                rows = dict(num_blocks=-(-k // blocks["BLOCK_R"]))
                vals = dict(s_vb=k * c, s_vj=c, s_vc=1)
                grid, upcast = layout != "bnc", dtype == "fp16"
                label = f"{dtype} {layout} {h}x{w}x{c}"
                yield ("gather", label, tr._gather_kernel,
                       dict(x_ptr=dtype, idx_ptr="i64", out_ptr=dtype, **common, **rows),
                       dict(GRID=grid, BLOCK_R=blocks["BLOCK_R"], BLOCK_C=blocks["BLOCK_C"]))
                for has_x in (False, True):
                    yield ("scatter_back (dense)" if has_x else "scatter_rows (dense)", label,
                           tr._scatter_dense_kernel,
                           dict(x_ptr=dtype, idx_ptr="i64", v_ptr=dtype, out_ptr=dtype,
                                num_blocks=-(-n // blocks["BLOCK_P"]), **common, **vals),
                           dict(HAS_X=has_x, UPCAST=upcast, GRID=grid, BLOCK_P=blocks["BLOCK_P"],
                                BLOCK_J=blocks["BLOCK_J"], BLOCK_C=blocks["BLOCK_C"]))
                yield ("scatter_back (inplace)", label, tr._scatter_add_inplace_kernel,
                       dict(x_ptr=dtype, idx_ptr="i64", v_ptr=dtype, **common, **rows, **vals),
                       dict(UPCAST=upcast, GRID=grid, BLOCK_R=blocks["BLOCK_R"],
                            BLOCK_C=blocks["BLOCK_C"]))


def compile_one(fn, sig, attrs, consts):
    import triton
    from triton.backends.compiler import GPUTarget
    triton.knobs.nvidia.dump_ptxas_log = True
    log, start = io.StringIO(), time.time()
    with contextlib.redirect_stdout(log):
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                                  options={"num_warps": 4})
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
    regs, stack, smem, local = report._resources(compiled.asm["cubin"])
    return dict(regs=regs, spills=spills + local, stack=stack,
                smem=max(smem, compiled.metadata.shared), seconds=time.time() - start)


def main() -> int:
    cache = tempfile.mkdtemp(prefix="papr-rows-report-")
    os.environ["TRITON_CACHE_DIR"] = cache
    seen, failures = {}, []
    print(f"| kernel | config | regs | spills (B) | stack (B) | smem (B) | compile (s) |\n"
          f"| --- | --- | --- | --- | --- | --- | --- |")
    try:
        for name, label, fn, values, constexprs in jobs():
            sig, attrs, consts = report._specialize(fn, values, constexprs)
            key = (name, repr(sig), repr(sorted(attrs.items())), repr(sorted(consts.items())))
            if key in seen:
                continue
            row = seen[key] = compile_one(fn, sig, attrs, consts)
            print(f"| {name} | {label} | {row['regs']} | {row['spills']} | {row['stack']} | "
                  f"{row['smem']} | {row['seconds']:.1f} |", flush=True)
            if row["spills"] or row["stack"]:
                failures.append(f"{name} {label}: {row['spills']} B spilled, "
                                f"{row['stack']} B stack")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rows = list(seen.values())
    print(f"\nsm_{ARCH}: {len(rows)} specializations, max regs {max(r['regs'] for r in rows)}, "
          f"total spills {sum(r['spills'] for r in rows)} B, "
          f"max stack {max(r['stack'] for r in rows)} B")
    for line in failures:
        print("FAIL:", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
