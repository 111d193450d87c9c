"""Per-call cost of `prune` on CPU (issue 14): the ratio table, measured in one process.

    PYTHONPATH=. python benchmarks/per_call.py [--batches 1 8 64] [--rounds 201] [--threads N]
                                              [--kernel-parts] [--triton-python]

(PYTHONPATH=. measures this checkout; without it Python imports the installed papr_kernels.)

ViT-B/16-224 fp32, z = 0.5, one class token. For each B it times, interleaved round by round,
the floor (`papr_bench.floor_fwd`: a copy of the output-sized block plus one read of f),
`papr_kernels.prune` with the automatic backend, and `torch.compile` of the user's eager code
(`papr_bench.user_prune`), and prints markdown tables of the medians and 10th percentiles. `op` is the bare custom op
`torch.ops.papr_kernels.prune_forward` (the C++ kernel with no Python around it), when the
extension loads: prune / op is the Python path's share, op / floor the kernel's distance. Every provider is timed
in blocks of calls long enough (~0.5 ms) for the clock, round after round, so that a noisy
neighbour slows all of them alike; short blocks and many rounds keep the median steady. Timings are reported, never asserted.

--threads 1 takes OpenMP out: on a shared box, a parallel region whose second thread is
descheduled waits a whole time slice at its barrier, which swamps a ~20 us call.

glibc is told to keep freed memory (mallopt: no mmap per block, no trim; --fresh-pages keeps
its defaults): otherwise a B = 64 output (19 MB) is sometimes a fresh mmap whose first touch
page-faults on every call, for whichever provider the allocator's history picks, and on a VM
those faults (several ms) swamp the copies being compared.
"""
import ctypes
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import papr_bench as pb  # noqa: E402
import papr_kernels  # noqa: E402

Z = 0.5


def providers(batch: int, f_layout: str = "contiguous"):
    """{name: fn()} for ViT-B/16-224 fp32 at `batch`, f in `f_layout`."""
    shape = pb.SHAPES[pb.HEADLINE]
    x, f = pb.inputs(shape, torch.float32, batch, "cpu")
    f = pb.with_f_layout(f, f_layout)
    kept_tokens = shape.prefix + papr_kernels.keep_count(shape.num_tokens, Z, shape.prefix)
    user = pb.compiled_user_prune()
    fns = {
        "floor": lambda: pb.floor_fwd(x, f, kept_tokens),
        "prune": lambda: papr_kernels.prune(x, f, Z),
        "compile(user)": lambda: user(x, f, Z),
    }
    if "cpp" in papr_kernels.available_backends("cpu"):
        op = torch.ops.papr_kernels.prune_forward.default
        grid = (int(shape.num_patches ** 0.5),) * 2
        fns["op"] = lambda: op(x, f, shape.prefix, grid, kept_tokens - shape.prefix, True, False)
    return fns


def measure(batch: int, rounds: int, f_layout: str = "contiguous") -> dict:
    """{provider: sorted seconds per call of each round}, interleaved rounds."""
    return _interleaved(providers(batch, f_layout), rounds)


