"""End-to-end PaPr on hierarchical models: images/s of timm Swin-T and ConvNeXt-T, unpruned vs
pruned (proposal network included), plus the FLOP ratio counted by torch's FlopCounterMode.

    .venv/bin/python benchmarks/e2e_hierarchical.py [--batch 8] [--iters 5] [--threads N]
        [--models swin_tiny_patch4_window7_224 convnext_tiny] [--z 0.65 0.5] [--device cpu]

Random weights (pretrained=False): speed does not depend on them. The proposal is MobileOne-S0
(timm, features_only, last stage, reparameterized), the published choice. A plain script, not
collected by pytest. Note: on a CPU the per-token MLP is a smaller share of the time than its
FLOP share suggests (layer norms, window shuffles, depthwise convs and copies are memory bound),
and the gather/scatter and the proposal are overheads, so the measured speed-up can be below the
FLOP ratio, even below 1.
"""
import argparse
import time

import torch
import timm
from torch.utils.flop_counter import FlopCounterMode

from papr_kernels import timm_hierarchical as th


def make_proposal(device):
    try:  # the package's own proposal factory, once merged
        from papr_kernels import proposal as proposal_mod
        return proposal_mod.create("mobileone_s0").to(device).eval()
    except Exception:
        from timm.utils.model import reparameterize_model
        net = timm.create_model("mobileone_s0", pretrained=False, features_only=True,
                                out_indices=(-1,))
        net = reparameterize_model(net.eval()).to(device).requires_grad_(False)
        return lambda x: net(x)[-1]


def timed_interleaved(model, proposal, zs, x, iters):
    """Seconds per batch for z = 1 (unpruned) and each z: the configurations take turns, round
    after round (so load from other processes hits them alike), and the fastest round counts."""
    times = {z: [] for z in [1.0] + list(zs)}
    with torch.inference_mode():
        for _ in range(iters + 1):                     # the first round warms up
            for z in times:
                if z < 1.0:
                    th.patch_hierarchical(model, proposal, z)
                if x.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times[z].append(time.perf_counter() - t0)
                th.unpatch_hierarchical(model)
    return {z: min(t[1:]) for z, t in times.items()}


def flops(fn, x):
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["swin_tiny_patch4_window7_224", "convnext_tiny"])
    parser.add_argument("--z", nargs="+", type=float, default=[0.65, 0.5])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    proposal = make_proposal(device)
    print(f"device {device}, torch {torch.__version__}, timm {timm.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, best of {args.iters} interleaved rounds")
    print(f"| model | z | images/s | speed-up | GFLOPs/img (pruned rows: proposal incl.) | FLOP ratio |")
    print(f"| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        model = timm.create_model(name, pretrained=False).to(device).eval()
        secs = timed_interleaved(model, proposal, args.z, x, args.iters)
        base_f = flops(model, x[:1])
        print(f"| {name} | 1 (unpruned) | {args.batch / secs[1.0]:.1f} | 1.00 | {base_f / 1e9:.2f} "
              f"| 1.00 |", flush=True)
        for z in args.z:
            th.patch_hierarchical(model, proposal, z)
            f = flops(model, x[:1])
            th.unpatch_hierarchical(model)
            print(f"| {name} | {z} | {args.batch / secs[z]:.1f} | {secs[1.0] / secs[z]:.2f} "
                  f"| {f / 1e9:.2f} | {base_f / f:.2f} |", flush=True)


if __name__ == "__main__":
    main()
