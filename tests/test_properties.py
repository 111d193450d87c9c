"""Property tests: generated shapes, dtypes and features, every backend against the reference.

The `ci` profile (default) tries 60 examples per backend and test; `HYPOTHESIS_PROFILE=long`
tries 2000.
"""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import papr_kernels
from papr_kernels import hierarchical, reference
from papr_kernels.testing import assert_matches_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Scales of f's values: 1, large (fp64 only beyond float32's range, SPEC's overflow exception
# left out), tiny (float32 / float16 subnormals after the mean).
SCALES = {torch.float16: [1.0, 1e3, 1e-6], torch.bfloat16: [1.0, 1e30, 1e-40],
          torch.float32: [1.0, 1e30, 1e-40], torch.float64: [1.0, 1e300, 1e-310]}
LAYOUTS = ["contiguous", "transposed", "offset"]


def _shape(draw, dims, largest):
    """A grid or map size: mostly small sides, sometimes a 1 x N strip or a long side."""
    kind = draw(st.sampled_from(["small", "small", "small", "strip", "long"]))
    sides = [draw(st.integers(1, largest)) for _ in range(dims)]
    if kind == "strip":
        sides[draw(st.integers(0, dims - 1))] = 1
    elif kind == "long":
        sides[draw(st.integers(0, dims - 1))] = draw(st.integers(largest, 4 * largest))
    return tuple(sides)


def _keep_ratio(draw):
    return draw(st.one_of(st.floats(0.0, 1.0, exclude_min=True),
                          st.sampled_from([1e-9, 1.0 - 1e-9, math.nextafter(1.0, 0.0), 1.0])))


def _features(draw, f_dtype):
    return dict(features=draw(st.sampled_from(["random", "integers", "special"])),
                f_dtype=f_dtype, scale=draw(st.sampled_from(SCALES[f_dtype])),
                f_layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                proposal_channels=draw(st.sampled_from([1, 2, 3, 4, 8, 17])),
                seed=draw(st.integers(0, 2**31 - 1)))


@st.composite
def prune_problems(draw):
    video = draw(st.booleans()) and draw(st.booleans())  # a quarter of the examples
    dims = 3 if video else 2
    return dict(
        batch=draw(st.sampled_from([1, 1, 2, 3, 0])),
        prefix=draw(st.one_of(st.integers(0, 3), st.integers(4, 12))),
        grid=_shape(draw, dims, 4 if video else 12),
        f_size=_shape(draw, dims, 5 if video else 10),
        channels=draw(st.integers(1, 9)),
        z=_keep_ratio(draw),
        order=draw(st.sampled_from(["score", "spatial"])),
        align_corners=draw(st.booleans()),
        x_dtype=draw(st.sampled_from(DTYPES + [torch.float64])),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        **_features(draw, draw(st.sampled_from(DTYPES + [torch.float64]))),
    )


@st.composite
def select_problems(draw):
    return dict(batch=draw(st.sampled_from([1, 2, 0])), grid=_shape(draw, 2, 12),
                f_size=_shape(draw, 2, 10), z=_keep_ratio(draw),
                order=draw(st.sampled_from(["score", "spatial"])),
                align_corners=draw(st.booleans()),
                **_features(draw, draw(st.sampled_from(DTYPES + [torch.float64]))))


def make_features(p, gen):
    """f of the problem: random, small integers (many exact ties) or random with NaN, inf, -0.0
    and 0.0 mixed in; scaled, in f_dtype and f_layout (same values, other strides)."""
    shape = (p["batch"], p["proposal_channels"], *p["f_size"])
    if p["features"] == "integers":
        f = torch.randint(-2, 3, (p["batch"], 1, *p["f_size"]), generator=gen).double()
        f = f.expand(shape).contiguous()
    else:
        f = torch.randn(shape, generator=gen, dtype=torch.float64)
        if p["features"] == "special":
            special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0],
                                   dtype=torch.float64)
            mask = torch.rand(shape, generator=gen) < 0.1
            f[mask] = special[torch.randint(0, 5, (int(mask.sum()),), generator=gen)]
    f = (f * p["scale"]).to(p["f_dtype"])
    if p["f_layout"] == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last if f.dim() == 4
                         else torch.channels_last_3d)
    elif p["f_layout"] == "strided":   # every other element of a larger tensor
        f = torch.stack([f, torch.full_like(f, float("nan"))], dim=-1)[..., 0]
    return f


def make_tokens(p, gen):
    """x (B, n, C) in x_dtype and x_layout: contiguous, a transposed copy, or a view at a
    storage offset with a row stride larger than C."""
    n = p["prefix"] + math.prod(p["grid"])
    x = torch.randn(p["batch"], n, p["channels"], generator=gen).to(p["x_dtype"])
    if p["x_layout"] == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if p["x_layout"] == "offset":
        padded = torch.zeros(p["batch"], n + 1, p["channels"] + 2, dtype=x.dtype)
        padded[:, 1:, 1:-1] = x
        return padded[:, 1:, 1:-1]
    return x


SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(p=prune_problems())
def test_random_problems_match_reference(backend, p):
    name, device = backend
    gen = torch.Generator().manual_seed(p["seed"])
    x, f = make_tokens(p, gen), make_features(p, gen)
    kwargs = dict(num_prefix_tokens=p["prefix"], grid=p["grid"], order=p["order"],
                  align_corners=p["align_corners"])
    out, idx = papr_kernels.prune(x.to(device), f.to(device), p["z"], return_indices=True,
                                  backend=name, **kwargs)
    exact = p["features"] == "integers" and p["f_size"] == p["grid"] and p["align_corners"]
    assert_matches_reference(x, f, p["z"], out.cpu(), idx.cpu(), exact_indices=exact, **kwargs)


@SETTINGS
@given(p=select_problems())
def test_random_select_problems_match_reference(backend, p):
    """hierarchical.select keeps the positions `prune` keeps on one token per position."""
    name, device = backend
    f = make_features(p, torch.Generator().manual_seed(p["seed"]))
    got = hierarchical.select(f.to(device), p["grid"], p["z"], p["align_corners"], p["order"],
                              backend=name).cpu()
    positions = torch.arange(math.prod(p["grid"]), dtype=torch.float32)
    positions = positions.view(1, -1, 1).expand(p["batch"], -1, 1)
    exact = p["features"] == "integers" and p["f_size"] == p["grid"] and p["align_corners"]
    assert_matches_reference(positions, f, p["z"], reference.gather(positions, got, 0), got,
                             num_prefix_tokens=0, grid=p["grid"], align_corners=p["align_corners"],
                             order=p["order"], exact_indices=exact)
