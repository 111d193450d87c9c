"""The cpp kernel's scores, the same bits on two machines: `write FILE` on one (in
tools/aarch64_check.sh: this x86-64 host) saves inputs and the kernel's results, `check FILE` on
the other (there: aarch64, emulated) recomputes and compares them exactly. Compared: the float64
channel mean (`papr_kernels::channel_mean`, every bit) and the whole ranking of the patches
(`prune_forward` keeping every patch, in score order), on maps of every float dtype and both
layouts, tie-rich ones among them, 2-D and video."""
import sys

import torch

from papr_kernels.ops import extension  # importing it loads the extension: torch.ops.papr_kernels

_OPS = torch.ops.papr_kernels
assert extension.build_info() is not None, extension.unavailable_reason("cpu")


def _maps(gen):
    """(name, f, grid, align_corners) cases; f on CPU."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    cases = [("vit-b", randn(2, 1024, 7, 7), (14, 14), True),
             ("non-square", randn(2, 37, 5, 9), (16, 12), False),
             ("upsample-3x", randn(1, 24, 3, 3), (9, 9), True),
             ("integers", torch.randint(-3, 4, (2, 16, 7, 7), generator=gen).float(), (14, 14),
              True),
             ("plateau", randn(1, 8, 7, 7).clamp(-0.2, 0.2), (14, 14), True),
             ("constant", torch.full((1, 5, 4, 4), 0.3), (8, 8), True),
             ("video", randn(1, 64, 4, 7, 7), (8, 14, 14), True)]
    out = []
    for name, f, grid, align in cases:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            out.append((f"{name} {str(dtype)[6:]}", f.to(dtype), grid, align))
        if f.dim() == 4:
            channels_last = f.contiguous(memory_format=torch.channels_last)
            out.append((f"{name} channels_last", channels_last, grid, align))
    return out


def _results(f, grid, align):
    patches = 1
    for g in grid:
        patches *= g
    x = torch.arange(f.shape[0] * patches, dtype=torch.float32).reshape(f.shape[0], patches, 1)
    _, ranking = _OPS.prune_forward(x, f, 0, list(grid), patches, align, False)
    return _OPS.channel_mean(f), ranking


def write(path):
    gen = torch.Generator().manual_seed(0)
    cases = [(name, f, grid, align, *_results(f, grid, align))
             for name, f, grid, align in _maps(gen)]
    torch.save(cases, path)
    print(f"{len(cases)} cases written to {path}")


def check(path):
    bad = []
    cases = torch.load(path, weights_only=True)
    for name, f, grid, align, mean, ranking in cases:
        got_mean, got_ranking = _results(f, grid, align)
        if not torch.equal(got_mean.view(torch.int64), mean.view(torch.int64)):
            bad.append(f"{name}: channel mean differs in {int((got_mean != mean).sum())} places")
        if not torch.equal(got_ranking, ranking):
            first = int((got_ranking != ranking).nonzero()[0, 1])
            bad.append(f"{name}: ranking differs from rank {first} on")
    if bad:
        sys.exit("cpp scores differ between the two machines:\n  " + "\n  ".join(bad))
    print(f"{len(cases)} cases: the cpp channel means and rankings equal the other machine's, "
          "bit for bit")


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1]](sys.argv[2])
