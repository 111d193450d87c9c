"""Registers, spills, stack and shared memory of every GPU kernel of papr_kernels, no GPU needed.

    python tools/gpu_report.py [triton] [rows] [cuda] [--quick] [--jobs N] [--library SO]
                               [--arch sm_80 sm_90]          (no section named: all three)

Sections (each prints its table; one shared ending lists every FAIL and sets the exit status):

triton: the prune kernels (papr_kernels/ops/triton/prune.py: forward, backward, channel_mean),
compiled ahead of time for sm_80 and sm_90 per distinct kernel specialization.
Configs (issue 3): N in (196, 576, 1568, 3136) patches (+1 class token, z = 0.5), C in (384, 768,
1024, 1280), K in (1024, 2048), dtype in (fp16, bf16, fp32) for x and f, order score/spatial,
f contiguous (nchw) and channels_last (nhwc: read through its strides, channels innermost).
For each config the launcher's real arguments (a B = 64 launch on a 132-SM H100) go through
Triton's own specialization (`native_specialize_impl`: ints equal to 1 become constexprs, ints and
pointers divisible by 16 get tt.divisibility), so the compiled code is what the JIT would build;
configs with identical signature, attributes, constexprs and num_warps are compiled once (C and K
are runtime ints, all multiples of 16 here, so they mostly collapse; dtypes and N do not).

Compiles run in parallel processes (--jobs, default: CPU count) with a fresh Triton cache that is
deleted afterwards. Spills come from ptxas' own log (-v, captured from Triton's compile), stack,
registers and shared memory from `cuobjdump --dump-resource-usage` of the cubin. Exits non-zero on
any spill, any stack frame, or shared memory above the architecture's per-block limit.
(--quick: fp16 only.)

rows: the hierarchical row kernels (papr_kernels/ops/triton/rows.py, the fused glue included) for
sm_90: Swin-T stage grids
(56x56x96, 14x14x384, 7x7x768) at z = 0.5, B = 64; x (B, H, W, C) contiguous, NCHW seen
channels-last, and (B, N, C); fp16 and fp32. Same specialization and parsing as above.

cuda: the extension's CUDA kernels, read from the built .so (default papr_kernels._C_cuda) with
`cuobjdump --dump-resource-usage` (the toolkit's, or the copy triton ships); fails when a kernel
spills (LOCAL or STACK bytes > 0), an expected architecture (--arch) is missing, or the extension
was built without CUDA.
"""
import argparse
import contextlib
import glob
import importlib.util
import io
import itertools
import math
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # max dynamic shared memory per block (opt-in)
ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
# (N patches, f spatial shape, token grid): image 4-D f (bicubic) or video 5-D f (trilinear)
PROBLEMS = [(196, (7, 7), (14, 14)), (576, (12, 12), (24, 24)),
            (1568, (8, 7, 7), (8, 14, 14)), (3136, (16, 7, 7), (16, 14, 14))]
CHANNELS = (384, 768, 1024, 1280)
PROPOSAL_CHANNELS = (1024, 2048)
PREFIX, Z, BATCH, SMS = 1, 0.5, 64, 132
# f as torch.randn gives it (positions innermost) and as a channels_last proposal returns it
# (channels innermost): the forward reads either without a copy (prune.flat_strides)
F_LAYOUTS = ("nchw", "nhwc")


def _f_strides(layout, channels, positions):
    if layout == "nchw":
        return dict(stride_fb=channels * positions, stride_fk=positions, stride_fs=1)
    return dict(stride_fb=channels * positions, stride_fk=1, stride_fs=channels)


def _split(rows, channels, block_rows):
    """The launcher's split (common.split) for a CUDA device with SMS multiprocessors."""
    from papr_kernels.ops.triton import common, prune as tp
    row_chunks, chan_chunks = common.split(BATCH, rows, channels, block_rows, tp.BLOCK_C, SMS)
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
                                                         "fp32": "float32", "fp64": "float64", "i64": "int64",
                                                         "i32": "int32"}[value]))
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            consts[name] = key
        elif key and "D" in key:
            attrs[(idx,)] = [["tt.divisibility", 16]]
    return signature, attrs, consts


