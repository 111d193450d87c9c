"""The parity matrix: every backend of conftest.BACKENDS against the reference, by SPEC's rule.

A case is the arguments of one `prune` call; `exact` marks inputs without near-ties (integer
channel means at the grid's own size, K a power of two), where indices must equal the reference's.
The tie-rich maps (constant regions) must give the reference's indices exactly on every backend
and device: SPEC's float64 scores, rounded once, tie exactly there. The reference always runs on
the CPU, so a CUDA backend is held to the CPU's indices.
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import pytest
import torch

import papr_kernels
from papr_kernels import hierarchical, reference
from papr_kernels.testing import assert_matches_reference

import numpy_oracle


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
    features: str = "random"       # random | integers | nan | inf | signed_zeros | subnormal
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
    Case("f_bf16_subnormal", f_dtype=torch.bfloat16, features="subnormal"),
    Case("f_fp16_subnormal", f_dtype=torch.float16, features="subnormal"),
    Case("video_bf16_subnormal", prefix=0, grid=(4, 6, 6), f_size=(2, 3, 3),
         f_dtype=torch.bfloat16, features="subnormal"),
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
    if case.features == "subnormal":   # below the normal range of f_dtype (fp16, bf16)
        f = f * torch.finfo(case.f_dtype).tiny / 8
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


def _tie_rich_maps():
    """(name, f, grid_if_align_corners, grid_otherwise): maps whose float64 scores tie exactly or
    round to the same float32, where float32 arithmetic (or another summation order) would break
    ties by rounding noise.

    The integer-valued maps use grids whose source coordinates are dyadic (align_corners: (in-1) /
    (out-1) = 1/2; otherwise in / out = 1/2), so every weight and every partial sum is exact in
    float64 and a score that should be 0 is 0. On other grids an integer map's true zeros come out
    as +-1e-17 noise whose sign depends on how the reference's compiler fused multiply-adds (the
    CPU reference's own kernel uses FMA): no float32 rounding can erase noise around 0."""
    gen = torch.Generator().manual_seed(5)
    per_channel = torch.randn(2, 5, 1, 1, generator=gen).expand(2, 5, 4, 4).contiguous()
    plateau = torch.randint(0, 3, (2, 3, 3, 3), generator=gen).float()
    plateau = plateau.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # 2x2 plateaus
    video_per_channel = torch.rand(2, 3, 1, 1, 1, generator=gen).expand(2, 3, 2, 3, 3)
    integer = torch.randint(-3, 4, (2, 3, 4, 5), generator=gen).float()
    video_integer = torch.randint(-2, 3, (1, 2, 3, 4, 4), generator=gen).double()
    return [
        ("constant", torch.ones(2, 4, 3, 3), (14, 14), (14, 14)),
        ("constant-fp32", torch.full((2, 3, 7, 7), 0.1), (14, 14), (14, 14)),
        ("per-channel-constant", per_channel, (14, 14), (14, 14)),
        ("plateaus", plateau, (9, 11), (9, 11)),
        ("integer", integer, (7, 9), (8, 10)),
        ("constant-fp16", torch.full((2, 3, 4, 4), 0.3).half(), (14, 14), (14, 14)),
        ("constant-bf16", torch.full((2, 3, 4, 4), -1.7).bfloat16(), (10, 13), (10, 13)),
        ("video-constant", torch.full((2, 3, 2, 3, 3), 0.7), (4, 6, 6), (4, 6, 6)),
        ("video-per-channel", video_per_channel.contiguous(), (3, 5, 4), (3, 5, 4)),
        ("video-integer", video_integer, (5, 7, 7), (6, 8, 8)),
    ]


TIE_RICH = _tie_rich_maps()


@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("name,f,grid_align,grid", TIE_RICH, ids=[m[0] for m in TIE_RICH])
def test_tie_rich_maps_give_the_reference_indices(backend, name, f, grid_align, grid, order,
                                                  align):
    backend_name, device = backend
    grid = grid_align if align else grid
    x = torch.randn(f.shape[0], 1 + int(torch.tensor(grid).prod()), 3)
    kwargs = dict(grid=grid, order=order, align_corners=align)
    for z in (0.3, 0.7):
        out, idx = papr_kernels.prune(x.to(device), f.to(device), z, return_indices=True,
                                      backend=backend_name, **kwargs)
        want_out, want_idx = reference.prune(x, f, z, return_indices=True, **kwargs)
        assert torch.equal(idx.cpu(), want_idx), (name, z)
        assert torch.equal(out.cpu(), want_out)


@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("name,f,grid_align,grid", [m for m in TIE_RICH if m[1].dim() == 4],
                         ids=[m[0] for m in TIE_RICH if m[1].dim() == 4])
