"""How much the proposal's opt-in `image_size` changes PaPr's selection: the kept-set overlap
|kept_full ∩ kept_S| / k of a ViT-B/16's 14 x 14 patches at 224 px, the proposal at S px against
the proposal at the full 224 px, on synthetic images with structure (shapes on smooth fields).

    python benchmarks/proposal_overlap.py [--sizes 160,128] [--images 64] [--proposal mobileone_s0]

RANDOM WEIGHTS (pretrained ones cannot be downloaded here): the overlap says how far the map of
a random MobileOne-S0 moves with the input resolution, not what happens to accuracy; a trained
proposal's maps may move more or less. Two controls: chance level (a random selection) is
k / N, and "other image" is the overlap of two different images' kept sets, both at 224 px (how
much of the selection does not depend on the image at all).
"""
import argparse
import math

import torch

from papr_kernels import keep_count, reference
from papr_kernels import proposal as papr_proposal

GRID = (14, 14)          # ViT-B/16 at 224 px
FULL = 224
ZS = (0.7, 0.5, 0.3)


def structured_images(count, size=FULL, seed=0):
    """(count, 3, size, size) images in [-2, 2]: a smooth field (a few low-frequency waves)
    with 3-6 filled ellipses and rectangles of random colours, a little noise."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.empty(count, 3, size, size)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    for i in range(count):
        freq, phase = 1 + 3 * rand(3, 2), 2 * math.pi * rand(3)
        image = torch.stack([torch.sin(2 * math.pi * (freq[c, 0] * x + freq[c, 1] * y) + phase[c])
                             for c in range(3)]) * 0.5
        for _ in range(int(torch.randint(3, 7, (1,), generator=gen))):
            cy, cx, ry, rx = rand(4) * torch.tensor([1, 1, 0.25, 0.25]) + torch.tensor(
                [0, 0, 0.05, 0.05])
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1 if rand(1) < 0.5 else \
                ((y - cy).abs() <= ry) & ((x - cx).abs() <= rx)
            image = torch.where(inside, (rand(3, 1, 1) * 4 - 2), image)
        out[i] = image + 0.05 * torch.randn(3, size, size, generator=gen)
    return out


def kept_sets(features, z):
    """The kept patch indices (B, k) of a ViT-B/16 at z (one class token) for `features`."""
    k = keep_count(1 + math.prod(GRID), z, 1)
    return reference.top_k(reference.significance(features, GRID), k, "score")


def overlap(a, b):
    """Per image |a ∩ b| / k of two (B, k) index sets."""
    return torch.tensor([len(set(r.tolist()) & set(s.tolist())) / a.shape[1]
                         for r, s in zip(a, b)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="160,128")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--proposal", default="mobileone_s0")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(1)
    full = papr_proposal.create(args.proposal, pretrained=False)
    images = structured_images(args.images)
    with torch.inference_mode():
        f_full = full(images)
        maps = {s: papr_proposal.Proposal(full.network, image_size=s)(images) for s in sizes}
    print(f"{args.proposal}, random weights (seed 1); {args.images} structured 224 px images; "
          f"ViT-B/16 grid {GRID}; map {tuple(f_full.shape[-2:])} at {FULL} px")
    print("\n| proposal px | map | z | k | overlap mean | min | chance k/N | other image |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for s in sizes:
        for z in ZS:
            kept_full, kept_s = kept_sets(f_full, z), kept_sets(maps[s], z)
            o = overlap(kept_full, kept_s)
            other = overlap(kept_full, kept_full.roll(1, dims=0)).mean().item()
            k = kept_full.shape[1]
            rows.append(dict(size=s, grid=tuple(maps[s].shape[-2:]), z=z, k=k,
                             mean=o.mean().item(), min=o.min().item(), other_image=other))
            print(f"| {s} | {'x'.join(map(str, maps[s].shape[-2:]))} | {z} | {k} | "
                  f"{o.mean():.2f} | {o.min():.2f} | {k / math.prod(GRID):.2f} | "
                  f"{other:.2f} |")
    return rows


if __name__ == "__main__":
    main()
