"""Per-call cost of `prune` on CPU (issue 14): the ratio table, measured in one process.

    python benchmarks/per_call.py [--batches 1 8 64] [--rounds 41] [--threads N]

ViT-B/16-224 fp32, z = 0.5, one class token. For each B it times, interleaved round by round,
the floor (`papr_bench.floor_fwd`: a copy of the output-sized block plus one read of f),
`papr_kernels.prune` with the automatic backend, and `torch.compile` of the user's eager code
(`papr_bench.user_prune`), and prints a markdown table of the medians. `op` is the bare custom op
`torch.ops.papr_kernels.prune_forward` (the C++ kernel with no Python around it), when the
extension loads: prune / op is the Python path's share, op / floor the kernel's distance. Every provider is timed
in blocks of calls long enough (~2 ms) for the clock, round after round, so that a noisy
neighbour slows all of them alike. Timings are reported, never asserted.

--threads 1 takes OpenMP out: on a shared box, a parallel region whose second thread is
descheduled waits a whole time slice at its barrier, which swamps a ~20 us call.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import papr_bench as pb  # noqa: E402
import papr_kernels  # noqa: E402

Z = 0.5


def _block_size(fn, target_s=2e-3) -> int:
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, int(target_s / max(once, 1e-7)))


def _time_per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def providers(batch: int):
    """{name: fn()} for ViT-B/16-224 fp32 at `batch`."""
    shape = pb.SHAPES[pb.HEADLINE]
    x, f = pb.inputs(shape, torch.float32, batch, "cpu")
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


def measure(batch: int, rounds: int) -> dict:
    """{provider: median seconds per call}, interleaved rounds."""
    fns = providers(batch)
    for fn in fns.values():  # warm-up: compile, allocator, caches
        for _ in range(3):
            fn()
    calls = {name: _block_size(fn) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_time_per_call(fn, calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def table(results: dict) -> str:
    lines = ["| B | floor | op | prune | prune / floor | op / floor | compile(user) | "
             "compile(user) / prune |", "|---|---|---|---|---|---|---|---|"]
    for batch, t in results.items():
        op = t.get("op")
        lines.append(" | ".join([
            f"| {batch}", _us(t["floor"]), _us(op) if op else "-", _us(t["prune"]),
            _ratio(t["prune"], t["floor"]), _ratio(op, t["floor"]) if op else "-",
            _us(t["compile(user)"]), _ratio(t["compile(user)"], t["prune"]) + " |"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = papr_kernels.backends.pick(None, "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prune backend: "
          f"{backend}; ViT-B/16-224 fp32, z = {Z}; median of {args.rounds} interleaved rounds\n")
    print(table({b: measure(b, args.rounds) for b in args.batches}))


if __name__ == "__main__":
    main()
