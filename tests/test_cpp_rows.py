"""The row ops of the C++/CUDA extension (papr_kernels::gather_rows / put_rows_ through the
adapter papr_kernels.ops.extension) against the row ops of papr_kernels.reference, bit for bit:
3-D / 4-D, contiguous / permuted NCHW / sliced / expanded layouts, fp16/bf16/fp32/fp64, in place
or not, empty batches and rows, out-of-range indices, and torch.compile through the fake kernels."""
import pytest
import torch

from papr_kernels import reference
from papr_kernels.ops import extension

pytestmark = pytest.mark.skipif(extension.unavailable_reason("cpu") is not None,
                                reason=f"cpp: {extension.unavailable_reason('cpu')}")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["3d", "4d", "nchw", "sliced"]


def _devices():
    cuda_reason = extension.unavailable_reason("cuda")
    if not torch.cuda.is_available():
        cuda_reason = "no CUDA device here (torch.cuda.is_available() is False)"
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        cuda_reason is not None, reason=f"cuda: {cuda_reason}"))]


DEVICES = _devices()


def _make(layout, batch, dtype, device, seed, h=5, w=7, c=6):
    """x (random normal) in the named layout; the same seed gives an equal tensor, same strides."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if layout == "3d":
        return rnd(batch, h * w, c)
    if layout == "4d":
        return rnd(batch, h, w, c)
    if layout == "nchw":  # an NCHW tensor seen channels-last
        return rnd(batch, c, h, w).permute(0, 2, 3, 1)
    if layout == "sliced":  # rows 1.., every other column, odd channels of a larger tensor
        return rnd(batch, h + 1, 2 * w, 2 * c + 1)[:, 1:, ::2, 1::2]
    raise ValueError(layout)


def _indices(batch, positions, k, device, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    rows = [torch.randperm(positions, generator=gen)[:k] for _ in range(batch)]
    idx = torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)
    return idx.to(device)


def _values(batch, k, c, dtype, device, seed, transposed=False):
    gen = torch.Generator().manual_seed(seed + 2000)
    if transposed:  # (B, k, C) with a non-unit channel stride
        return torch.randn(batch, c, k, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(batch, k, c, generator=gen).to(device=device, dtype=dtype)


def _positions(x):
    return x.shape[1] if x.dim() == 3 else x.shape[1] * x.shape[2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch,k", [(3, 11), (2, 35), (1, 1), (2, 0), (0, 4)])
def test_gather_rows_matches_torch(device, dtype, layout, batch, k):
    x = _make(layout, batch, dtype, device, seed=batch * 100 + k)
    idx = _indices(batch, _positions(x), k, device, seed=k)
    got = extension.gather_rows(x, idx)
    want = reference.gather_rows(x, idx)
    assert got.shape == (batch, k, x.shape[-1]) and got.is_contiguous()
    assert got.dtype == dtype and got.device == x.device
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows_expanded_zero_strides(device, dtype):
    base = torch.randn(1, 1, 7, 6).to(device=device, dtype=dtype)
    x = base.expand(3, 5, 7, 6)  # batch and row strides 0
    idx = _indices(3, 35, 12, device, seed=3)
    assert torch.equal(extension.gather_rows(x, idx), reference.gather_rows(x, idx))
    ch = torch.randn(3, 1, 1, 1).to(device=device, dtype=dtype).expand(3, 5, 7, 6)  # channel stride 0
    assert torch.equal(extension.gather_rows(ch, idx), reference.gather_rows(ch, idx))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["3d", "4d"])
@pytest.mark.parametrize("batch,k", [(3, 11), (2, 35), (2, 0), (0, 4)])
@pytest.mark.parametrize("transposed", [False, True], ids=["values", "values_t"])
def test_scatter_rows_matches_torch(device, dtype, layout, batch, k, transposed):
    x = _make(layout, batch, dtype, device, seed=7)
    idx = _indices(batch, _positions(x), k, device, seed=k + 5)
    values = _values(batch, k, x.shape[-1], dtype, device, seed=k, transposed=transposed)
    got = extension.scatter_rows(values, idx, tuple(x.shape))
    want = reference.scatter_rows(values, idx, tuple(x.shape))
    assert got.shape == x.shape and got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch,k", [(3, 11), (2, 35), (2, 0), (0, 4)])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_scatter_back_matches_torch(device, dtype, layout, batch, k, inplace):
    x = _make(layout, batch, dtype, device, seed=batch + 3 * k)
    idx = _indices(batch, _positions(x), k, device, seed=k + 9)
    values = _values(batch, k, x.shape[-1], dtype, device, seed=k + 1, transposed=k % 2 == 1)
    x_ours = _make(layout, batch, dtype, device, seed=batch + 3 * k)  # same values and strides
    x_ref = _make(layout, batch, dtype, device, seed=batch + 3 * k)
    before = x.clone()
    got = extension.scatter_back(x_ours, idx, values, inplace)
    want = reference.scatter_back(x_ref, idx, values, inplace)
    assert torch.equal(got, want)
    if inplace:
        assert got is x_ours
        assert torch.equal(x_ours, x_ref)
        assert x_ours.stride() == x.stride()
    else:
        assert got.is_contiguous()
        assert torch.equal(x_ours, before)  # x unchanged


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_scatter_back_rounds_like_torch_add(device, dtype):
    """Sums that need rounding (large + small) round once, like torch's fp16/bf16 a + b."""
    x = (torch.randn(2, 4, 4, 8) * 1000).to(device=device, dtype=dtype)
    values = (torch.randn(2, 16, 8) * 0.37).to(device=device, dtype=dtype)
    idx = _indices(2, 16, 16, device, seed=1)
    assert torch.equal(extension.scatter_back(x, idx, values, False),
                       reference.scatter_back(x, idx, values, False))


