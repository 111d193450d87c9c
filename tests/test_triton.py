"""Triton-specific tests (the parity matrix in test_parity.py covers the shapes and dtypes).

On a machine without CUDA they run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it);
shapes stay small because the interpreter runs every program op by op in Python.
"""
import pytest
import torch

import papr_kernels
from papr_kernels import backends, reference
from papr_kernels.testing import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_reason = backends.unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"triton on {DEVICE}: {_reason}")

if _reason is None:
    from papr_kernels.ops.triton import common
    from papr_kernels.ops.triton import prune as tp


@pytest.fixture
def split(monkeypatch):
    """Force several programs per batch row (row/token chunks, channel chunks)."""
    def set_split(rows, chans):
        monkeypatch.setattr(common, "SPLIT_OVERRIDE", (rows, chans))
    return set_split


@pytest.fixture
def launches(monkeypatch):
    """Count the launches of each JIT kernel by wrapping its `run`."""
    counts = {"fwd": 0, "bwd": 0}
    for key, kernel in (("fwd", tp._prune_fwd_kernel), ("bwd", tp._prune_bwd_kernel)):
        original = kernel.run

        def counting(*args, _key=key, _original=original, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counting)
    return counts


def _prune(x, f, z, **kwargs):
    return papr_kernels.prune(x, f, z, return_indices=True, backend="triton", **kwargs)


def test_one_launch_forward_one_launch_backward(launches, split):
    split(3, 2)   # 3 row chunks x 2 channel chunks per batch row: still one launch each way
    torch.manual_seed(0)
    x = torch.randn(2, 37, 10, device=DEVICE, requires_grad=True)
    f = torch.randn(2, 4, 3, 3, device=DEVICE)
    out, idx = _prune(x, f, 0.5)
    assert launches == {"fwd": 1, "bwd": 0}
    out.backward(torch.randn_like(out))
    assert launches == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("rows,chans", [(1, 1), (4, 3)])
def test_split_programs_match_reference(split, order, rows, chans):
    split(rows, chans)
    torch.manual_seed(1)
    x = torch.randn(3, 5 + 48, 7, device=DEVICE, requires_grad=True)
    f = torch.randint(-4, 5, (3, 3, 6, 8), device=DEVICE).float()
    kwargs = dict(num_prefix_tokens=5, grid=(6, 8), order=order)
    out, idx = _prune(x, f, 0.4, **kwargs)
    assert_matches_reference(x.detach(), f, 0.4, out.detach(), idx, exact_indices=True, **kwargs)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, reference.scatter(g, idx, 53, 5))


def test_nan_ties_signed_zero_order():
    # f size == grid: the resize keeps the values (NaN spreads to the neighbours through the
    # zero-weight taps, as in PyTorch), so the order is decided by SPEC's tie rules
    vals = torch.tensor([0.0, -0.0, 5.0, 1.0, 1.0, -3.0, -0.0, 7.0,
                         0.0, 2.0, 4.0, 1.0, 0.0, 2.0, -1.0, 2.0] * 4)
    vals[[9, 50]] = float("nan")
    f = vals.view(1, 1, 8, 8).to(DEVICE)
    x = torch.arange(65.0, device=DEVICE).view(1, 65, 1).repeat(1, 1, 3)
    expected = reference.rank(reference.significance(f, (8, 8))).cpu()
    assert expected.shape == (1, 64)
    for z in (0.3, 0.6, 0.95):
        k = papr_kernels.keep_count(65, z)
        out, idx = _prune(x, f, z)
        assert idx.cpu().tolist() == expected[:, :k].tolist()
        assert torch.equal(out[0, 1:, 0].long().cpu(), expected[0, :k] + 1)


def test_video_trilinear_and_non_contiguous_x():
    torch.manual_seed(2)
    base = torch.randn(2, 6, 1 + 3 * 4 * 5, device=DEVICE)
    x = base.transpose(1, 2)                      # (2, 61, 6), not contiguous
    f = torch.randint(-3, 4, (2, 2, 2, 3, 4), device=DEVICE).to(torch.float16)
    for align in (True, False):
        kwargs = dict(grid=(3, 4, 5), align_corners=align)
        out, idx = _prune(x, f, 0.5, **kwargs)
        assert_matches_reference(x, f, 0.5, out, idx, **kwargs)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_x_dtypes_copy_bits(x_dtype):
    torch.manual_seed(3)
    x = torch.randn(1, 26, 5, device=DEVICE).to(x_dtype)
    f = torch.randn(1, 3, 2, 2, device=DEVICE).to(torch.bfloat16)
    out, idx = _prune(x, f, 0.5, grid=(5, 5))
    assert out.dtype == x_dtype
    assert_matches_reference(x, f, 0.5, out, idx, grid=(5, 5))


def test_batch_zero_and_z_one_never_launch(launches):
    x = torch.randn(0, 17, 4, device=DEVICE)
    f = torch.randn(0, 2, 2, 2, device=DEVICE)
    out, idx = _prune(x, f, 0.5)
    assert out.shape == (0, 9, 4) and idx.shape == (0, 8)
    x = torch.randn(2, 17, 4, device=DEVICE)
    out, idx = _prune(x, torch.randn(2, 2, 2, 2, device=DEVICE), 1.0)
    assert out is x and idx.tolist() == [list(range(16))] * 2
    assert launches == {"fwd": 0, "bwd": 0}


def test_large_source_falls_back_to_reference(launches):
    x = torch.randn(1, 10, 3, device=DEVICE)
    f = torch.randn(1, 1, 65, 65, device=DEVICE)  # 4225 source positions > MAX_SOURCE
    assert tp.fallback_reason(f, 9) is not None
    out, idx = _prune(x, f, 0.5)
    assert launches["fwd"] == 0
    assert_matches_reference(x, f, 0.5, out, idx)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4, 197, 768)
        f = torch.empty(4, 1024, 7, 7, dtype=torch.float16)
        out, idx = torch.ops.papr_kernels.triton_prune_forward(x, f, 1, [14, 14], 98, True, False)
        assert out.shape == (4, 99, 768) and out.dtype == torch.float32
        assert idx.shape == (4, 98) and idx.dtype == torch.int64
        gx = torch.ops.papr_kernels.triton_prune_backward(out, idx, 197, 1)
        assert gx.shape == (4, 197, 768)


def test_opcheck():
    torch.manual_seed(4)
    x = torch.randn(2, 10, 3, device=DEVICE, requires_grad=True)
    f = torch.randn(2, 2, 3, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.papr_kernels.triton_prune_forward.default,
                          (x, f, 1, [3, 3], 4, True, False),
                          test_utils=("test_schema", "test_faketensor"))
    g = torch.randn(2, 5, 3, device=DEVICE)
    idx = torch.tensor([[0, 3, 2, 8], [7, 1, 5, 4]], device=DEVICE)
    torch.library.opcheck(torch.ops.papr_kernels.triton_prune_backward.default, (g, idx, 10, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    x = torch.randn(2, 17, 4, device=DEVICE)
    f = torch.randn(2, 3, 2, 2, device=DEVICE)
    fn = torch.compile(lambda x, f: papr_kernels.prune(x, f, 0.5, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    out = fn(x, f)
    assert torch.equal(out, papr_kernels.prune(x, f, 0.5, backend="torch"))