def test_tie_rich_maps_give_the_reference_positions_in_hierarchical_select(
        backend, name, f, grid_align, grid, order):
    backend_name, device = backend
    for z in (0.3, 0.65):
        got = hierarchical.select(f.to(device), grid_align, z, order=order, backend=backend_name)
        scores = reference.significance(f, grid_align)
        want = reference.top_k(scores, got.shape[1], order)
        assert torch.equal(got.cpu(), want), (name, z)


# Scores that another summation order moves (the compiled kernels weigh the taps without FMA,
# PyTorch's CPU kernel with): (name, f, grid, align_corners).
ORDER_NOISE_MAPS = [
    # Trilinear along t = 1 and w = 1: every score is 0.5 * (m[1] + m[2]), a float64 value on a
    # float32 rounding boundary; the weights 0.8 and 0.2 of w move it one float64 ULP down in
    # the kernels (v * 0.8 + v * 0.2), not in PyTorch (fma): the reference's tie is split.
    ("video-rounding-boundary", torch.tensor(
        [0.6702473759651184, 0.37225034832954407, 0.47455716133117676, -0.7595356702804565,
         -0.12291081994771957, 0.8490941524505615, 0.9611973762512207, 1.182681918144226,
         -1.9625160694122314, -1.6227751970291138, 0.49365687370300293, -1.1157249212265015]
    ).view(1, 3, 1, 4, 1), (3, 1, 5), False),
    # Bicubic of the column (-1, 1) to one row: true zeros, computed as +-1e-17 noise that
    # depends on the order (no float32 rounding erases noise around 0).
    ("cancellation-to-zero", torch.tensor([-1.0, 1.0]).view(1, 1, 2, 1), (1, 6), False),
]


@pytest.mark.parametrize("name,f,grid,align", ORDER_NOISE_MAPS, ids=[m[0] for m in ORDER_NOISE_MAPS])
def test_scores_moved_by_the_summation_order_match_by_the_rule(backend, name, f, grid, align):
    backend_name, device = backend
    x = torch.randn(1, int(torch.tensor(grid).prod()), 3)
    kwargs = dict(num_prefix_tokens=0, grid=grid, align_corners=align)
    for z in (0.3, 0.5):
        out, idx = papr_kernels.prune(x.to(device), f.to(device), z, return_indices=True,
                                      backend=backend_name, **kwargs)
        assert_matches_reference(x, f, z, out.cpu(), idx.cpu(), **kwargs)


@pytest.mark.parametrize("name,f,grid,align", ORDER_NOISE_MAPS, ids=[m[0] for m in ORDER_NOISE_MAPS])
def test_an_independent_summation_order_matches_by_the_rule(name, f, grid, align):
    """The NumPy oracle (matrix products: yet another order) ranks these maps; the rule that
    holds the backends to the reference accepts its indices too."""
    x = torch.randn(1, int(torch.tensor(grid).prod()), 3)
    scores = numpy_oracle.significance(f.double().numpy(), grid, align).astype(np.float32)
    for z in (0.3, 0.5):
        k = reference.keep_count(x.shape[1], z, 0)
        idx = torch.from_numpy(numpy_oracle.rank(scores.astype(np.float64))[:, :k].copy())
        assert_matches_reference(x, f, z, reference.gather(x, idx, 0), idx, num_prefix_tokens=0,
                                 grid=grid, align_corners=align)


def test_source_index_is_rounded_once_as_in_pytorch(backend):
    """3 -> 9 bicubic, align_corners=False: output 1's source index is 1/3 * 1.5 - 0.5, which
    PyTorch's CPU kernel computes as one FMA (-2.8e-17: taps 0, 0, 0, 1) where two roundings give
    0 (taps 0, 0, 1, 2: the inf in column 2 times weight 0 makes the score NaN). Every backend
    must read the taps PyTorch reads."""
    backend_name, device = backend
    f = torch.tensor([[1.3789, 2.5293, float("inf")], [-0.9878, -0.9082, 0.5425]]).view(1, 1, 2, 3)
    x = torch.randn(1, 9, 4)
    kwargs = dict(num_prefix_tokens=0, grid=(1, 9), align_corners=False)
    assert reference.significance(f, (1, 9), False)[0, :2].isfinite().all()
    out, idx = papr_kernels.prune(x.to(device), f.to(device), 0.5, return_indices=True,
                                  backend=backend_name, **kwargs)
    want_out, want_idx = reference.prune(x, f, 0.5, return_indices=True, **kwargs)
    assert idx.cpu().tolist() == want_idx.tolist() == [[1, 0, 2, 3]]
    assert torch.equal(out.cpu(), want_out)