def build_jobs(dtypes):
    from papr_kernels.ops.triton import prune as tp
    jobs = {}   # key -> job (dedupe), job["configs"] lists the configs it covers
    for dtype in dtypes:
        for n, fshape, grid in PROBLEMS:
            video = len(fshape) == 3
            src = fshape if video else (1,) + fshape
            dst = grid if video else (1,) + grid
            keep = int((n + PREFIX) * Z) - PREFIX
            for spatial in (False, True):
                for c, k, f_layout in itertools.product(CHANNELS, PROPOSAL_CHANNELS,
                                                        F_LAYOUTS):
                        rows_per, chans_per = _split(PREFIX + keep, c, tp.BLOCK_R)
                        scales = [bits for i, o in zip(src, dst)
                                  for bits in tp._split_bits(tp._scale(i, o, True))]
                        values = dict(x_ptr=dtype, f_ptr=dtype, out_ptr=dtype, idx_ptr="i64",
                                      stride_xb=(n + PREFIX) * c, stride_xn=c, stride_xc=1,
                                      **_f_strides(f_layout, k, math.prod(src)),
                                      C=c, K=k, S=math.prod(src), N=n, P=PREFIX, KEEP=keep,
                                      in_t=src[0], in_h=src[1], in_w=src[2], out_t=dst[0],
                                      out_h=dst[1], out_w=dst[2], st_hi_bits=scales[0],
                                      st_lo_bits=scales[1], sh_hi_bits=scales[2],
                                      sh_lo_bits=scales[3], sw_hi_bits=scales[4],
                                      sw_lo_bits=scales[5],
                                      rows_per_prog=rows_per, chans_per_prog=chans_per)
                        meta = tp.fwd_constexprs(n, math.prod(src), video, True, spatial)
                        sig, attrs, consts = _specialize(tp._prune_fwd_kernel, values, meta)
                        warps = tp.fwd_num_warps(n)
                        label = (f"N={n} S={math.prod(src)} {'video' if video else 'image'} "
                                 f"{'spatial' if spatial else 'score'} {dtype} f {f_layout} w{warps}")
                        key = ("fwd", repr(sig), repr(sorted(attrs.items())),
                               repr(sorted(consts.items())), warps)
                        job = jobs.setdefault(key, dict(kind="fwd", sig=sig, attrs=attrs,
                                                        consts=consts, warps=warps, label=label, n=n,
                                                        configs=[]))
                        job["configs"].append((c, k))
                        # backward: C and the token count; K, order and f do not enter it
                        if spatial or k != PROPOSAL_CHANNELS[0] or f_layout != F_LAYOUTS[0]:
                            continue
                        nt = n + PREFIX
                        toks_per, bchans_per = _split(nt, c, tp.BLOCK_T)
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
        # channel_mean (the hierarchical models' proposal map): S, dtype and f's layout
        for n, fshape, grid in PROBLEMS:
            source = math.prod(fshape)
            for f_layout in F_LAYOUTS:
                values = dict(f_ptr=dtype, out_ptr="fp64", K=PROPOSAL_CHANNELS[0], S=source,
                              **_f_strides(f_layout, PROPOSAL_CHANNELS[0], source))
                sig, attrs, consts = _specialize(tp._channel_mean_kernel, values,
                                                 tp.mean_constexprs(source))
                warps = tp.MEAN_WARPS
                key = ("mean", repr(sig), repr(sorted(attrs.items())),
                       repr(sorted(consts.items())), warps)
                jobs.setdefault(key, dict(kind="mean", sig=sig, attrs=attrs, consts=consts,
                                          warps=warps, n=0, configs=[],
                                          label=f"channel_mean S={source} {dtype} f {f_layout} "
                                                f"w{warps}"))
                jobs[key]["configs"].append((PROPOSAL_CHANNELS[0], "-"))
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
    from papr_kernels.ops.triton import prune as tp
    fn = {"fwd": tp._prune_fwd_kernel, "bwd": tp._prune_bwd_kernel,
          "mean": tp._channel_mean_kernel}[job["kind"]]
    triton.knobs.nvidia.dump_ptxas_log = True   # ptxas -v output, printed to stdout
    start = time.time()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        src = triton.compiler.ASTSource(fn=fn, signature=dict(job["sig"]),
                                        constexprs=dict(job["consts"]), attrs=job["attrs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": job["warps"],
                                           "enable_fp_fusion": job["kind"] == "bwd"})
    seconds = time.time() - start
    if not re.search(r"Used \d+ registers", log.getvalue()):
        raise RuntimeError(f"no ptxas -v log captured for {job['label']} sm_{arch}")
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
    regs, stack, smem, local = _resources(compiled.asm["cubin"])
    smem = max(smem, compiled.metadata.shared)
    return dict(kind=job["kind"], arch=f"sm_{arch}", label=job["label"], regs=regs,
                spills=spills + local, stack=stack, smem=smem, seconds=seconds,
                configs=len(job["configs"]), limit=SMEM_LIMIT[arch])


