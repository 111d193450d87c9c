"""spec's per-signature Plan cache and the other per-call shortcuts of `prune` (issue 14): a
cached call gives what the full checks give, no bad input gets through after a good call, the
cache stays bounded, PAPR_KERNELS_BACKEND is read on every call."""
import pytest
import torch

import papr_kernels
from conftest import backend_params
from papr_kernels import backends, reference, spec


def _args(batch=2, tokens=197, channels=8, prefix=1, f_shape=(4, 7, 7), dtype=torch.float32,
          f_dtype=torch.float32, **kw):
    gen = torch.Generator().manual_seed(batch * 1000 + tokens + channels)
    x = torch.randn(batch, tokens, channels, generator=gen).to(dtype)
    f = torch.randn(batch, *f_shape, generator=gen).to(f_dtype)
    return dict(dict(x=x, f=f, z=0.5, num_prefix_tokens=prefix, grid=None, align_corners=True,
                     order="score"), **kw)


# One call after another in this order: each differs from the one before in one thing.
SEQUENCE = [
    _args(),
    _args(z=0.25),
    _args(z=1.0),
    _args(z=0.5000001),
    _args(batch=3),
    _args(batch=0),
    _args(dtype=torch.float64),
    _args(f_dtype=torch.bfloat16),
    _args(channels=16),
    _args(tokens=201, prefix=5),
    _args(tokens=196, prefix=0),
    _args(tokens=1 + 7 * 28, grid=(7, 28)),
    _args(tokens=1 + 7 * 28, grid=(28, 7)),
    _args(f_shape=(4, 12, 12)),
    _args(order="spatial"),
    _args(align_corners=False),
    _args(tokens=2 * 7 * 14, prefix=0, f_shape=(4, 2, 7, 7), grid=(2, 7, 14)),
    _args(),
]


def _expected(args):
    """(out, indices) from the full checks (no cache) and the reference's pieces."""
    plan = spec._check_prune_args(*args.values())
    x, f = args["x"], args["f"]
    if plan.identity:
        return x, reference.all_indices(x.shape[0], plan.num_patches, x.device)
    indices = reference.top_k(reference.significance(f, plan.grid, plan.align_corners),
                              plan.keep, plan.order)
    return reference.gather(x, indices, plan.num_prefix_tokens), indices


@pytest.mark.parametrize("backend", backend_params("torch-cpu", "cpp-cpu"), indirect=True)
def test_each_call_gives_the_answer_of_its_own_arguments(backend):
    name, _ = backend
    spec._PLANS.clear()
    for _ in range(2):  # the second pass hits the cache for every signature
        for args in SEQUENCE:
            assert spec.check_prune_args(*args.values()) == spec._check_prune_args(*args.values())
            kw = {k: v for k, v in args.items() if k not in ("x", "f", "z")}
            out, indices = papr_kernels.prune(args["x"], args["f"], args["z"], backend=name,
                                              return_indices=True, **kw)
            expected_out, expected_indices = _expected(args)
            assert torch.equal(indices, expected_indices)
            assert out.shape == expected_out.shape and torch.equal(out, expected_out)


# (good arguments that fill the cache, then the bad change of the same values, error, words):
# every pair hashes alike (True == 1 == 1.0, 14.0 == 14) or has the shape of the good call.
ALIASES = [
    (dict(z=1.0), dict(z=True), TypeError, ["z"]),
    (dict(num_prefix_tokens=1), dict(num_prefix_tokens=True), TypeError, ["num_prefix_tokens"]),
    (dict(num_prefix_tokens=1), dict(num_prefix_tokens=1.0), TypeError, ["num_prefix_tokens"]),
    (dict(grid=(14, 14)), dict(grid=(14.0, 14.0)), ValueError, ["grid"]),
    (dict(grid=(14, 14)), dict(grid=(True, 14)), ValueError, ["grid"]),
    (dict(align_corners=True), dict(align_corners=1), TypeError, ["align_corners"]),
    (dict(align_corners=False), dict(align_corners=0.0), TypeError, ["align_corners"]),
    (dict(), dict(x=torch.ones(2, 197, 8, dtype=torch.int64)), TypeError, ["x", "floating"]),
    (dict(), dict(f=torch.ones(2, 4, 7, 7).to(torch.float8_e4m3fn)), TypeError, ["f", "float8"]),
    (dict(), dict(f=torch.randn(2, 4, 7, 7, device="meta")), ValueError, ["f", "device"]),
    (dict(), dict(x=torch.randn(2, 197, 8, device="meta")), ValueError, ["f", "device"]),
]


