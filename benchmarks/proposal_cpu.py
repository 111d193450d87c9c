"""The proposal network alone on CPU, its ReLUs folded into the convolutions (what `create`
builds) against the same network and weights unfolded, side by side in one process: what the
fold buys (docs/design.md, "The ReLU folded into its convolution").

    python benchmarks/proposal_cpu.py [--name mobileone_s0] [--dtypes fp32,bf16]
        [--batches 1,8] [--runs 9] [--threads 1] [--size 224] [--models a,b --z 0.5]

CPU seconds of the process (time.process_time), median of `runs` alternating calls after one
warm-up each; random weights. Each row also says whether both gave the same features (bit for
bit) and how many blocks were folded. `--models`: also end to end, each timm model (at its own image size) unpruned
and PaPr-patched at `z` with either proposal (images/s ratios over the unpruned model, and
the proposal's share of the PaPr time).
"""
import copy
import argparse
import statistics
import time

import timm
import torch
from timm.utils.model import reparameterize_model

from papr_kernels import proposal as papr_proposal
from papr_kernels import timm as papr_timm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def proposals(name):
    """(folded, unfolded, blocks folded): `create(name)` and a Proposal of the same network,
    with the same weights, as timm leaves it after reparameterizing."""
    torch.manual_seed(0)
    folded = papr_proposal.create(name, pretrained=False)
    network = timm.create_model(name, pretrained=False, features_only=True, out_indices=(-1,))
    network = reparameterize_model(network.eval())
    network.load_state_dict(folded.network.state_dict())
    blocks = sum(1 for _ in papr_proposal.conv_relu_blocks(folded.network))
    return folded, papr_proposal.Proposal(network), blocks


def median_s(fns, images, runs):
    """{name: median seconds}: one warm-up each, then `runs` alternating rounds."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(images)
        for _ in range(runs):
            for k, fn in fns.items():
                start = time.process_time()
                fn(images)
                times[k].append(time.process_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def end_to_end(name, folded, unfolded, dtype, batch, z, runs):
    """One row: `name` unpruned and PaPr-patched at z with each proposal, alternating, at the
    model's own image size."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(dtype)
    fns = {"unpruned": model,
           "papr-folded": papr_timm.patch(copy.deepcopy(model), folded, z),
           "papr-unfolded": papr_timm.patch(copy.deepcopy(model), unfolded, z),
           "folded": folded, "unfolded": unfolded}
    size = timm.data.resolve_data_config({}, model=model)["input_size"][-1]
    images = torch.randn(batch, 3, size, size,
                         generator=torch.Generator().manual_seed(1)).to(dtype)
    m = median_s(fns, images, runs)
    return dict(model=name, batch=batch, **m)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="mobileone_s0")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", default="", help="comma-separated timm names (end to end)")
    parser.add_argument("--z", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folded, unfolded, blocks = proposals(args.name)
    print(f"torch {torch.__version__}, {args.name}, {blocks} blocks folded, {args.threads} "
          f"threads, {args.size} px, median of {args.runs} alternating calls, process clock\n")
    print("| dtype | B | unfolded ms | folded ms | speed-up | same features |\n|---|---|---|---|---|---|")
    rows = []
    for dtype_name in args.dtypes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            images = torch.randn(batch, 3, args.size, args.size,
                                 generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype_name])
            with torch.inference_mode():
                same = torch.equal(folded(images), unfolded(images))
            m = median_s({"unfolded": unfolded, "folded": folded}, images, args.runs)
            rows.append(dict(dtype=dtype_name, batch=batch, same=same, blocks=blocks, **m))
            print(f"| {dtype_name} | {batch} | {m['unfolded'] * 1e3:.2f} | {m['folded'] * 1e3:.2f} | "
                  f"{m['unfolded'] / m['folded']:.2f}x | {'yes' if same else 'NO'} |", flush=True)
    if args.models:
        print(f"\n| model | dtype | B | PaPr z={args.z:g}, unfolded | folded | proposal share, "
              f"unfolded | folded |\n|---|---|---|---|---|---|---|")
    for name in filter(None, args.models.split(",")):
        for dtype_name in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                r = end_to_end(name, folded, unfolded, DTYPES[dtype_name], batch, args.z,
                               args.runs)
                rows.append(dict(r, dtype=dtype_name))
                print(f"| {name} | {dtype_name} | {batch} | "
                      f"{r['unpruned'] / r['papr-unfolded']:.2f}x | "
                      f"{r['unpruned'] / r['papr-folded']:.2f}x | "
                      f"{100 * r['unfolded'] / r['papr-unfolded']:.0f}% | "
                      f"{100 * r['folded'] / r['papr-folded']:.0f}% |", flush=True)
    return rows


if __name__ == "__main__":
    main()
