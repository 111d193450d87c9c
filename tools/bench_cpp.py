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


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    z = 0.5
    compiled = None if args.no_compile else torch.compile(reference.prune, dynamic=False)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'B':>3} {'ref ms':>8} {'compiled':>8} {'cpp ms':>8} {'floor':>8} {'ref/cpp':>8} "
          f"{'comp/cpp':>8} {'cpp/floor':>9} {'bwd ref':>8} {'bwd cpp':>8} {'bwd x':>6}")
    for B in args.batches:
        reps = args.repeats or (200 if B == 1 else 50 if B <= 8 else 20)
        x = torch.randn(B, 197, 768)
        f = torch.randn(B, 1024, 7, 7)
        k1 = 1 + papr_kernels.keep_count(197, z)
        block = x[:, :k1]
        t_ref = median_ms(lambda: reference.prune(x, f, z), reps)
        t_comp = median_ms(lambda: compiled(x, f, z), reps) if compiled else float("nan")
        t_cpp = median_ms(lambda: papr_kernels.prune(x, f, z, backend="cpp"), reps)
        t_floor = median_ms(lambda: (block.clone(), f.sum()), reps)
        xr = x.clone().requires_grad_()
        g = torch.randn(B, k1, 768)
        t_bref = median_ms(lambda: reference.prune(xr, f, z).backward(g), reps)
        t_bcpp = median_ms(lambda: papr_kernels.prune(xr, f, z, backend="cpp").backward(g), reps)
        # backward alone = (forward + backward) - forward
        t_bref_only = t_bref - t_ref
        t_bcpp_only = t_bcpp - t_cpp
        print(f"{B:>3} {t_ref:8.3f} {t_comp:8.3f} {t_cpp:8.3f} {t_floor:8.3f} {t_ref / t_cpp:8.1f} "
              f"{t_comp / t_cpp:8.1f} {t_cpp / t_floor:9.2f} {t_bref_only:8.3f} {t_bcpp_only:8.3f} "
              f"{t_bref_only / max(t_bcpp_only, 1e-6):6.1f}")


if __name__ == "__main__":
    main()