def _interleaved(fns: dict, rounds: int) -> dict:
    for fn in fns.values():  # warm-up: compile, allocator, caches
        for _ in range(3):
            fn()
    calls = {name: pb.calls_per_block(fn, 5e-4) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(pb.time_per_call(fn, calls[name]))
    return {name: sorted(t) for name, t in times.items()}


def median(times: list) -> float:
    return statistics.median(times)


def p10(times: list) -> float:
    """The 10th percentile: the rounds no neighbour slowed (a shared box's quiet moments)."""
    return times[len(times) // 10]


def kernel_parts(batch: int) -> dict:
    """{part: fn()}: the C++ op split by what it does, beside ATen doing the same bytes.
    op k=1 is the scoring (channel mean, resize, select) with a one-row copy; op k=98 - op k=1
    is the gather of the kept rows; compare with f.sum (one read of f) and the clone."""
    shape = pb.SHAPES[pb.HEADLINE]
    x, f = pb.inputs(shape, torch.float32, batch, "cpu")
    op = torch.ops.papr_kernels.prune_forward.default
    keep = papr_kernels.keep_count(shape.num_tokens, Z, shape.prefix)
    rows = torch.arange(batch)[:, None] * shape.num_tokens + shape.prefix + \
        op(x, f, shape.prefix, (14, 14), keep, True, False)[1]
    flat = x.reshape(-1, shape.channels)
    return {
        "op k=98": lambda: op(x, f, shape.prefix, (14, 14), keep, True, False),
        "op k=98 spatial": lambda: op(x, f, shape.prefix, (14, 14), keep, True, True),
        "op k=1": lambda: op(x, f, shape.prefix, (14, 14), 1, True, False),
        "f.sum": lambda: f.sum(),
        "clone 99 rows": lambda: x.narrow(1, 0, shape.prefix + keep).clone(),
        "index_select kept rows (rank order)": lambda: flat.index_select(0, rows.flatten()),
        "index_select kept rows (ascending)": lambda: flat.index_select(0, rows.sort(1).values.flatten()),
    }


def measure_parts(batch: int, rounds: int) -> str:
    times = _interleaved(kernel_parts(batch), rounds)
    return "\n".join([f"| B = {batch} | median | 10th percentile |", "|---|---|---|"] +
                      [f"| {name} | {_us(median(t))} | {_us(p10(t))} |"
                       for name, t in times.items()])


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def triton_python_path(rounds: int) -> str:
    """Host cost of `prune(backend="triton")` without its kernels (both replaced by _NoLaunch),
    B = 1: what the Python path from `prune` to the launch costs, measurable without a GPU
    (Triton's own launcher is not in it). Forward, and forward + backward with x needing grad."""
    os.environ["TRITON_INTERPRET"] = "1"   # triton "runs" on CPU tensors: nothing is launched
    from papr_kernels.ops.triton import prune as triton_prune
    shape = pb.SHAPES[pb.HEADLINE]
    x, f = pb.inputs(shape, torch.float32, 1, "cpu")
    x_grad = x.detach().clone().requires_grad_(True)
    kept = shape.prefix + papr_kernels.keep_count(shape.num_tokens, Z, shape.prefix)
    grad = torch.ones(1, kept, shape.channels)
    saved = triton_prune._prune_fwd_kernel, triton_prune._prune_bwd_kernel
    triton_prune._prune_fwd_kernel = triton_prune._prune_bwd_kernel = _NoLaunch()
    try:
        times = _interleaved({
            "forward": lambda: papr_kernels.prune(x, f, Z, backend="triton"),
            "forward + backward": lambda: papr_kernels.prune(x_grad, f, Z, backend="triton")
            .backward(grad),
            "cpp forward (kernels run)": lambda: papr_kernels.prune(x, f, Z, backend="cpp"),
        }, rounds)
    finally:
        triton_prune._prune_fwd_kernel, triton_prune._prune_bwd_kernel = saved
    return "\n".join(["| prune(backend=\"triton\"), kernels not launched, B = 1 | median | "
                      "10th percentile |", "|---|---|---|"] +
                     [f"| {name} | {_us(median(t))} | {_us(p10(t))} |"
                      for name, t in times.items()])


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def table(results: dict, stat=median) -> str:
    lines = ["| B | floor | op | prune | prune / floor | op / floor | compile(user) | "
             "compile(user) / prune |", "|---|---|---|---|---|---|---|---|"]
    for batch, times in results.items():
        t = {name: stat(ts) for name, ts in times.items()}
        op = t.get("op")
        lines.append(" | ".join([
            f"| {batch}", _us(t["floor"]), _us(op) if op else "-", _us(t["prune"]),
            _ratio(t["prune"], t["floor"]), _ratio(op, t["floor"]) if op else "-",
            _us(t["compile(user)"]), _ratio(t["compile(user)"], t["prune"]) + " |"]))
    return "\n".join(lines)


def keep_freed_memory() -> None:
    """mallopt(M_MMAP_THRESHOLD, 1 GiB) and mallopt(M_TRIM_THRESHOLD, 4 GiB) in this process."""
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, ctypes.c_int(2 ** 31 - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=201)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--kernel-parts", action="store_true",
                        help="also time the C++ op's parts against ATen (see kernel_parts)")
    parser.add_argument("--triton-python", action="store_true",
                        help="also time the Python path of the triton backend, kernels stubbed")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="keep glibc's malloc defaults (see the module docstring)")
    parser.add_argument("--f-layout", default="contiguous", choices=list(pb.F_LAYOUTS),
                        help="f's memory format (the proposal returns channels_last)")
    args = parser.parse_args()
    if not args.fresh_pages:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = papr_kernels.backends.pick(None, "cpu")
    print(f"papr_kernels from {os.path.dirname(papr_kernels.__file__)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prune backend: "
          f"{backend}; ViT-B/16-224 fp32, f {args.f_layout}, z = {Z}; median of {args.rounds} "
          f"interleaved rounds; "
          f"malloc: {'defaults' if args.fresh_pages else 'freed memory kept'}\n")
    results = {b: measure(b, args.rounds, args.f_layout) for b in args.batches}
    print("Medians:\n\n" + table(results) + "\n\n10th percentiles:\n\n" + table(results, p10))
    if args.kernel_parts:
        for batch in args.batches:
            print("\n" + measure_parts(batch, args.rounds))
    if args.triton_python:
        print("\n" + triton_python_path(args.rounds))


if __name__ == "__main__":
    main()