@pytest.mark.parametrize("good, bad, error, words", ALIASES, ids=[
    "z-True", "prefix-True", "prefix-1.0", "grid-floats", "grid-bool", "align_corners-1",
    "align_corners-0.0", "x-int64", "f-float8", "f-meta", "x-meta"])
def test_bad_input_after_a_good_call_still_raises(good, bad, error, words):
    args = _args(**good)
    papr_kernels.prune(args.pop("x"), args.pop("f"), args.pop("z"), **args)
    args = _args(**dict(good, **bad))
    with pytest.raises(error) as info:
        papr_kernels.prune(args.pop("x"), args.pop("f"), args.pop("z"), **args)
    for word in words:
        assert word in str(info.value)


def test_gradient_mode_and_requires_grad_are_read_on_every_call():
    args = _args()
    x, f, z = args.pop("x"), args.pop("f"), args.pop("z")
    assert not papr_kernels.prune(x, f, z, **args).requires_grad
    xr, fr = x.clone().requires_grad_(), f.clone().requires_grad_()
    out = papr_kernels.prune(xr, fr, z, **args)
    out.sum().backward()
    assert out.requires_grad and xr.grad is not None and fr.grad is None
    assert xr.grad.sum() == out.numel()
    with torch.no_grad():
        assert not papr_kernels.prune(xr, fr, z, **args).requires_grad


@pytest.mark.parametrize("change", [
    dict(z=True), dict(z=1), dict(num_prefix_tokens=True), dict(grid=[14, 14]),
    dict(grid=(14.0, 14.0)), dict(align_corners=1), dict(x=torch.nn.Parameter(torch.randn(2, 197, 8))),
], ids=lambda c: f"{next(iter(c))}-{type(next(iter(c.values()))).__name__}")
def test_arguments_of_other_than_their_plain_type_are_not_cached(change):
    assert spec.prune_signature(**_args(**change)) is None


def test_not_cached_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert spec.prune_signature(**_args()) is None


def test_cache_stays_bounded():
    for batch in range(spec._MAX_PLANS + 10):
        spec.check_prune_args(torch.empty(batch, 5, 1), torch.empty(batch, 1, 2, 2), 0.5)
        assert len(spec._PLANS) <= spec._MAX_PLANS


def test_env_variable_is_read_on_every_call(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.env_backend() is None
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.env_backend() == "torch" and backends.pick(None, "cpu") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "")
    assert backends.env_backend() is None
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="PAPR_KERNELS_BACKEND must be one of"):
        papr_kernels.prune(torch.randn(1, 5, 2), torch.randn(1, 1, 2, 2), 0.5)


def test_prune_backend_is_remembered_per_name_device_and_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    for _ in range(2):  # the second round comes from the memo
        assert backends.prune_backend(None, cpu) is backends.resolve(None, "cpu")
        assert backends.prune_backend("torch", cpu) is backends.resolve("torch", "cpu")
        monkeypatch.setenv(backends.ENV_VAR, "torch")
        assert backends.prune_backend(None, cpu) is backends.resolve("torch", "cpu")
        monkeypatch.delenv(backends.ENV_VAR)
        for bad, error in [("numpy", ValueError), ("cuda", RuntimeError)]:
            with pytest.raises(error, match=bad):  # raised every time, never remembered
                backends.prune_backend(bad, cpu)
    with pytest.raises(RuntimeError, match="cannot run on meta"):
        backends.prune_backend("cpp", torch.device("meta"))
