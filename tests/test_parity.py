"""The parity matrix: every backend of conftest.BACKENDS against the reference, by SPEC's rule.

A case is the arguments of one `prune` call; `exact` marks inputs without near-ties (integer
channel means at the grid's own size, K a power of two), where indices must equal the reference's.
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch

import papr_kernels
from papr_kernels.testing import assert_matches_reference


@dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    prefix: int = 1
    grid: Tuple[int, ...] = (14, 14)
    f_size: Tuple[int, ...] = (7, 7)
    channels: int = 16             # C of x
    proposal_channels: int = 8     # K of f
    z: float = 0.5
    x_dtype: torch.dtype = torch.float32
    f_dtype: torch.dtype = torch.float32
    order: str = "score"
    align_corners: bool = True
    features: str = "random"       # random | integers | nan | inf | signed_zeros
    strided: bool = False
    pass_grid: Optional[bool] = None   # default: pass grid unless it is square 2-D
    kwargs: dict = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return self.features == "integers" and tuple(self.f_size) == tuple(self.grid)


CASES = [
    Case("vit_b16_224"),
    Case("z0.7", z=0.7),
    Case("z0.3", z=0.3),
    Case("tiny_z", z=1e-4),
    Case("z1", z=1.0),
    Case("z_near_one", z=0.999),
    Case("prefix0", prefix=0, grid=(16, 16), f_size=(8, 8)),
    Case("prefix5", prefix=5),
    Case("non_square", grid=(12, 20), f_size=(4, 6)),
    Case("f_larger_than_grid", grid=(14, 14), f_size=(20, 20)),
    Case("grid_1x1", grid=(1, 1), f_size=(3, 3)),
    Case("f_1x1", grid=(6, 6), f_size=(1, 1)),
    Case("align_corners_false", align_corners=False),
    Case("spatial", order="spatial"),
    Case("spatial_prefix5", order="spatial", prefix=5, z=0.3),
    Case("video", prefix=0, grid=(8, 14, 14), f_size=(4, 7, 7)),
    Case("video_prefix1_ac_false", grid=(4, 6, 6), f_size=(2, 3, 3), align_corners=False),
    Case("vit_b16_384", batch=1, grid=(24, 24), f_size=(12, 12)),
    Case("large_grid_64x64", batch=1, grid=(64, 64), f_size=(16, 16), channels=8),
    Case("odd_channels", channels=3, proposal_channels=5),
    Case("one_channel", channels=1, proposal_channels=1),
    Case("batch_1", batch=1),
    Case("batch_7", batch=7, channels=4),
    Case("x_fp16", x_dtype=torch.float16),
    Case("x_bf16", x_dtype=torch.bfloat16),
    Case("x_fp64", x_dtype=torch.float64),
    Case("f_fp16", f_dtype=torch.float16),
    Case("f_bf16", f_dtype=torch.bfloat16),
    Case("strided", strided=True),
    Case("ties", features="integers", grid=(14, 14), f_size=(14, 14)),
    Case("ties_spatial", features="integers", grid=(14, 14), f_size=(14, 14), order="spatial"),
    Case("ties_prefix0_nonsquare", features="integers", prefix=0, grid=(10, 30), f_size=(10, 30)),
    Case("ties_video", features="integers", prefix=0, grid=(4, 8, 8), f_size=(4, 8, 8)),
    Case("nan", features="nan"),
    Case("inf", features="inf", grid=(10, 10), f_size=(10, 10)),
    Case("signed_zeros", features="signed_zeros", grid=(8, 8), f_size=(8, 8)),
]


def make_inputs(case: Case, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = case.prefix + int(torch.tensor(case.grid).prod())
    x = torch.randn(case.batch, n, case.channels, generator=gen)
    f_shape = (case.batch, case.proposal_channels, *case.f_size)
    if case.features == "integers":
        # Every channel holds the same small integer: the channel mean is exact on any backend.
        f = torch.randint(0, 4, (case.batch, 1, *case.f_size), generator=gen).float()
        f = f.expand(f_shape).clone()
    elif case.features == "signed_zeros":
        f = torch.zeros(f_shape)
        f[:, :, ::2] = -0.0
        f[:, :, 1, 1] = 1.0
    else:
        f = torch.randn(f_shape, generator=gen)
    if case.features == "nan":
        f[:, 0, 2, 3] = float("nan")
    if case.features == "inf":
        f[:, :, 1, 1] = float("-inf")
        f[:, :, 8, 8] = float("inf")
    x, f = x.to(case.x_dtype), f.to(case.f_dtype)
    if case.strided:  # non-contiguous views of the same values
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        f = f.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return x.to(device), f.to(device)


def prune_kwargs(case: Case) -> dict:
    square_2d = len(case.grid) == 2 and case.grid[0] == case.grid[1]
    pass_grid = case.pass_grid if case.pass_grid is not None else not square_2d
    kwargs = dict(num_prefix_tokens=case.prefix, align_corners=case.align_corners,
                  order=case.order, **case.kwargs)
    if pass_grid:
        kwargs["grid"] = case.grid
    return kwargs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(backend, case):
    name, device = backend
    x, f = make_inputs(case, device)
    kwargs = prune_kwargs(case)
    out, indices = papr_kernels.prune(x, f, case.z, return_indices=True, backend=name, **kwargs)
    assert_matches_reference(x.cpu(), f.cpu(), case.z, out.cpu(), indices.cpu(),
                             exact_indices=case.exact, **kwargs)


def test_empty_batch(backend):
    name, device = backend
    x, f = torch.randn(0, 197, 8, device=device), torch.randn(0, 4, 7, 7, device=device)
    out, indices = papr_kernels.prune(x, f, 0.5, return_indices=True, backend=name)
    assert out.shape == (0, 99, 8) and indices.shape == (0, 98) and indices.dtype == torch.int64


def test_deterministic(backend):
    name, device = backend
    x, f = make_inputs(Case("det", batch=3), device)
    first = papr_kernels.prune(x, f, 0.5, return_indices=True, backend=name)
    for _ in range(3):
        again = papr_kernels.prune(x, f, 0.5, return_indices=True, backend=name)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