def _table(header, rows):
    """The shared table printer: a markdown table of `rows` (lists of cells) under `header`."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


TRITON_HEADER = ["kernel", "arch", "specialization", "configs", "regs", "spills (B)",
                 "stack (B)", "smem (B)", "compile (s)"]


def _triton_cells(row):
    return [row["kind"], row["arch"], row["label"], row["configs"], row["regs"], row["spills"],
            row["stack"], row["smem"], f"{row['seconds']:.1f}"]


def _resource_failures(where, row):
    failures = []
    if row["spills"] or row["stack"]:
        failures.append(f"{where}: {row['spills']} B spilled, {row['stack']} B stack")
    if row["smem"] > row.get("limit", SMEM_LIMIT[90]):
        failures.append(f"{where}: {row['smem']} B shared > {row.get('limit', SMEM_LIMIT[90])}")
    return failures


def report_triton(args):
    """The prune kernels for sm_80 and sm_90; returns the FAIL lines."""
    start = time.time()
    jobs = build_jobs(("fp16",) if args.quick else DTYPES)
    total_configs = sum(len(j["configs"]) for j in jobs if j["kind"] == "fwd")
    work = [(job, arch) for arch in ARCHS for job in jobs]
    # biggest sorts first: they take longest, the small ones fill in behind them
    work.sort(key=lambda w: -w[0]["n"])
    print(f"{total_configs} forward configs -> {sum(j['kind'] == 'fwd' for j in jobs)} distinct "
          f"forward + {sum(j['kind'] == 'bwd' for j in jobs)} backward specializations; "
          f"{len(work)} compilations for sm_80/sm_90 on {args.jobs} processes", flush=True)
    print(_table(TRITON_HEADER, []), flush=True)
    rows = []
    with mp.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        for row in pool.imap_unordered(compile_job, work):
            rows.append(row)
            print(_table(TRITON_HEADER, [_triton_cells(row)]).splitlines()[-1], flush=True)
    failures = []
    for row in rows:
        failures += _resource_failures(f"{row['kind']} {row['arch']} {row['label']}", row)
    rows.sort(key=lambda r: (r["kind"] != "fwd", r["arch"], r["label"]))
    print("\nFinal table\n" + _table(TRITON_HEADER, [_triton_cells(r) for r in rows]) + "\n")
    for arch in ARCHS:
        sub = [r for r in rows if r["arch"] == f"sm_{arch}"]
        print(f"sm_{arch}: {len(sub)} kernels, max regs {max(r['regs'] for r in sub)}, "
              f"total spills {sum(r['spills'] for r in sub)} B, max stack "
              f"{max(r['stack'] for r in sub)} B, max smem {max(r['smem'] for r in sub)} B "
              f"(limit {SMEM_LIMIT[arch]})")
    print(f"{len(rows)} compilations in {time.time() - start:.0f} s wall "
          f"({sum(r['seconds'] for r in rows):.0f} s of compile in the workers)")
    return failures


# ---------------------------------------------------------------------------------------------
# rows: the hierarchical row kernels
# ---------------------------------------------------------------------------------------------
ROW_GRIDS = ((56, 56, 96), (14, 14, 384), (7, 7, 768))
ROWS_ARCH = 90


def row_jobs():
    from papr_kernels.ops.triton import rows as tr
    for dtype in ("fp16", "fp32"):
        for h, w, c in ROW_GRIDS:
            n, k = h * w, h * w // 2
            for layout in ("nhwc", "nchw", "bnc"):
                sb, sh, sw, sc = {"nhwc": (n * c, w * c, c, 1), "nchw": (c * n, w, 1, n),
                                  "bnc": (n * c, 0, c, 1)}[layout]
                blocks = tr.block_sizes(c)
                common = dict(s_xb=sb, s_xh=sh, s_xw=sw, s_xc=sc, s_ib=k, s_ij=1, N=n, W=w, C=c,
                              KEEP=k, num_chunks=1, chans_per_prog=c)
                rows = dict(num_blocks=-(-k // blocks["BLOCK_R"]))
                vals = dict(s_vb=k * c, s_vj=c, s_vc=1)
                dense = dict(map_ptr="i32", s_mb=n, s_mp=1, num_blocks=-(-n // blocks["BLOCK_P"]),
                             **{a: v for a, v in common.items() if a not in ("s_ib", "s_ij")})
                grid, upcast = layout != "bnc", dtype == "fp16"
                label = f"{dtype} {layout} {h}x{w}x{c}"
                if layout == "nhwc":      # the map does not depend on x's layout
                    yield ("kept_row_map", f"{h}x{w}", tr._kept_row_map_kernel,
                           dict(idx_ptr="i64", map_ptr="i32", s_ib=k, s_ij=1, N=n, KEEP=k,
                                num_blocks=-(-k // blocks["BLOCK_M"])),
                           dict(BLOCK_M=blocks["BLOCK_M"]))
                yield ("gather", label, tr._gather_kernel,
                       dict(x_ptr=dtype, idx_ptr="i64", out_ptr=dtype, **common, **rows),
                       dict(GRID=grid, BLOCK_R=blocks["BLOCK_R"], BLOCK_C=blocks["BLOCK_C"]))
                for has_x in (False, True):
                    yield ("scatter_back (dense)" if has_x else "scatter_rows (dense)", label,
                           tr._scatter_dense_kernel,
                           dict(x_ptr=dtype, v_ptr=dtype, out_ptr=dtype, **dense, **vals),
                           dict(HAS_X=has_x, UPCAST=upcast, GRID=grid, BLOCK_P=blocks["BLOCK_P"],
                                BLOCK_C=blocks["BLOCK_C"]))
                yield ("scatter_back (inplace)", label, tr._scatter_add_inplace_kernel,
                       dict(x_ptr=dtype, idx_ptr="i64", v_ptr=dtype, **common, **rows, **vals),
                       dict(UPCAST=upcast, GRID=grid, BLOCK_R=blocks["BLOCK_R"],
                            BLOCK_C=blocks["BLOCK_C"]))
                norm_r, norm_c = tr.norm_block_sizes(c)
                yield ("gather_layer_norm", label, tr._gather_layer_norm_kernel,
                       dict(x_ptr=dtype, idx_ptr="i64", w_ptr=dtype, bias_ptr=dtype,
                            out_ptr=dtype, eps=1e-5, num_blocks=-(-k // norm_r),
                            **{a: v for a, v in common.items()
                               if a not in ("num_chunks", "chans_per_prog")}),
                       dict(HAS_WEIGHT=True, HAS_BIAS=True, UPCAST=dtype != "fp64", GRID=grid,
                            BLOCK_R=norm_r, BLOCK_C=norm_c))
                shortcut = {f"s_s{a[-1]}": v for a, v in common.items() if a.startswith("s_x")}
                yield ("masked_residual", label, tr._masked_residual_kernel,
                       dict(s_ptr=dtype, v_ptr=dtype, g_ptr=dtype, out_ptr=dtype, **vals, **shortcut,
                            **{a: v for a, v in dense.items() if not a.startswith("s_x")}),
                       dict(HAS_GAMMA=True, UPCAST=upcast, GRID=grid, BLOCK_P=blocks["BLOCK_P"],
                            BLOCK_C=blocks["BLOCK_C"]))
    # The widest rows gather_layer_norm takes (one row per program): the register peak.
    c = tr.MAX_NORM_CHANNELS
    for dtype in ("fp16", "fp32"):
        yield ("gather_layer_norm", f"{dtype} nhwc 2x2x{c}", tr._gather_layer_norm_kernel,
               dict(x_ptr=dtype, idx_ptr="i64", w_ptr=dtype, bias_ptr=dtype, out_ptr=dtype,
                    eps=1e-5, s_xb=4 * c, s_xh=2 * c, s_xw=c, s_xc=1, s_ib=2, s_ij=1, N=4, W=2,
                    C=c, KEEP=2, num_blocks=2),
               dict(HAS_WEIGHT=True, HAS_BIAS=True, UPCAST=True, GRID=True,
                    BLOCK_R=tr.norm_block_sizes(c)[0], BLOCK_C=tr.norm_block_sizes(c)[1]))


def compile_row_kernel(fn, sig, attrs, consts):
    import triton
    from triton.backends.compiler import GPUTarget
    triton.knobs.nvidia.dump_ptxas_log = True
    log, start = io.StringIO(), time.time()
    with contextlib.redirect_stdout(log):
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", ROWS_ARCH, 32),
                                  options={"num_warps": 4})
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
    regs, stack, smem, local = _resources(compiled.asm["cubin"])
    return dict(regs=regs, spills=spills + local, stack=stack,
                smem=max(smem, compiled.metadata.shared), seconds=time.time() - start)


ROWS_HEADER = ["kernel", "config", "regs", "spills (B)", "stack (B)", "smem (B)", "compile (s)"]


def report_rows(args):
    """The row kernels for sm_90; returns the FAIL lines."""
    seen, failures = {}, []
    print(_table(ROWS_HEADER, []), flush=True)
    for name, label, fn, values, constexprs in row_jobs():
        sig, attrs, consts = _specialize(fn, values, constexprs)
        key = (name, repr(sig), repr(sorted(attrs.items())), repr(sorted(consts.items())))
        if key in seen:
            continue
        row = seen[key] = compile_row_kernel(fn, sig, attrs, consts)
        cells = [name, label, row["regs"], row["spills"], row["stack"], row["smem"],
                 f"{row['seconds']:.1f}"]
        print(_table(ROWS_HEADER, [cells]).splitlines()[-1], flush=True)
        failures += _resource_failures(f"{name} {label}", row)
    rows = list(seen.values())
    print(f"\nsm_{ROWS_ARCH}: {len(rows)} specializations, max regs {max(r['regs'] for r in rows)}, "
          f"total spills {sum(r['spills'] for r in rows)} B, "
          f"max stack {max(r['stack'] for r in rows)} B")
    return failures


# ---------------------------------------------------------------------------------------------
# cuda: the extension's kernels, from the built .so
# ---------------------------------------------------------------------------------------------
def find_tool(name):
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", name))
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "backends",
                                       "nvidia", "bin", name))
    candidates += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(on_path)
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def default_library():
    from papr_kernels.ops import extension  # the CUDA kernels' library, beside papr_kernels._C

    return extension.cuda_library()


def demangle(names):
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def short(name):
    name = re.sub(r"\(anonymous namespace\)::|papr::cuda::", "", name)
    return re.sub(r"\(.*\)$", "", name)


def parse(text):
    rows, arch = [], None
    func = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if func and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append({"arch": arch, "kernel": func, **{k: int(v) for k, v in fields.items()}})
            func = None
    return rows


CUDA_HEADER = ["arch", "kernel", "regs", "smem B", "stack B", "spill/local B"]


def report_cuda(args):
    """The extension's CUDA kernels; returns the FAIL lines (a missing .so or tool fails too)."""
    lib = args.library or default_library()
    if not lib or not os.path.exists(lib):
        return ["cuda: papr_kernels._C_cuda is not built (make install with FORCE_CUDA=1)"]
    cuobjdump = find_tool("cuobjdump")
    if not cuobjdump:
        return ["cuda: no cuobjdump (CUDA toolkit or triton) found"]
    proc = subprocess.run([cuobjdump, "--dump-resource-usage", lib], capture_output=True, text=True)
    rows = parse(proc.stdout)
    if not rows:
        return [f"cuda: no CUDA kernels in {lib} (built without CUDA? FORCE_CUDA=1) "
                f"{proc.stderr.strip()}"]
    names = demangle([r["kernel"] for r in rows])
    print(f"CUDA kernels of {lib} (cuobjdump: {cuobjdump})")
    failures, cells = [], []
    for row, name in sorted(zip(rows, names), key=lambda rn: (rn[0]["arch"] or "", short(rn[1]))):
        local, stack = row.get("LOCAL", 0), row.get("STACK", 0)
        cells.append([row["arch"] or "?", short(name)[:58], row.get("REG", 0),
                      row.get("SHARED", 0), stack, local])
        if local or stack:
            failures.append(f"{row['arch']} {short(name)} spills ({local} B local, {stack} B stack)")
    print(_table(CUDA_HEADER, cells))
    found = {r["arch"] for r in rows}
    failures += [f"no code for {a}" for a in args.arch if a not in found]
    print(f"{len(rows)} kernels, architectures {', '.join(sorted(found))}: "
          f"{'zero spills' if not failures else 'FAILED'}")
    return failures


SECTIONS = {"triton": report_triton, "rows": report_rows, "cuda": report_cuda}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="{triton,rows,cuda}",
                        help="which reports (default: all)")
    parser.add_argument("--quick", action="store_true", help="triton: fp16 only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--library", default=None, help="cuda: the extension .so")
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"],
                        help="cuda: architectures the .so must hold")
    args = parser.parse_args()
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {list(SECTIONS)}")
    cache = tempfile.mkdtemp(prefix="papr-gpu-report-")
    os.environ["TRITON_CACHE_DIR"] = cache   # fresh, inherited by the workers, removed below
    failures = []
    import triton
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)})")
    try:
        for name in args.sections or list(SECTIONS):
            print(f"\n## {name}\n", flush=True)
            failures += SECTIONS[name](args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    # the shared ending: every failure of every section, one exit status
    for line in failures:
        print("FAIL:", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
