"""CPU timing of the extension's row ops against the row ops of papr_kernels.reference, in one
process, for a Swin-T stage-1-like map (B=64, 56x56, C=96, z=0.65): prints time ratios
(rounds alternate torch and cpp; each side keeps its best median).

    PYTHONPATH=. .venv/bin/python tools/bench_rows.py [--threads N]
"""
import argparse

import torch
from torch.utils import benchmark

from papr_kernels import reference
from papr_kernels.ops import cpp_prune


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, H, W, C = 64, 56, 56, 96
    k = int(H * W * 0.65)
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(H * W, generator=gen)[:k] for _ in range(B)])
    values = torch.randn(B, k, C, generator=gen)
    layouts = {
        "contiguous (B,H,W,C)": torch.randn(B, H, W, C, generator=gen),
        "permuted NCHW": torch.randn(B, C, H, W, generator=gen).permute(0, 2, 3, 1),
    }
    print(f"threads={args.threads} B={B} H=W={H} C={C} k={k} fp32")
    for name, x in layouts.items():
        cases = {
            "gather_rows": lambda impl: impl.gather_rows(x, idx),
            "scatter_back": lambda impl: impl.scatter_back(x, idx, values, False),
        }
        for op, fn in cases.items():
            times = {"torch": float("inf"), "cpp": float("inf")}
            for _ in range(args.rounds):  # alternate, keep each side's best median: less noise
                for label, impl in (("torch", reference), ("cpp", cpp_prune)):
                    t = benchmark.Timer("fn(impl)", globals={"fn": fn, "impl": impl},
                                        num_threads=args.threads)
                    median = t.blocked_autorange(min_run_time=args.min_run_time).median
                    times[label] = min(times[label], median)
            print(f"{name:22s} {op:13s} torch/cpp time ratio = {times['torch'] / times['cpp']:.2f}"
                  f"  (torch {times['torch'] * 1e3:.2f} ms, cpp {times['cpp'] * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
