"""Compile every Triton kernel of papr_kernels ahead of time for sm_80 and sm_90 (no GPU needed)
and report registers, spills, stack and shared memory per distinct kernel specialization.

Configs (issue 3): N in (196, 576, 1568, 3136) patches (+1 class token, z = 0.5), C in (384, 768,
1024, 1280), K in (1024, 2048), dtype in (fp16, bf16, fp32) for x and f, order score/spatial.
For each config the launcher's real arguments (a B = 64 launch on a 132-SM H100) go through
Triton's own specialization (`native_specialize_impl`: ints equal to 1 become constexprs, ints and
pointers divisible by 16 get tt.divisibility), so the compiled code is what the JIT would build;
configs with identical signature, attributes, constexprs and num_warps are compiled once (C and K
are runtime ints, all multiples of 16 here, so they mostly collapse; dtypes and N do not).

Compiles run in parallel processes (--jobs, default: CPU count) with a fresh Triton cache that is
deleted afterwards. Spills come from ptxas' own log (-v, captured from Triton's compile), stack,
registers and shared memory from `cuobjdump --dump-resource-usage` of the cubin. Exits non-zero on
any spill, any stack frame, or shared memory above the architecture's per-block limit.

    python tools/gpu_report_triton.py [--quick] [--jobs N]     (--quick: fp16 only)
"""
import argparse
import contextlib
import io
import math
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # max dynamic shared memory per block (opt-in)
ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
# (N patches, f spatial shape, token grid): image 4-D f (bicubic) or video 5-D f (trilinear)
PROBLEMS = [(196, (7, 7), (14, 14)), (576, (12, 12), (24, 24)),
            (1568, (8, 7, 7), (8, 14, 14)), (3136, (16, 7, 7), (16, 14, 14))]
CHANNELS = (384, 768, 1024, 1280)
PROPOSAL_CHANNELS = (1024, 2048)
PREFIX, Z, BATCH, SMS = 1, 0.5, 64, 132


