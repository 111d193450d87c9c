"""The hierarchical row ops of the triton backend (papr_kernels/ops/triton/rows.py) against
the plain-PyTorch row ops of `papr_kernels.reference`, bit for bit (torch.equal).

"cpu" runs the kernels under TRITON_INTERPRET=1 (conftest sets it when there is no CUDA), so the
shapes stay small; "cuda" runs them compiled.
"""
import pytest
import torch

from papr_kernels import reference
from papr_kernels.ops import triton as backend
from papr_kernels.ops.triton import common
from papr_kernels.ops.triton import rows as tr


def _device_param(device):
    if device == "cuda" and not torch.cuda.is_available():
        reason = "torch.cuda is not available"
    else:
        reason = backend.unavailable_reason(device)
    marks = [pytest.mark.skip(reason=f"triton on {device}: {reason}")] if reason else []
    return pytest.param(device, marks=marks, id=device)


DEVICES = [_device_param("cpu"), _device_param("cuda")]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["3d", "4d", "nchw", "sliced4d", "sliced3d"]


def _x(layout, batch, h, w, c, dtype, device, gen):
    """x (B, N, C) or (B, H, W, C) with the strides of `layout`."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)
    if layout == "3d":
        return randn(batch, h * w, c)
    if layout == "4d":
        return randn(batch, h, w, c)
    if layout == "nchw":            # an NCHW tensor seen channels-last
        return randn(batch, c, h, w).permute(0, 2, 3, 1)
    if layout == "sliced4d":        # every second column, a channel window
        return randn(batch, h + 1, 2 * w, c + 3)[:, 1:, ::2, 2:2 + c]
    if layout == "sliced3d":
        return randn(batch, 2 * h * w, c + 5)[:, ::2, 3:3 + c]
    raise ValueError(layout)


def _indices(batch, n, k, device, gen):
    """Unique random positions per row (randperm), int64 (B, k)."""
    rows = [torch.randperm(n, generator=gen)[:k] for _ in range(batch)]
    return (torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)).to(device)


def _values(batch, k, c, dtype, device, gen, transposed=False):
    v = torch.randn(batch, c, k, generator=gen) if transposed else torch.randn(batch, k, c,
                                                                              generator=gen)
    v = v.to(dtype).to(device)
    return v.transpose(1, 2) if transposed else v


def _check_all(x, idx, v):
    """gather_rows, scatter_rows, scatter_back (both modes) of triton vs the reference, bit-exact."""
    got = tr.gather_rows(x, idx)
    want = reference.gather_rows(x, idx)
    assert got.is_contiguous() and got.dtype == x.dtype
    assert torch.equal(got, want)

    got = tr.scatter_rows(v, idx, x.shape)
    want = reference.scatter_rows(v, idx, x.shape)
    assert got.is_contiguous() and got.shape == x.shape
    assert torch.equal(got, want)

    before = x.clone()
    got = tr.scatter_back(x, idx, v, False)
    want = reference.scatter_back(x, idx, v, False)
    assert got.is_contiguous() and (x.numel() == 0 or got.data_ptr() != x.data_ptr())
    assert torch.equal(got, want)
    assert torch.equal(x, before)          # not mutated

    (buf_ours, x_ours), (buf_ref, x_ref) = _strided_copy(x), _strided_copy(x)
    got = tr.scatter_back(x_ours, idx, v, True)
    want = reference.scatter_back(x_ref, idx, v, True)
    assert got is x_ours and want is x_ref
    assert torch.equal(x_ours, x_ref)
    assert torch.equal(buf_ours, buf_ref)  # nothing written outside the view (slice gaps)


def _strided_copy(x):
    """(buffer, view): a copy of x with x's strides and offset inside a buffer of sentinels."""
    size = x.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    buf = torch.full((max(size, 1),), 123, dtype=x.dtype, device=x.device)
    view = buf.as_strided(x.shape, x.stride(), x.storage_offset())
    view.copy_(x)
    return buf, view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", [96, 7])
def test_matches_torch_ops(device, dtype, layout, c):
    gen = torch.Generator().manual_seed(hash((layout, c, str(dtype))) % 2**31)
    batch, h, w = 2, 5, 6
    x = _x(layout, batch, h, w, c, dtype, device, gen)
    k = 13
    idx = _indices(batch, h * w, k, device, gen)
    _check_all(x, idx, _values(batch, k, c, dtype, device, gen, transposed=layout == "nchw"))


