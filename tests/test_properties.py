"""Property tests: generated shapes, dtypes and features, every backend against the reference.

The `ci` profile (default) tries 60 examples per backend; `HYPOTHESIS_PROFILE=long` tries 2000.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import papr_kernels
from papr_kernels.testing import assert_matches_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@st.composite
def prune_problems(draw):
    video = draw(st.booleans()) and draw(st.booleans())  # a quarter of the examples
    dims = 3 if video else 2
    grid = tuple(draw(st.integers(1, 4 if video else 12)) for _ in range(dims))
    f_size = tuple(draw(st.integers(1, 5 if video else 10)) for _ in range(dims))
    features = draw(st.sampled_from(["random", "integers", "special"]))
    return dict(
        batch=draw(st.integers(1, 3)),
        prefix=draw(st.integers(0, 3)),
        grid=grid,
        f_size=f_size,
        channels=draw(st.integers(1, 9)),
        proposal_channels=draw(st.sampled_from([1, 2, 3, 4, 8])),
        z=draw(st.floats(0.0, 1.0, exclude_min=True)),
        order=draw(st.sampled_from(["score", "spatial"])),
        align_corners=draw(st.booleans()),
        x_dtype=draw(st.sampled_from(DTYPES + [torch.float64])),
        f_dtype=draw(st.sampled_from(DTYPES)),
        features=features,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_problem(p, device):
    gen = torch.Generator().manual_seed(p["seed"])
    n = p["prefix"] + math.prod(p["grid"])
    x = torch.randn(p["batch"], n, p["channels"], generator=gen).to(p["x_dtype"])
    shape = (p["batch"], p["proposal_channels"], *p["f_size"])
    if p["features"] == "integers":
        f = torch.randint(-2, 3, (p["batch"], 1, *p["f_size"]), generator=gen).float()
        f = f.expand(shape).contiguous()
    else:
        f = torch.randn(shape, generator=gen)
        if p["features"] == "special":
            special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0])
            mask = torch.rand(shape, generator=gen) < 0.1
            f[mask] = special[torch.randint(0, 5, (int(mask.sum()),), generator=gen)]
    return x.to(device), f.to(p["f_dtype"]).to(device)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(p=prune_problems())
def test_random_problems_match_reference(backend, p):
    name, device = backend
    x, f = make_problem(p, device)
    kwargs = dict(num_prefix_tokens=p["prefix"], grid=p["grid"], order=p["order"],
                  align_corners=p["align_corners"])
    out, idx = papr_kernels.prune(x, f, p["z"], return_indices=True, backend=name, **kwargs)
    exact = p["features"] == "integers" and p["f_size"] == p["grid"] and p["align_corners"]
    assert_matches_reference(x.cpu(), f.cpu(), p["z"], out.cpu(), idx.cpu(),
                             exact_indices=exact, **kwargs)