def _split(rows, channels):
    """The launcher's _split for a CUDA device with SMS multiprocessors."""
    from papr_kernels.ops import triton_prune as tp
    want = max(1, (4 * SMS + BATCH - 1) // BATCH)
    row_chunks = min(want, (rows + tp.BLOCK_R - 1) // tp.BLOCK_R)
    chan_chunks = min(max(1, want // row_chunks), (channels + tp.BLOCK_C - 1) // tp.BLOCK_C)
    return -(-rows // row_chunks), -(-channels // chan_chunks)   # rows, channels per program


def _specialize(fn, values, constexprs):
    """Triton's JIT specialization of the runtime arguments: (signature, attrs, constexprs)."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    signature, attrs, consts = {}, {}, dict(constexprs)
    for idx, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if isinstance(value, str):   # a pointer: a small tensor of that dtype (16-aligned)
            value = torch.empty(8, dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16",
                                                         "fp32": "float32", "i64": "int64"}[value]))
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            consts[name] = key
        elif key and "D" in key:
            attrs[(idx,)] = [["tt.divisibility", 16]]
    return signature, attrs, consts


def build_jobs(dtypes):
    from papr_kernels.ops import triton_prune as tp
    from papr_kernels.ops.triton_prune import _scale
    jobs = {}   # key -> job (dedupe), job["configs"] lists the configs it covers
    for dtype in dtypes:
        for n, fshape, grid in PROBLEMS:
            video = len(fshape) == 3
            src = fshape if video else (1,) + fshape
            dst = grid if video else (1,) + grid
            keep = int((n + PREFIX) * Z) - PREFIX
            for spatial in (False, True):
                for c in CHANNELS:
                    for k in PROPOSAL_CHANNELS:
                        rows_per, chans_per = _split(PREFIX + keep, c)
                        scales = [_scale(i, o, True) for i, o in zip(src, dst)]
                        values = dict(x_ptr=dtype, f_ptr=dtype, out_ptr=dtype, idx_ptr="i64",
                                      stride_xb=(n + PREFIX) * c, stride_xn=c, stride_xc=1,
                                      C=c, K=k, S=math.prod(src), N=n, P=PREFIX, KEEP=keep,
                                      in_t=src[0], in_h=src[1], in_w=src[2], out_t=dst[0],
                                      out_h=dst[1], out_w=dst[2], scale_t=scales[0],
                                      scale_h=scales[1], scale_w=scales[2],
                                      rows_per_prog=rows_per, chans_per_prog=chans_per)
                        meta = tp.fwd_constexprs(n, math.prod(src), video, True, spatial)
                        sig, attrs, consts = _specialize(tp._prune_fwd_kernel, values, meta)
                        warps = tp.fwd_num_warps(n)
                        label = (f"N={n} S={math.prod(src)} {'video' if video else 'image'} "
                                 f"{'spatial' if spatial else 'score'} {dtype} w{warps}")
                        key = ("fwd", repr(sig), repr(sorted(attrs.items())),
                               repr(sorted(consts.items())), warps)
                        job = jobs.setdefault(key, dict(kind="fwd", sig=sig, attrs=attrs,
                                                        consts=consts, warps=warps, label=label, n=n,
                                                        configs=[]))
                        job["configs"].append((c, k))
                        # backward: C and the token count; K, order and f do not enter it
                        if spatial or k != PROPOSAL_CHANNELS[0]:
                            continue
                        nt = n + PREFIX
                        toks_per, bchans_per = _split(nt, c)
                        values = dict(g_ptr=dtype, idx_ptr="i64", gx_ptr=dtype,
                                      stride_gb=(PREFIX + keep) * c, stride_gn=c, stride_gc=1,
                                      C=c, NT=nt, P=PREFIX, KEEP=keep, toks_per_prog=toks_per,
                                      chans_per_prog=bchans_per)
                        sig, attrs, consts = _specialize(tp._prune_bwd_kernel, values,
                                                         tp.bwd_constexprs())
                        key = ("bwd", repr(sig), repr(sorted(attrs.items())),
                               repr(sorted(consts.items())), 4)
                        job = jobs.setdefault(key, dict(kind="bwd", sig=sig, attrs=attrs,
                                                        consts=consts, warps=4, n=0,
                                                        label=f"all N {dtype} w4", configs=[]))
                        job["configs"].append((c, "-"))
    return list(jobs.values())


def _resources(cubin: bytes):
    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", fh.name], check=True,
                              capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    smem = int(re.search(r"SHARED:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1))
    return regs, stack, smem, local


def compile_job(args):
    """Worker: compile one (job, arch); returns the row. Runs in a fresh process."""
    job, arch = args
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from papr_kernels.ops import triton_prune as tp
    fn = tp._prune_fwd_kernel if job["kind"] == "fwd" else tp._prune_bwd_kernel
    triton.knobs.nvidia.dump_ptxas_log = True   # ptxas -v output, printed to stdout
    start = time.time()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        src = triton.compiler.ASTSource(fn=fn, signature=dict(job["sig"]),
                                        constexprs=dict(job["consts"]), attrs=job["attrs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": job["warps"]})
    seconds = time.time() - start
    if not re.search(r"Used \d+ registers", log.getvalue()):
        raise RuntimeError(f"no ptxas -v log captured for {job['label']} sm_{arch}")
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
    regs, stack, smem, local = _resources(compiled.asm["cubin"])
    smem = max(smem, compiled.metadata.shared)
    return dict(kind=job["kind"], arch=f"sm_{arch}", label=job["label"], regs=regs,
                spills=spills + local, stack=stack, smem=smem, seconds=seconds,
                configs=len(job["configs"]), limit=SMEM_LIMIT[arch])


def _fmt(row):
    return (f"| {row['kind']} | {row['arch']} | {row['label']} | {row['configs']} | {row['regs']} | "
            f"{row['spills']} | {row['stack']} | {row['smem']} | {row['seconds']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fp16 only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    start = time.time()
    jobs = build_jobs(("fp16",) if args.quick else DTYPES)
    total_configs = sum(len(j["configs"]) for j in jobs if j["kind"] == "fwd")
    work = [(job, arch) for arch in ARCHS for job in jobs]
    # biggest sorts first: they take longest, the small ones fill in behind them
    work.sort(key=lambda w: -w[0]["n"])
    print(f"{total_configs} forward configs -> {sum(j['kind'] == 'fwd' for j in jobs)} distinct "
          f"forward + {sum(j['kind'] == 'bwd' for j in jobs)} backward specializations; "
          f"{len(work)} compilations for sm_80/sm_90 on {args.jobs} processes", flush=True)
    header = ("| kernel | arch | specialization | configs | regs | spills (B) | stack (B) | "
              "smem (B) | compile (s) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(header, flush=True)
    cache = tempfile.mkdtemp(prefix="papr-gpu-report-")
    os.environ["TRITON_CACHE_DIR"] = cache   # fresh, inherited by the workers, removed below
    os.environ.pop("TRITON_INTERPRET", None)
    rows = []
    try:
        with mp.get_context("spawn").Pool(max(1, args.jobs)) as pool:
            for row in pool.imap_unordered(compile_job, work):
                rows.append(row)
                print(_fmt(row), flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    failures = []
    for row in rows:
        where = f"{row['kind']} {row['arch']} {row['label']}"
        if row["spills"] or row["stack"]:
            failures.append(f"{where}: {row['spills']} B spilled, {row['stack']} B stack")
        if row["smem"] > row["limit"]:
            failures.append(f"{where}: {row['smem']} B shared > {row['limit']}")
    rows.sort(key=lambda r: (r["kind"] != "fwd", r["arch"], r["label"]))
    print("\nFinal table\n" + header)
    for row in rows:
        print(_fmt(row))
    print()
    for arch in ARCHS:
        sub = [r for r in rows if r["arch"] == f"sm_{arch}"]
        print(f"sm_{arch}: {len(sub)} kernels, max regs {max(r['regs'] for r in sub)}, "
              f"total spills {sum(r['spills'] for r in sub)} B, max stack "
              f"{max(r['stack'] for r in sub)} B, max smem {max(r['smem'] for r in sub)} B "
              f"(limit {SMEM_LIMIT[arch]})")
    print(f"{len(rows)} compilations in {time.time() - start:.0f} s wall "
          f"({sum(r['seconds'] for r in rows):.0f} s of compile in the workers)")
    for line in failures:
        print("FAIL:", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
