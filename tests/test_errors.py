"""SPEC's bad-input list: the right exception, naming the argument, before any kernel runs."""
import math

import pytest
import torch

import papr_kernels


def _ok(device="cpu"):
    return torch.randn(2, 197, 8, device=device), torch.randn(2, 4, 7, 7, device=device)


# (description, change to the good arguments, exception type, words the message must contain)
BAD_INPUTS = [
    ("x 2-D", dict(x=torch.randn(197, 8)), ValueError, ["x", "3-D"]),
    ("x 4-D", dict(x=torch.randn(2, 197, 8, 1)), ValueError, ["x", "3-D"]),
    ("f 3-D", dict(f=torch.randn(2, 7, 7)), ValueError, ["f", "4-D"]),
    ("f 6-D", dict(f=torch.randn(2, 4, 1, 1, 7, 7)), ValueError, ["f", "5-D"]),
    ("x integer", dict(x=torch.ones(2, 197, 8, dtype=torch.int64)), TypeError, ["x", "floating"]),
    ("x bool", dict(x=torch.ones(2, 197, 8, dtype=torch.bool)), TypeError, ["x", "floating"]),
    ("x complex", dict(x=torch.ones(2, 197, 8, dtype=torch.complex64)), TypeError, ["x", "floating"]),
    ("f integer", dict(f=torch.ones(2, 4, 7, 7, dtype=torch.int32)), TypeError, ["f", "floating"]),
    ("f float8", dict(f=torch.ones(2, 4, 7, 7).to(torch.float8_e4m3fn)), TypeError,
     ["f", "float16, bfloat16, float32, float64", "float8_e4m3fn"]),
    ("x float8", dict(x=torch.ones(2, 197, 8).to(torch.float8_e5m2)), TypeError,
     ["x", "float8_e5m2"]),
    ("x not a tensor", dict(x=[[1.0]]), TypeError, ["x", "Tensor"]),
    ("f not a tensor", dict(f=None), TypeError, ["f", "Tensor"]),
    ("x no tokens", dict(x=torch.randn(2, 0, 8)), ValueError, ["x", "tokens"]),
    ("x no channels", dict(x=torch.randn(2, 197, 0)), ValueError, ["x", "channels"]),
    ("f no channels", dict(f=torch.randn(2, 0, 7, 7)), ValueError, ["f", "channels"]),
    ("f no height", dict(f=torch.randn(2, 4, 0, 7)), ValueError, ["f", "spatial"]),
    ("f no frames", dict(f=torch.randn(2, 4, 0, 7, 7), grid=(1, 14, 14)), ValueError, ["f"]),
    ("batch mismatch", dict(f=torch.randn(3, 4, 7, 7)), ValueError, ["f", "batch"]),
    ("device mismatch", dict(f=torch.randn(2, 4, 7, 7, device="meta")), ValueError, ["f", "device"]),
    ("z zero", dict(z=0.0), ValueError, ["z", "(0, 1]"]),
    ("z negative", dict(z=-0.5), ValueError, ["z"]),
    ("z above one", dict(z=1.5), ValueError, ["z"]),
    ("z nan", dict(z=math.nan), ValueError, ["z"]),
    ("z inf", dict(z=math.inf), ValueError, ["z"]),
    ("z string", dict(z="0.5"), TypeError, ["z", "real"]),
    ("z None", dict(z=None), TypeError, ["z"]),
    ("z bool", dict(z=True), TypeError, ["z"]),
    ("z tensor", dict(z=torch.tensor(0.5)), TypeError, ["z"]),
    ("prefix negative", dict(num_prefix_tokens=-1), ValueError, ["num_prefix_tokens"]),
    ("prefix all tokens", dict(num_prefix_tokens=197), ValueError, ["num_prefix_tokens"]),
    ("prefix float", dict(num_prefix_tokens=1.0), TypeError, ["num_prefix_tokens"]),
    ("grid wrong product", dict(grid=(14, 15)), ValueError, ["grid", "196"]),
    ("grid wrong rank", dict(grid=(2, 7, 14)), ValueError, ["grid"]),
    ("grid zero", dict(grid=(0, 196)), ValueError, ["grid"]),
    ("grid negative", dict(grid=(-14, -14)), ValueError, ["grid"]),
    ("grid floats", dict(grid=(14.0, 14.0)), ValueError, ["grid"]),
    ("grid not a sequence", dict(grid=14), TypeError, ["grid"]),
    ("non-square without grid", dict(x=torch.randn(2, 1 + 12 * 20, 8)), ValueError,
     ["grid", "square"]),
    ("video without grid", dict(x=torch.randn(2, 1568, 8), f=torch.randn(2, 4, 4, 7, 7),
                                num_prefix_tokens=0), ValueError, ["grid", "5-D"]),
    ("video 2-D grid", dict(x=torch.randn(2, 1568, 8), f=torch.randn(2, 4, 4, 7, 7),
                            num_prefix_tokens=0, grid=(28, 56)), ValueError, ["grid"]),
    ("unknown order", dict(order="random"), ValueError, ["order", "spatial"]),
    ("align_corners not bool", dict(align_corners="yes"), TypeError, ["align_corners"]),
    ("unknown backend", dict(backend="numpy"), ValueError, ["backend", "numpy"]),
]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "after-a-good-call"])
@pytest.mark.parametrize("change, error, words", [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(backend, change, error, words, warm):
    name, device = backend
    x, f = _ok(device)
    if warm:  # the good arguments' Plan is cached (spec.check_prune_args): no help to bad ones
        papr_kernels.prune(x, f, 0.5, backend=name)
    args = dict(x=x, f=f, z=0.5, backend=name)
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
                 for k, v in change.items()})
    x_before = args["x"].clone() if isinstance(args["x"], torch.Tensor) else None
    with pytest.raises(error) as info:
        papr_kernels.prune(args.pop("x"), args.pop("f"), args.pop("z"), **args)
    message = str(info.value)
    for word in words:
        assert word in message, f"{message!r} does not mention {word!r}"
    if x_before is not None:
        assert torch.equal(x_before, x if "x" not in change else change["x"].to(device))


def test_backend_that_cannot_run_names_itself_and_why():
    x, f = _ok("meta")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot run on meta tensors here: .+"):
        papr_kernels.prune(x, f, 0.5, backend="cpp")


def test_env_override_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("PAPR_KERNELS_BACKEND", "cuda")
    x, f = _ok()
    if "cuda" in papr_kernels.available_backends("cpu"):
        pytest.skip("the cuda backend can run on CPU tensors?")
    with pytest.raises(RuntimeError, match="PAPR_KERNELS_BACKEND=cuda cannot run on cpu tensors"):
        papr_kernels.prune(x, f, 0.5)


def test_module_rejects_bad_z_and_order_at_construction():
    with pytest.raises(ValueError, match="z"):
        papr_kernels.PaPr(z=0.0)
    with pytest.raises(ValueError, match="order"):
        papr_kernels.PaPr(z=0.5, order="best")
