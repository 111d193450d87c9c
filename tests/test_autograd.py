"""Autograd through every backend: the gradient reaches x only, as a scatter at the kept rows."""
import pytest
import torch

import papr_kernels
from papr_kernels import reference


def _inputs(device, dtype=torch.float32, batch=2, prefix=1, side=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prefix + side * side, 5, generator=gen, dtype=dtype).to(device)
    f = torch.randn(batch, 4, 3, 3, generator=gen).to(device)
    return x.requires_grad_(), f


@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_backward_is_scatter_of_output_gradient(backend, order, prefix):
    name, device = backend
    x, f = _inputs(device, prefix=prefix)
    out, idx = papr_kernels.prune(x, f, 0.5, num_prefix_tokens=prefix, order=order,
                                  return_indices=True, backend=name)
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad_out)
    expected = torch.zeros_like(x)
    expected[:, :prefix] = grad_out[:, :prefix]
    for b in range(x.shape[0]):
        expected[b, prefix + idx[b]] = grad_out[b, prefix:]
    assert torch.equal(grad_x, expected)
    # and ordinary autograd through the reference's indexing agrees
    (ref_grad,) = torch.autograd.grad(reference.prune(x, f, 0.5, num_prefix_tokens=prefix,
                                                      order=order), x, grad_out)
    assert torch.equal(grad_x, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_backward_dtypes(backend, dtype):
    name, device = backend
    x, f = _inputs(device, dtype=dtype)
    out = papr_kernels.prune(x, f, 0.3, backend=name)
    out.backward(torch.ones_like(out))
    kept_rows = (x.grad != 0).any(dim=2)
    assert x.grad.dtype == dtype
    assert kept_rows.sum(dim=1).tolist() == [out.shape[1]] * x.shape[0]


def test_gradcheck_float64(backend):
    name, device = backend
    interpreted = name == "triton" and device == "cpu"   # each call is slow: fewer, smaller calls
    x, f = _inputs(device, dtype=torch.float64, side=3 if interpreted else 6)

    def fn(x):
        return papr_kernels.prune(x, f, 0.5, backend=name)

    assert torch.autograd.gradcheck(fn, (x,), fast_mode=interpreted)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=interpreted)


def test_no_gradient_for_f_and_indices(backend):
    name, device = backend
    x, f = _inputs(device)
    f.requires_grad_()
    out, idx = papr_kernels.prune(x, f, 0.5, return_indices=True, backend=name)
    assert not idx.requires_grad
    out.sum().backward()
    assert f.grad is None
    assert x.grad is not None


def test_z_one_gradient_is_identity(backend):
    name, device = backend
    x, f = _inputs(device)
    out = papr_kernels.prune(x, f, 1.0, backend=name)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.equal(x.grad, grad_out)


def test_inference_mode_and_no_grad(backend):
    name, device = backend
    x, f = _inputs(device)
    expected = papr_kernels.prune(x.detach(), f, 0.5, backend=name)
    with torch.inference_mode():
        assert torch.equal(papr_kernels.prune(x, f, 0.5, backend=name), expected)
    with torch.no_grad():
        out = papr_kernels.prune(x, f, 0.5, backend=name)
    assert not out.requires_grad and torch.equal(out, expected)