@pytest.mark.parametrize("bad", [-1, 35, 10**12])
def test_out_of_range_index_raises_on_cpu(bad):
    x = torch.randn(2, 5, 7, 6)
    idx = _indices(2, 35, 4, "cpu", seed=0)
    idx[1, 2] = bad
    values = torch.randn(2, 4, 6)
    before = x.clone()
    with pytest.raises(RuntimeError, match="outside"):
        extension.gather_rows(x, idx)
    with pytest.raises(RuntimeError, match="outside"):
        extension.scatter_rows(values, idx, (2, 5, 7, 6))
    with pytest.raises(RuntimeError, match="outside"):
        extension.scatter_back(x, idx, values, True)
    assert torch.equal(x, before)  # checked before anything is written


@pytest.mark.skipif(extension.unavailable_reason("cuda") is not None,
                    reason=f"cuda: {extension.unavailable_reason('cuda')}")
@pytest.mark.parametrize("layout", ["4d", "nchw"])
def test_out_of_range_index_is_masked_on_cuda_and_the_context_survives(layout):
    # A device assert would kill the CUDA context: every later CUDA call in the process fails.
    x = _make(layout, 2, torch.float32, "cuda", seed=0)
    idx = _indices(2, 35, 4, "cuda", seed=0)
    values = _values(2, 4, 6, torch.float32, "cuda", seed=0)
    for bad in (-1, 35, 10**12):
        bad_idx = idx.clone()
        bad_idx[1, 2] = bad
        good = torch.ones_like(bad_idx, dtype=torch.bool)
        good[1, 2] = False
        rows = extension.gather_rows(x, bad_idx)
        want = reference.gather_rows(x, idx)
        assert torch.equal(rows[good], want[good])
        assert torch.equal(rows[1, 2], torch.zeros_like(rows[1, 2]))  # masked row reads as zeros
        before = x.clone()
        got = extension.scatter_back(x.clone(), bad_idx, values, True)
        ref = reference.scatter_back(x.clone(), idx[:, [0, 1, 3]], values[:, [0, 1, 3]], True)
        ref[0] = reference.scatter_back(before[:1], idx[:1], values[:1])[0]
        assert torch.equal(got, ref)
        torch.cuda.synchronize()
    # The context is alive: a later op on the same device still runs and is right.
    assert torch.equal(extension.gather_rows(x, idx), reference.gather_rows(x, idx))


def test_direct_op_misuse_raises():
    ops = torch.ops.papr_kernels
    x = torch.randn(2, 5, 7, 6)
    idx = _indices(2, 35, 4, "cpu", seed=0)
    values = torch.randn(2, 4, 6)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.gather_rows(x[0], idx)
    with pytest.raises(RuntimeError, match="int64"):
        ops.gather_rows(x, idx.int())
    with pytest.raises(RuntimeError, match="batch"):
        ops.gather_rows(x, idx[:1])
    with pytest.raises(RuntimeError, match="float16, bfloat16"):
        ops.gather_rows(x.int(), idx)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.put_rows_(x, idx, values.double(), False)
    with pytest.raises(RuntimeError, match=r"\(B, k, C\)"):
        ops.put_rows_(x, idx, values[:, :3], False)
    with pytest.raises(RuntimeError):  # an expanded out would be written by several rows at once
        ops.put_rows_(torch.zeros(2, 1, 1, 6).expand(2, 5, 7, 6), idx, values, False)


def test_compile_fullgraph_matches_eager():
    def block(x, idx):
        rows = extension.gather_rows(x, idx)
        return extension.scatter_back(x, idx, rows * 2.0 + 1.0, False)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 8, 6, 5).permute(0, 2, 3, 1)
    idx = _indices(2, 30, 19, "cpu", seed=4)
    assert torch.equal(compiled(x, idx), block(x, idx))
    x3 = torch.randn(3, 30, 8)
    idx3 = _indices(3, 30, 7, "cpu", seed=5)
    assert torch.equal(compiled(x3, idx3), block(x3, idx3))


def test_fake_kernels_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 7, 6)
        idx = torch.empty(2, 4, dtype=torch.int64)
        rows = torch.ops.papr_kernels.gather_rows(x, idx)
        assert rows.shape == (2, 4, 6) and rows.dtype == x.dtype
        assert torch.ops.papr_kernels.put_rows_(x, idx, rows, True) is None
