"""Side-by-side CPU timings of the "cpp" backend (ViT-B/16-224 shapes, fp32, z = 0.5).

    .venv/bin/python tools/bench_cpp.py [--batches 1 64] [--no-compile]

Prints median milliseconds and the ratios the extension issue asks for: eager reference / cpp,
torch.compile(reference) / cpp, cpp / copy floor (clone of the output-sized block + one read of
f), and reference autograd backward / cpp backward. Measures only; asserts nothing.
"""
import argparse
import time

import torch

import papr_kernels
from papr_kernels import reference


STAT = "min"


def median_ms(fn, repeats, warmup=3):
    """Milliseconds per call: the median of `repeats` calls, or their minimum with --stat min
    (the default: on a shared, loaded machine the minimum is the least disturbed estimate)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return (times[0] if STAT == "min" else times[len(times) // 2]) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--stat", choices=["min", "median"], default="min")
    args = parser.parse_args()
    global STAT
    STAT = args.stat
    torch.manual_seed(0)
    z = 0.5
    compiled = None if args.no_compile else torch.compile(reference.prune, dynamic=False)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, statistic {STAT} "
          f"(best of 3 interleaved rounds)")
    print(f"{'B':>3} {'ref ms':>8} {'compiled':>8} {'cpp ms':>8} {'floor':>8} {'ref/cpp':>8} "
          f"{'comp/cpp':>8} {'cpp/floor':>9} {'bwd ref':>8} {'bwd cpp':>8} {'bwd x':>6}")
    for B in args.batches:
        reps = args.repeats or (200 if B == 1 else 50 if B <= 8 else 20)
        x = torch.randn(B, 197, 768)
        f = torch.randn(B, 1024, 7, 7)
        k1 = 1 + papr_kernels.keep_count(197, z)
        block = x[:, :k1]
        # Interleaved rounds, best round's median each: the machine is shared and noisy.
        fns = {"ref": lambda: reference.prune(x, f, z),
               "cpp": lambda: papr_kernels.prune(x, f, z, backend="cpp"),
               "floor": lambda: (block.clone(), f.sum())}
        if compiled:
            fns["comp"] = lambda: compiled(x, f, z)
        best = {name: float("inf") for name in fns}
        for _ in range(3):
            for name, fn in fns.items():
                best[name] = min(best[name], median_ms(fn, reps))
        t_ref, t_cpp, t_floor = best["ref"], best["cpp"], best["floor"]
        t_comp = best.get("comp", float("nan"))
        xr = x.clone().requires_grad_()
        g = torch.randn(B, k1, 768)
        out_ref = reference.prune(xr, f, z)
        out_cpp = papr_kernels.prune(xr, f, z, backend="cpp")
        t_bref_only = median_ms(lambda: torch.autograd.grad(out_ref, xr, g, retain_graph=True), reps)
        t_bcpp_only = median_ms(lambda: torch.autograd.grad(out_cpp, xr, g, retain_graph=True), reps)
        print(f"{B:>3} {t_ref:8.3f} {t_comp:8.3f} {t_cpp:8.3f} {t_floor:8.3f} {t_ref / t_cpp:8.1f} "
              f"{t_comp / t_cpp:8.1f} {t_cpp / t_floor:9.2f} {t_bref_only:8.3f} {t_bcpp_only:8.3f} "
              f"{t_bref_only / max(t_bcpp_only, 1e-6):6.1f}")


if __name__ == "__main__":
    main()
