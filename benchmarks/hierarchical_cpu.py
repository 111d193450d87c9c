"""CPU images/s of PaPr-patched Swin-T and ConvNeXt-T against the unpruned models, side by side in
one process (alternating runs, median of each): the check that a change to the hierarchical path
keeps the CPU gain. Random weights (speed does not depend on them), MobileOne-S0 proposal.

    python benchmarks/hierarchical_cpu.py [--batch 8] [--z 0.65] [--runs 5] [--clock process]

`--clock process` times the CPU seconds the process used (time.process_time, all its threads)
instead of wall time: on a shared machine other processes' load stretches wall time by a
different factor from run to run, but hardly the CPU time of the work itself.
"""
import argparse
import copy
import statistics
import time

import timm
import torch

from papr_kernels import proposal as papr_proposal
from papr_kernels import timm as papr_timm

MODELS = ("swin_tiny_patch4_window7_224", "convnext_tiny")


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def seconds(fn, images, clock):
    start = clock()
    with torch.inference_mode():
        fn(images)
    return clock() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--z", type=float, default=0.65)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    proposal = papr_proposal.create("mobileone_s0", pretrained=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch}, "
          f"z={args.z}, median of {args.runs}, {args.clock} clock")
    for name in MODELS:
        torch.manual_seed(0)
        dense = timm.create_model(name, pretrained=False).eval()
        patched = papr_timm.patch(copy.deepcopy(dense), proposal, args.z)
        times = {"unpruned": [], "papr": []}
        for fn in (dense, patched):          # warm-up
            seconds(fn, images, clock)
        for _ in range(args.runs):
            times["unpruned"].append(seconds(dense, images, clock))
            times["papr"].append(seconds(patched, images, clock))
        ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
        print(f"{name:32s} unpruned {ips['unpruned']:6.1f} img/s  papr {ips['papr']:6.1f} img/s  "
              f"ratio {ips['papr'] / ips['unpruned']:.2f}x")


if __name__ == "__main__":
    main()