@pytest.mark.parametrize("device", DEVICES)
def test_values_and_indices_any_strides(device):
    gen = torch.Generator().manual_seed(5)
    x = _x("4d", 3, 4, 7, 10, torch.float32, device, gen)
    idx = _indices(3, 28, 9, device, gen)
    idx_strided = torch.empty(9, 3, dtype=torch.int64, device=device).t()
    idx_strided.copy_(idx)                         # (B, k) with strides (1, B)
    v = torch.randn(1, 9, 10, generator=gen).to(device).expand(3, 9, 10)   # zero batch stride
    _check_all(x, idx_strided, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gather_from_expanded_zero_strides(device, dtype):
    gen = torch.Generator().manual_seed(6)
    idx = _indices(3, 20, 8, device, gen)
    for x in (torch.randn(1, 4, 5, 6, generator=gen).to(dtype).to(device).expand(3, 4, 5, 6),
              torch.randn(3, 1, 5, 6, generator=gen).to(dtype).to(device).expand(3, 4, 5, 6),
              torch.randn(3, 4, 5, 1, generator=gen).to(dtype).to(device).expand(3, 4, 5, 6),
              torch.randn(1, 20, 6, generator=gen).to(dtype).to(device).expand(3, 20, 6)):
        assert 0 in x.stride()
        assert torch.equal(tr.gather_rows(x, idx), reference.gather_rows(x, idx))
        # reading through zero strides works for the out-of-place scatter_back too
        v = torch.randn(3, 8, 6, generator=gen).to(dtype).to(device)
        assert torch.equal(tr.scatter_back(x, idx, v, False), reference.scatter_back(x, idx, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [0, 1, 30])
def test_k_edge_cases(device, k):
    gen = torch.Generator().manual_seed(7)
    for layout in ("3d", "nchw"):
        x = _x(layout, 2, 5, 6, 5, torch.bfloat16, device, gen)
        _check_all(x, _indices(2, 30, k, device, gen), _values(2, k, 5, torch.bfloat16, device,
                                                              gen))


@pytest.fixture
def launches(monkeypatch):
    """Count the launches of the three JIT kernels by wrapping their `run`."""
    counts = {"n": 0}
    for kernel in (tr._gather_kernel, tr._scatter_dense_kernel, tr._scatter_add_inplace_kernel):
        original = kernel.run

        def counting(*args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counting)
    return counts


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_k_zero_do_not_launch(device, launches):
    gen = torch.Generator().manual_seed(8)
    for batch, k in ((0, 4), (0, 0), (2, 0)):
        x = _x("nchw", batch, 3, 4, 6, torch.float16, device, gen)
        _check_all(x, _indices(batch, 12, k, device, gen),
                   _values(batch, k, 6, torch.float16, device, gen))
    assert launches["n"] == 0
    x = _x("4d", 1, 3, 4, 6, torch.float16, device, gen)
    _check_all(x, _indices(1, 12, 2, device, gen), _values(1, 2, 6, torch.float16, device, gen))
    assert launches["n"] == 4   # one launch per op otherwise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["3d", "nchw"])
def test_tiny_blocks_and_channel_chunks(device, layout, monkeypatch):
    """Blocks smaller than k, N and C, several channel chunks per row block: every mask used."""
    monkeypatch.setattr(common, "BLOCK_OVERRIDE", dict(BLOCK_R=4, BLOCK_P=4, BLOCK_J=4, BLOCK_C=4))
    monkeypatch.setattr(common, "SPLIT_OVERRIDE", (1, 3))   # rows: one program per block, 3 chunks
    gen = torch.Generator().manual_seed(9)
    x = _x(layout, 3, 5, 3, 11, torch.float16, device, gen)
    idx = _indices(3, 15, 10, device, gen)
    _check_all(x, idx, _values(3, 10, 11, torch.float16, device, gen, transposed=True))


@pytest.mark.parametrize("device", DEVICES)
def test_signed_zero_and_special_values(device):
    """Unkept positions are copied (not `x + 0`: -0.0 stays -0.0); kept ones round like torch."""
    specials = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 65504.0, 1e-7, -3e-8, 0.1]
    added = [-0.0, 1.0, 5.0, -1e-7, -0.1]   # 0 + -0, -1 + 1, -inf + 5, 1e-7 - 1e-7, 0.1 - 0.1
    idx = torch.tensor([[0, 3, 5, 7, 9]], device=device)   # -0.0 at position 1 is not kept
    for dtype in DTYPES:
        x = torch.tensor(specials, dtype=dtype).repeat(4, 1).t().reshape(1, 10, 4).to(device)
        v = torch.tensor(added, dtype=dtype).repeat(4, 1).t().reshape(1, 5, 4).to(device)
        for got, want in ((tr.scatter_back(x, idx, v), reference.scatter_back(x, idx, v)),
                          (tr.scatter_rows(v, idx, x.shape), reference.scatter_rows(v, idx,
                                                                                    x.shape))):
            assert torch.equal(got, want)
            assert torch.equal(torch.signbit(got), torch.signbit(want))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy, interpreted: inf - inf, overflow
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_and_fp16_add_rounds_once_from_fp32(device):
    """Random bit patterns (subnormals, infinities, ties): the add rounds like torch's a + b."""
    gen = torch.Generator().manual_seed(10)
    for dtype in (torch.bfloat16, torch.float16):
        bits = torch.randint(-2**15, 2**15, (2, 1, 512, 4), generator=gen).to(torch.int16)
        x, v = bits.view(dtype)[0], bits.view(dtype)[1]
        v[:, ::2] = (-x[:, ::2].float() * 1.001).to(dtype)   # near-cancellations, subnormals
        idx = torch.arange(512)[None]
        x, v, idx = x.to(device), v.to(device), idx.to(device)
        got, want = tr.scatter_back(x, idx, v), reference.scatter_back(x, idx, v)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4, 7, 7, 768, dtype=torch.float16).permute(0, 3, 1, 2).permute(0, 2, 3, 1)
        idx = torch.empty(4, 24, dtype=torch.int64)
        rows = torch.ops.papr_kernels.triton_gather_rows(x, idx)
        assert rows.shape == (4, 24, 768) and rows.dtype == torch.float16 and rows.is_contiguous()
        out = torch.ops.papr_kernels.triton_scatter_rows(rows, idx, [4, 7, 7, 768])
        assert out.shape == (4, 7, 7, 768) and out.is_contiguous()
        out = torch.ops.papr_kernels.triton_scatter_back(x, idx, rows)
        assert out.shape == (4, 7, 7, 768) and out.is_contiguous()
        assert torch.ops.papr_kernels.triton_scatter_back_(x, idx, rows) is None


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(11)
    x = _x("nchw", 2, 3, 4, 5, torch.float32, device, gen)
    idx = _indices(2, 12, 6, device, gen)
    v = _values(2, 6, 5, torch.float32, device, gen)
    tests = ("test_schema", "test_faketensor")
    ops = torch.ops.papr_kernels
    torch.library.opcheck(ops.triton_gather_rows.default, (x, idx), test_utils=tests)
    torch.library.opcheck(ops.triton_scatter_rows.default, (v, idx, list(x.shape)),
                          test_utils=tests)
    torch.library.opcheck(ops.triton_scatter_back.default, (x, idx, v), test_utils=tests)
    torch.library.opcheck(ops.triton_scatter_back_.default, (x.clone(), idx, v), test_utils=tests)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_no_graph_break(device, backend):
    """torch.compile(fullgraph=True) traces the custom ops without a graph break: "aot_eager"
    checks tracing, the fake kernels and the functionalization of the mutating op; "inductor"
    also runs them from inductor's generated code (on CPU: its C++ codegen for the elementwise
    ops around them, the kernels under the interpreter; about 10 s)."""
    def block(x, idx, v):
        rows = tr.gather_rows(x, idx)
        out = tr.scatter_back(x, idx, rows * 2 + v, False)
        dense = tr.scatter_rows(v, idx, x.shape)
        y = out.clone()
        tr.scatter_back(y, idx, v, True)
        return out, dense, y

    gen = torch.Generator().manual_seed(12)
    x = _x("nchw", 2, 4, 5, 6, torch.float32, device, gen)
    idx = _indices(2, 20, 7, device, gen)
    v = _values(2, 7, 6, torch.float32, device, gen)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    for got, want in zip(compiled(x, idx, v), block(x, idx, v)):
        assert torch.equal(got, want)
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_contract_indices_stay_in_bounds(device):
    """Indices outside [0, N) or repeated are outside the contract: no result is promised, but
    nothing is read or written outside the tensors (the buffers' sentinels stay)."""
    buf = torch.full((2 * 6 * 4 + 8,), 123.0, device=device)
    x = buf[4:-4].view(2, 6, 4)
    idx = torch.tensor([[0, 6, -1], [2, 2, 2]], device=device)
    v = torch.ones(2, 3, 4, device=device)
    tr.gather_rows(x, idx)
    tr.scatter_rows(v, idx, x.shape)
    tr.scatter_back(x, idx, v, False)
    tr.scatter_back(x[:1], idx[:1], v[:1], True)
    assert torch.equal(buf[:4], torch.full((4,), 123.0, device=device))
    assert torch.equal(buf[-4:], torch.full((4,), 123.0, device=device))
