"""The row ops of the hierarchical models (gather_rows, scatter_rows, scatter_back) on every
backend of conftest.BACKENDS (the `backend` fixture: torch, triton, cpp, cuda on cpu / cuda),
bit for bit (torch.equal) against the plain-PyTorch ops of `papr_kernels.reference` and against
explicit loops.

- The backend's row functions (`backends.resolve(name, device, ROW_OPS)`: the RowBackend
  contract, which the public ops call with checked arguments): layouts (B, N, C), channels-last
  (B, H, W, C), NCHW seen channels-last, sliced and expanded views; fp16/bf16/fp32/fp64; in place
  (through x's strides, nothing written outside the view) or not (x unchanged); k = 0, k = N,
  B = 0; fp16/bf16 adds rounded like torch's a + b; signed zeros; fake tensors; opcheck of the
  custom ops; indices outside the contract (cpp raises, cuda masks, triton stays in bounds).
- The kept-row map (`hierarchical.kept_row_map`) against a loop, and the dense ops given it
  (`row_of=`): checked, followed by the Triton kernels, equal to the reference.
- The public ops of `papr_kernels.hierarchical` with `backend=name`: results, in place,
  gradients, gradcheck, torch.compile(fullgraph=True).
- Triton only: tiny blocks and split overrides (every mask used), no launch for empty work.

"cpu" runs the triton kernels under TRITON_INTERPRET=1 (conftest sets it without CUDA), op by op
in Python: the shapes stay small.
"""
import pytest
import torch

from conftest import backend_params
from papr_kernels import backends, reference
from papr_kernels import hierarchical as hier

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["3d", "4d", "nchw", "sliced4d", "sliced3d"]
H, W = 5, 7                                   # N = 35 positions


def _impl(backend):
    name, device = backend
    return backends.resolve(name, device, backends.ROW_OPS)


def _dtype_id(dtype):
    return str(dtype).split(".")[-1]


def _x(layout, batch, c, dtype, device, gen, h=H, w=W):
    """x (B, N, C) or (B, H, W, C) with the strides of `layout`."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)
    if layout == "3d":
        return rnd(batch, h * w, c)
    if layout == "4d":
        return rnd(batch, h, w, c)
    if layout == "nchw":            # an NCHW tensor seen channels-last
        return rnd(batch, c, h, w).permute(0, 2, 3, 1)
    if layout == "sliced4d":        # rows 1.., every other column, odd channels of a larger x
        return rnd(batch, h + 1, 2 * w, 2 * c + 1)[:, 1:, ::2, 1::2]
    if layout == "sliced3d":        # every other position, a channel window
        return rnd(batch, 2 * h * w, c + 5)[:, ::2, 3:3 + c]
    raise ValueError(layout)


def _positions(x):
    return x.shape[1] if x.dim() == 3 else x.shape[1] * x.shape[2]


def _indices(batch, n, k, device, gen):
    """Unique random positions per row (randperm), int64 (B, k)."""
    rows = [torch.randperm(n, generator=gen)[:k] for _ in range(batch)]
    return (torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)).to(device)


def _values(batch, k, c, dtype, device, gen, transposed=False):
    """(B, k, C); `transposed`: with a non-unit channel stride."""
    if transposed:
        return torch.randn(batch, c, k, generator=gen).to(dtype).to(device).transpose(1, 2)
    return torch.randn(batch, k, c, generator=gen).to(dtype).to(device)


def _strided_copy(x):
    """(buffer, view): a copy of x with x's strides and offset inside a buffer of sentinels."""
    size = x.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    buf = torch.full((max(size, 1),), 123, dtype=x.dtype, device=x.device)
    view = buf.as_strided(x.shape, x.stride(), x.storage_offset())
    view.copy_(x)
    return buf, view


def _same(got, want, device):
    """got (on `device`) equals want (the reference, on the CPU) bit for bit."""
    assert got.device.type == device and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want), (got.cpu().double() - want.double()).abs().max()


def _check_all(impl, x, idx, v):
    """gather_rows, scatter_rows, scatter_back (copy and in place) of `impl` against the
    reference (on CPU copies), bit for bit."""
    device = x.device.type
    xr, ir, vr = x.cpu(), idx.cpu(), v.cpu()

    got = impl.gather_rows(x, idx)
    assert got.is_contiguous()
    _same(got, reference.gather_rows(xr, ir), device)

    got = impl.scatter_rows(v, idx, tuple(x.shape))
    assert got.is_contiguous()
    _same(got, reference.scatter_rows(vr, ir, tuple(x.shape)), device)

    before = x.clone()
    got = impl.scatter_back(x, idx, v, False)
    assert got.is_contiguous() and (x.numel() == 0 or got.data_ptr() != x.data_ptr())
    _same(got, reference.scatter_back(xr, ir, vr, False), device)
    assert torch.equal(x, before)                    # x unchanged

    (buf, view), (buf_ref, view_ref) = _strided_copy(x), _strided_copy(xr)
    got = impl.scatter_back(view, idx, v, True)
    want = reference.scatter_back(view_ref, ir, vr, True)
    assert got is view and view.stride() == x.stride()
    _same(view, want, device)
    assert torch.equal(buf.cpu(), buf_ref)           # nothing written outside the view


# ---------------------------------------------------------------------------------------------
# The backend's row functions against the reference

# (batch, k, channels, values with a non-unit channel stride)
CASES = [(3, 11, 7, False), (2, H * W, 6, True), (1, 1, 6, False), (2, 0, 6, True),
         (0, 4, 6, False), (2, 13, 96, True)]


@pytest.mark.parametrize("batch,k,c,transposed", CASES,
                         ids=lambda v: None if isinstance(v, int) else ("vt" if v else "v"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_ops_match_reference(backend, layout, dtype, batch, k, c, transposed):
    """k = N (every position), k = 0 and B = 0 included; C = 96 takes several channel blocks."""
    _, device = backend
    gen = torch.Generator().manual_seed(1000 * batch + 10 * k + c)
    x = _x(layout, batch, c, dtype, device, gen)
    idx = _indices(batch, _positions(x), k, device, gen)
    _check_all(_impl(backend), x, idx, _values(batch, k, c, dtype, device, gen, transposed))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_gather_and_scatter_back_read_through_zero_strides(backend, dtype):
    """Expanded x (stride 0 in batch and row, in row, in channel; (B, N, C) in batch):
    gather_rows and the out-of-place scatter_back read it (in place is not defined on it)."""
    _, device = backend
    impl = _impl(backend)
    gen = torch.Generator().manual_seed(6)
    idx = _indices(3, H * W, 12, device, gen)
    v = torch.randn(3, 12, 6, generator=gen).to(dtype).to(device)
    for shape in ((1, 1, W, 6), (3, 1, W, 6), (3, H, W, 1), (1, H * W, 6)):
        full = (3, H, W, 6) if len(shape) == 4 else (3, H * W, 6)
        x = torch.randn(*shape, generator=gen).to(dtype).to(device).expand(full)
        assert 0 in x.stride()
        _same(impl.gather_rows(x, idx), reference.gather_rows(x.cpu(), idx.cpu()), device)
        _same(impl.scatter_back(x, idx, v, False),
              reference.scatter_back(x.cpu(), idx.cpu(), v.cpu(), False), device)


def test_values_and_indices_of_any_strides(backend):
    _, device = backend
    gen = torch.Generator().manual_seed(5)
    x = _x("4d", 3, 10, torch.float32, device, gen, h=4, w=7)
    idx = _indices(3, 28, 9, device, gen)
    idx_strided = torch.empty(9, 3, dtype=torch.int64, device=device).t()
    idx_strided.copy_(idx)                          # (B, k) with strides (1, B)
    v = torch.randn(1, 9, 10, generator=gen).to(device).expand(3, 9, 10)   # zero batch stride
    _check_all(_impl(backend), x, idx_strided, v)


def test_unkept_positions_are_copied_and_signed_zeros_kept(backend):
    """Unkept positions are copied (not `x + 0`: -0.0 stays -0.0); kept ones round like torch."""
    _, device = backend
    impl = _impl(backend)
    specials = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 65504.0, 1e-7, -3e-8, 0.1]
    added = [-0.0, 1.0, 5.0, -1e-7, -0.1]    # 0 + -0, -1 + 1, -inf + 5, 1e-7 - 1e-7, 0.1 - 0.1
    idx = torch.tensor([[0, 3, 5, 7, 9]])    # -0.0 at position 1 is not kept
    for dtype in DTYPES:
        x = torch.tensor(specials, dtype=dtype).repeat(4, 1).t().reshape(1, 10, 4)
        v = torch.tensor(added, dtype=dtype).repeat(4, 1).t().reshape(1, 5, 4)
        xd, vd, idxd = x.to(device), v.to(device), idx.to(device)
        for got, want in ((impl.scatter_back(xd, idxd, vd, False),
                           reference.scatter_back(x, idx, v, False)),
                          (impl.scatter_rows(vd, idxd, x.shape),
                           reference.scatter_rows(v, idx, x.shape))):
            _same(got, want, device)
            assert torch.equal(torch.signbit(got.cpu()), torch.signbit(want))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy, interpreted: inf - inf, overflow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_fp16_and_bf16_adds_round_like_torch(backend, dtype):
    """scatter_back's a + b rounds once, like torch's fp16/bf16 a + b: sums that need rounding
    (large + small) and random bit patterns (subnormals, infinities, ties, near-cancellations)."""
    _, device = backend
    impl = _impl(backend)
    gen = torch.Generator().manual_seed(10)
    x = (torch.randn(2, 4, 4, 8, generator=gen) * 1000).to(dtype)
    v = (torch.randn(2, 16, 8, generator=gen) * 0.37).to(dtype)
    idx = _indices(2, 16, 16, "cpu", gen)
    _same(impl.scatter_back(x.to(device), idx.to(device), v.to(device), False),
          reference.scatter_back(x, idx, v, False), device)

    # Rows of 40 channels: the CPU kernel's vectorized body (16 or 32 lanes) and its tail.
    bits = torch.randint(-2**15, 2**15, (2, 1, 64, 40), generator=gen).to(torch.int16)
    x, v = bits.view(dtype)[0], bits.view(dtype)[1]
    v[:, ::2] = (-x[:, ::2].float() * 1.001).to(dtype)   # near-cancellations, subnormals
    idx = torch.arange(64)[None]
    got = impl.scatter_back(x.to(device), idx.to(device), v.to(device), False).cpu()
    want = reference.scatter_back(x, idx, v, False)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_row_ops_run_on_fake_tensors(backend):
    """What torch.compile traces: shapes, dtypes and contiguity from fake tensors (custom ops'
    fake kernels)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    _, device = backend
    impl = _impl(backend)
    with FakeTensorMode():
        for x in (torch.empty(4, 7, 7, 768, dtype=torch.float16, device=device),
                  torch.empty(4, 768, 7, 7, dtype=torch.float16, device=device).permute(0, 2, 3, 1),
                  torch.empty(4, 49, 768, dtype=torch.float16, device=device)):
            idx = torch.empty(4, 24, dtype=torch.int64, device=device)
            rows = impl.gather_rows(x, idx)
            assert rows.shape == (4, 24, 768) and rows.dtype == x.dtype and rows.is_contiguous()
            out = impl.scatter_rows(rows, idx, tuple(x.shape))
            assert out.shape == x.shape and out.is_contiguous()
            out = impl.scatter_back(x, idx, rows, False)
            assert out.shape == x.shape and out.is_contiguous()
            assert impl.scatter_back(x, idx, rows, True) is x


def _custom_ops(name):
    """(op, args builder) of the custom ops behind backend `name`'s row functions."""
    ops = torch.ops.papr_kernels

    def row_of(x, i):
        return reference.kept_row_map(i, _positions(x))
    if name == "triton":
        return [(ops.triton_kept_row_map.default, lambda x, i, v: (i, _positions(x))),
                (ops.triton_gather_rows.default, lambda x, i, v: (x, i)),
                (ops.triton_scatter_rows.default, lambda x, i, v: (v, row_of(x, i),
                                                                   list(x.shape))),
                (ops.triton_scatter_back.default, lambda x, i, v: (x, row_of(x, i), v)),
                (ops.triton_scatter_back_.default, lambda x, i, v: (x.clone(), i, v))]
    cpp = [(ops.masked_residual.default, lambda x, i, v: (x, row_of(x, i), v, v[0, 0])),
           (ops.masked_residual.default, lambda x, i, v: (x, row_of(x, i), v, None))
           ] if name == "cpp" else []
    return [(ops.gather_rows.default, lambda x, i, v: (x, i)),          # cpp, cuda: 4-D x
            (ops.put_rows_.default, lambda x, i, v: (torch.zeros_like(x), i, v, False)),
            (ops.put_rows_.default, lambda x, i, v: (x.clone(), i, v, True))] + cpp


@pytest.mark.parametrize("backend", backend_params("triton", "cpp", "cuda"), indirect=True)
def test_opcheck(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(11)
    x = _x("nchw", 2, 5, torch.float32, device, gen, h=3, w=4)
    idx = _indices(2, 12, 6, device, gen)
    v = _values(2, 6, 5, torch.float32, device, gen)
    for op, args in _custom_ops(name):
        torch.library.opcheck(op, args(x, idx, v), test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Indices outside the contract (the public ops check them; the backends are called unchecked)


@pytest.mark.parametrize("backend", backend_params("cpp"), indirect=True)
@pytest.mark.parametrize("bad", [-1, 35, 10**12])
def test_out_of_range_index_raises_before_writing(backend, bad):
    impl = _impl(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 6)
    idx = _indices(2, 35, 4, "cpu", gen)
    idx[1, 2] = bad
    values = torch.randn(2, 4, 6)
    before = x.clone()
    with pytest.raises(RuntimeError, match="outside"):
        impl.gather_rows(x, idx)
    with pytest.raises(RuntimeError, match="outside"):
        impl.scatter_rows(values, idx, (2, 5, 7, 6))
    with pytest.raises(RuntimeError, match="outside"):
        impl.scatter_back(x, idx, values, True)
    assert torch.equal(x, before)  # checked before anything is written


@pytest.mark.parametrize("backend", backend_params("cuda"), indirect=True)
@pytest.mark.parametrize("layout", ["4d", "nchw"])
def test_out_of_range_index_is_masked_and_the_cuda_context_survives(backend, layout):
    # A device assert would kill the CUDA context: every later CUDA call in the process fails.
    impl = _impl(backend)
    gen = torch.Generator().manual_seed(0)
    x = _x(layout, 2, 6, torch.float32, "cuda", gen)
    idx = _indices(2, 35, 4, "cuda", gen)
    values = _values(2, 4, 6, torch.float32, "cuda", gen)
    for bad in (-1, 35, 10**12):
        bad_idx = idx.clone()
        bad_idx[1, 2] = bad
        good = torch.ones_like(bad_idx, dtype=torch.bool)
        good[1, 2] = False
        rows = impl.gather_rows(x, bad_idx)
        want = reference.gather_rows(x, idx)
        assert torch.equal(rows[good], want[good])
        assert torch.equal(rows[1, 2], torch.zeros_like(rows[1, 2]))  # masked row reads as zeros
        before = x.clone()
        got = impl.scatter_back(x.clone(), bad_idx, values, True)
        ref = reference.scatter_back(x.clone(), idx[:, [0, 1, 3]], values[:, [0, 1, 3]], True)
        ref[0] = reference.scatter_back(before[:1], idx[:1], values[:1])[0]
        assert torch.equal(got, ref)
        torch.cuda.synchronize()
    # The context is alive: a later op on the same device still runs and is right.
    assert torch.equal(impl.gather_rows(x, idx), reference.gather_rows(x, idx))


@pytest.mark.parametrize("backend", backend_params("triton"), indirect=True)
def test_out_of_contract_indices_stay_in_bounds(backend):
    """Indices outside [0, N) or repeated: no result is promised, but nothing is read or written
    outside the tensors (the buffers' sentinels stay)."""
    _, device = backend
    impl = _impl(backend)
    buf = torch.full((2 * 6 * 4 + 8,), 123.0, device=device)
    x = buf[4:-4].view(2, 6, 4)
    idx = torch.tensor([[0, 6, -1], [2, 2, 2]], device=device)
    v = torch.ones(2, 3, 4, device=device)
    impl.gather_rows(x, idx)
    impl.scatter_rows(v, idx, x.shape)
    impl.scatter_back(x, idx, v, False)
    impl.scatter_back(x[:1], idx[:1], v[:1], True)
    assert torch.equal(buf[:4], torch.full((4,), 123.0, device=device))
    assert torch.equal(buf[-4:], torch.full((4,), 123.0, device=device))


# ---------------------------------------------------------------------------------------------
# The kept-row map


def _map_by_loop(idx, n):
    """row_of[b, p] = j for indices[b, j] == p in [0, n), else -1."""
    row_of = torch.full((idx.shape[0], n), -1, dtype=torch.int32)
    for b, row in enumerate(idx.tolist()):
        for j, p in enumerate(row):
            if 0 <= p < n:
                row_of[b, p] = j
    return row_of


def _grid(x):
    return tuple(x.shape[1:3]) if x.dim() == 4 else (1, x.shape[1])


def _map_builder(backend):
    """The backend's map kernel (unchecked), or the reference's for those without one."""
    return getattr(_impl(backend), "kept_row_map", reference.kept_row_map)


@pytest.mark.parametrize("batch,k", [(3, 11), (2, H * W), (1, 1), (2, 0), (0, 4), (0, 0)])
@pytest.mark.parametrize("ascending", [False, True], ids=["any-order", "ascending"])
def test_kept_row_map_inverts_the_indices(backend, batch, k, ascending):
    """The same map on every backend: the loop's."""
    name, device = backend
    gen = torch.Generator().manual_seed(100 * batch + k)
    idx = _indices(batch, H * W, k, "cpu", gen)
    if ascending:
        idx = idx.sort(dim=1).values
    want = _map_by_loop(idx, H * W)
    got = hier.kept_row_map(idx.to(device), (H, W), backend=name)
    assert got.dtype == torch.int32 and got.shape == (batch, H * W) and got.is_contiguous()
    assert got.device.type == device and torch.equal(got.cpu(), want)
    strided = torch.empty(k, batch, dtype=torch.int64, device=device).t()
    strided.copy_(idx)                                 # (B, k) with strides (1, B)
    assert torch.equal(hier.kept_row_map(strided, (H, W), backend=name).cpu(), want)


def test_kept_row_map_checks_its_arguments_and_skips_out_of_range_indices(backend):
    """CPU indices are range-checked as by the row ops; unchecked (CUDA, compiled) an index
    outside [0, N) is skipped, nothing written out of bounds (no device assert)."""
    name, device = backend
    idx = torch.tensor([[0, 6, -1, 3], [2, 10**12, 5, -10**12]], device=device)
    assert torch.equal(_map_builder(backend)(idx, 6).cpu(), _map_by_loop(idx.cpu(), 6))
    if device == "cpu":
        with pytest.raises(ValueError, match=r"indices must lie in \[0, N\)"):
            hier.kept_row_map(idx, (2, 3), backend=name)
    with pytest.raises(TypeError, match="int64"):
        hier.kept_row_map(idx.int(), (2, 3), backend=name)
    with pytest.raises(ValueError, match="at most N = 3"):
        hier.kept_row_map(idx, (1, 3), backend=name)
    with pytest.raises(ValueError, match="grid must be positive"):
        hier.kept_row_map(idx[:, :0], (0, 3), backend=name)


def test_a_given_row_map_is_checked(backend):
    name, device = backend
    x, v = torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 4, 5, device=device)
    idx = _unique_indices(2, 12, 4).to(device)
    row_of = hier.kept_row_map(idx, (3, 4), backend=name)
    with pytest.raises(TypeError, match="row_of must be int32"):
        hier.scatter_rows(v, idx, like=x, row_of=row_of.long(), backend=name)
    with pytest.raises(ValueError, match=r"row_of must be \(B, N\) = \(2, 12\)"):
        hier.scatter_back(x, idx, v, row_of=row_of[:, :-1], backend=name)
    with pytest.raises(ValueError, match="row_of must be"):
        hier.masked_residual(x, idx, v, row_of=row_of[:1], backend=name)
    with pytest.raises(TypeError, match="row_of must be a torch.Tensor"):
        hier.scatter_rows(v, idx, like=x, row_of=[0] * 12, backend=name)


@pytest.mark.parametrize("backend", backend_params("triton", "cpp"), indirect=True)
def test_dense_kernels_follow_the_given_map_and_mask_entries_past_k(backend):
    """The kernels read the caller's map (not one rebuilt from the indices); an entry outside
    [0, k) reads as a pruned position (no value row past k is read). Each op the backend lists
    in ROW_MAP_OPS (cpp: masked_residual only; its scatters take no map)."""
    _, device = backend
    impl = _impl(backend)
    gen = torch.Generator().manual_seed(13)
    x = _x("nchw", 2, 6, torch.float32, device, gen, h=3, w=4)
    idx, other = (_indices(2, 12, 5, device, gen) for _ in range(2))
    v = _values(2, 5, 6, torch.float32, device, gen)
    row_of = reference.kept_row_map(other, 12)
    xr, vr, otr = x.cpu(), v.cpu(), other.cpu()
    scatters = "scatter_rows" in impl.ROW_MAP_OPS and "scatter_back" in impl.ROW_MAP_OPS
    if scatters:
        _same(impl.scatter_rows(v, idx, x.shape, row_of=row_of),
              reference.scatter_rows(vr, otr, x.shape), device)
        _same(impl.scatter_back(x, idx, v, False, row_of=row_of),
              reference.scatter_back(xr, otr, vr), device)
    _same(impl.masked_residual(x, idx, v, None, row_of=row_of),
          reference.masked_residual(xr, otr, vr, None), device)
    for bad in (-7, 5, 2**31 - 1):
        row_of = torch.full((2, 12), bad, dtype=torch.int32, device=device)
        if scatters:
            _same(impl.scatter_rows(v, idx, x.shape, row_of=row_of), torch.zeros(xr.shape),
                  device)
            _same(impl.scatter_back(x, idx, v, False, row_of=row_of), xr.contiguous(), device)
        _same(impl.masked_residual(x, idx, v, None, row_of=row_of), torch.zeros(xr.shape),
              device)


# ---------------------------------------------------------------------------------------------
# Triton only: block and split overrides, launches


@pytest.mark.parametrize("backend", backend_params("triton"), indirect=True)
@pytest.mark.parametrize("layout", ["3d", "nchw"])
def test_triton_tiny_blocks_and_channel_chunks(backend, layout, monkeypatch):
    """Blocks smaller than k, N and C, several channel chunks per row block: every mask used."""
    from papr_kernels.ops.triton import common
    _, device = backend
    monkeypatch.setattr(common, "BLOCK_OVERRIDE", dict(BLOCK_R=4, BLOCK_P=4, BLOCK_C=4, BLOCK_M=4))
    monkeypatch.setattr(common, "SPLIT_OVERRIDE", (1, 3))   # rows: one program per block, 3 chunks
    gen = torch.Generator().manual_seed(9)
    x = _x(layout, 3, 11, torch.float16, device, gen, h=5, w=3)
    idx = _indices(3, 15, 10, device, gen)
    _check_all(_impl(backend), x, idx, _values(3, 10, 11, torch.float16, device, gen, True))


@pytest.mark.parametrize("backend", backend_params("triton"), indirect=True)
def test_triton_empty_batch_and_k_zero_do_not_launch(backend, monkeypatch):
    from papr_kernels.ops.triton import rows as tr
    _, device = backend
    launches = {"n": 0}
    for kernel in (tr._gather_kernel, tr._kept_row_map_kernel, tr._scatter_dense_kernel,
                   tr._scatter_add_inplace_kernel):
        def counting(*args, _original=kernel.run, **kwargs):
            launches["n"] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", counting)
    gen = torch.Generator().manual_seed(8)
    for batch, k in ((0, 4), (0, 0), (2, 0)):
        x = _x("nchw", batch, 6, torch.float16, device, gen, h=3, w=4)
        _check_all(_impl(backend), x, _indices(batch, 12, k, device, gen),
                   _values(batch, k, 6, torch.float16, device, gen))
    assert launches["n"] == 0
    x = _x("4d", 1, 6, torch.float16, device, gen, h=3, w=4)
    _check_all(_impl(backend), x, _indices(1, 12, 2, device, gen),
               _values(1, 2, 6, torch.float16, device, gen))
    assert launches["n"] == 6   # one per op, and a map for each dense op given none


# ---------------------------------------------------------------------------------------------
# The public ops (papr_kernels.hierarchical) with backend=name


def _position(x, i):
    """Row i of one batch element x[b] ((N, C) or (H, W, C))."""
    return x[i] if x.dim() == 2 else x[i // x.shape[1], i % x.shape[1]]


def _sliced(t):
    """A (2, 3, 4, 5) view whose rows are not contiguous (every other channel of a wider x)."""
    return t.reshape(2, 3, 4, 5).repeat_interleave(2, dim=3)[..., ::2]


PUBLIC_LAYOUTS = {
    "BNC": lambda t: t.reshape(2, 12, 5),
    "BHWC": lambda t: t.reshape(2, 3, 4, 5),
    "NCHW-permuted": lambda t: t.reshape(2, 5, 3, 4).permute(0, 2, 3, 1),
    "sliced": _sliced,
}


def _unique_indices(batch, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(batch)])


@pytest.mark.parametrize("layout", list(PUBLIC_LAYOUTS)[:3])
def test_public_ops_match_loops(backend, layout):
    name, device = backend
    x = PUBLIC_LAYOUTS[layout](torch.randn(120)).to(device)
    idx = _unique_indices(2, 12, 7).to(device)
    values = torch.randn(2, 7, 5).to(device)

    rows = hier.gather_rows(x, idx, backend=name).cpu()
    back = hier.scatter_back(x, idx, values, backend=name).cpu()
    placed = hier.scatter_rows(values, idx, like=x, backend=name).cpu()
    x, idx, values = x.cpu(), idx.cpu(), values.cpu()
    assert rows.shape == (2, 7, 5) and back.shape == x.shape == placed.shape
    for b in range(2):
        kept = set(idx[b].tolist())
        for j, i in enumerate(idx[b].tolist()):
            assert torch.equal(rows[b, j], _position(x[b], i))
            assert torch.equal(_position(back[b], i), _position(x[b], i) + values[b, j])
            assert torch.equal(_position(placed[b], i), values[b, j])
        for i in set(range(12)) - kept:
            assert torch.equal(_position(back[b], i), _position(x[b], i))
            assert torch.equal(_position(placed[b], i), torch.zeros(5))


@pytest.mark.parametrize("layout", list(PUBLIC_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_public_ops_match_reference(backend, layout, dtype):
    name, device = backend
    gen = torch.Generator().manual_seed(11)
    x = PUBLIC_LAYOUTS[layout](torch.randn(120, generator=gen)).to(device=device, dtype=dtype)
    values = torch.randn(2, 7, 5, generator=gen).to(device=device, dtype=dtype)
    idx = _unique_indices(2, 12, 7, seed=2).to(device)
    ref_x, ref_idx, ref_values = x.cpu(), idx.cpu(), values.cpu()

    row_of = hier.kept_row_map(idx, _grid(x), backend=name)

    _same(hier.gather_rows(x, idx, backend=name), reference.gather_rows(ref_x, ref_idx), device)
    expected_rows = reference.scatter_rows(ref_values, ref_idx, ref_x.shape)
    _same(hier.scatter_rows(values, idx, like=x, backend=name), expected_rows, device)
    _same(hier.scatter_rows(values, idx, like=x, row_of=row_of, backend=name), expected_rows,
          device)
    expected_back = reference.scatter_back(ref_x, ref_idx, ref_values)
    _same(hier.scatter_back(x, idx, values, backend=name), expected_back, device)
    _same(hier.scatter_back(x, idx, values, row_of=row_of, backend=name), expected_back, device)
    assert torch.equal(x.cpu(), ref_x)                                  # not written
    target = x.clone() if layout != "NCHW-permuted" else (
        x.permute(0, 3, 1, 2).clone().permute(0, 2, 3, 1))              # keep the strides
    strides = target.stride()
    out = hier.scatter_back(target, idx, values, inplace=True, backend=name)
    assert out.data_ptr() == target.data_ptr() and out.stride() == strides
    _same(target, expected_back, device)


@pytest.mark.parametrize("k", [0, 12])
def test_public_ops_handle_no_and_all_positions(backend, k):
    name, device = backend
    x = torch.randn(2, 3, 4, 5, device=device)
    idx = _unique_indices(2, 12, k).to(device)
    values = torch.randn(2, k, 5, device=device)
    _same(hier.gather_rows(x, idx, backend=name), reference.gather_rows(x.cpu(), idx.cpu()),
          device)
    _same(hier.scatter_back(x, idx, values, backend=name),
          reference.scatter_back(x.cpu(), idx.cpu(), values.cpu()), device)
    empty = torch.empty(0, 3, 4, 5, device=device)
    assert hier.gather_rows(empty, idx[:0], backend=name).shape == (0, k, 5)
    assert hier.scatter_rows(values[:0], idx[:0], like=empty, backend=name).shape == empty.shape


def test_public_scatter_back_inplace_writes_into_x(backend):
    name, device = backend
    x = torch.randn(2, 3, 4, 5, device=device)
    idx, values = _unique_indices(2, 12, 4).to(device), torch.randn(2, 4, 5, device=device)
    expected = hier.scatter_back(x, idx, values, backend=name)
    out = hier.scatter_back(x, idx, values, inplace=True, backend=name)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, expected)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        hier.scatter_back(x, idx, values, inplace="yes", backend=name)
    with pytest.raises(ValueError, match="inplace"):
        hier.scatter_back(x.requires_grad_(), idx, values, inplace=True, backend=name)


def test_public_scatter_back_inplace_is_an_inplace_op_to_autograd_and_torch(backend):
    """As after torch's own in-place ops: a backward that needs x's old values raises; an
    expanded x or an inference tensor outside inference mode is refused, nothing written."""
    name, device = backend
    idx, values = torch.tensor([[1], [2]], device=device), torch.ones(2, 1, 2, device=device)
    w = torch.ones(2, 4, 2, device=device, requires_grad=True)
    x = torch.zeros(2, 4, 2, device=device)
    loss = (w * x).sum()                                   # saves x for its backward
    hier.scatter_back(x, idx, values, inplace=True, backend=name)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    base = torch.zeros(1, 4, 2, device=device)
    with pytest.raises(ValueError, match="share memory"):
        hier.scatter_back(base.expand(2, -1, -1), idx, values, inplace=True, backend=name)
    assert not base.any()
    with torch.inference_mode():
        frozen = torch.zeros(2, 4, 2, device=device)
    with pytest.raises(ValueError, match="inference tensor"):
        hier.scatter_back(frozen, idx, values, inplace=True, backend=name)
    with torch.inference_mode():
        out = hier.scatter_back(frozen, idx, values, inplace=True, backend=name)
    assert out.data_ptr() == frozen.data_ptr() and frozen.sum() == 4
    x = torch.arange(16.0, device=device).view(2, 4, 2)
    with pytest.raises(ValueError, match="values is a view of x"):   # a race on a GPU
        hier.scatter_back(x, idx, x[:, 1:2], inplace=True, backend=name)
    assert torch.equal(x, torch.arange(16.0, device=device).view(2, 4, 2))
    other = x.clone()
    hier.scatter_back(x, idx, other[:, 1:2], inplace=True, backend=name)   # a copy: fine
    assert torch.equal(x[:, 0], other[:, 0]) and torch.equal(x[0, 1], 2 * other[0, 1])


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64,
                                   torch.float8_e4m3fn], ids=_dtype_id)
def test_public_ops_refuse_a_non_floating_x_on_every_backend(backend, dtype):
    """SPEC: TypeError naming the tensor before any kernel (torch computed them, cpp raised a
    RuntimeError from C++)."""
    name, device = backend
    x = torch.ones(2, 6, 3, device=device).to(dtype)
    idx = torch.tensor([[0, 4], [5, 1]], device=device)
    calls = {"x": [lambda: hier.gather_rows(x, idx, backend=name),
                   lambda: hier.scatter_back(x, idx, x[:, :2], backend=name),
                   lambda: hier.gather_layer_norm(x, idx, None, None, 1e-5, backend=name)],
             "like": [lambda: hier.scatter_rows(x[:, :2], idx, like=x, backend=name)],
             "shortcut": [lambda: hier.masked_residual(x, idx, x[:, :2], backend=name)]}
    for argument, fns in calls.items():
        for fn in fns:
            with pytest.raises(TypeError, match=f"{argument} must have a floating dtype"):
                fn()


@pytest.mark.parametrize("argument,bad,error,words", [
    ("weight", lambda c: torch.ones(c + 1), ValueError, r"weight must be None, or \(C,\) = \(3,\)"),
    ("weight", lambda c: torch.ones(1, c), ValueError, r"weight must be None, or \(C,\)"),
    ("bias", lambda c: torch.ones(c, dtype=torch.int64), TypeError, "bias must have a floating"),
    ("bias", lambda c: [0.0] * c, TypeError, "bias must be a torch.Tensor"),
    ("weight", lambda c: torch.ones(c, device="meta"), ValueError, "weight must be on the device"),
    ("eps", lambda c: -1e-5, ValueError, "eps must be a finite number >= 0"),
    ("eps", lambda c: float("nan"), ValueError, "eps must be a finite number >= 0"),
    ("eps", lambda c: True, ValueError, "eps must be a finite number >= 0"),
    ("gamma", lambda c: torch.ones(c - 1), ValueError,
     r"gamma must be None, a scalar, or \(C,\) = \(3,\)"),
    ("gamma", lambda c: torch.ones(1, c), ValueError, r"gamma must be None, a scalar, or \(C,\)"),
    ("gamma", lambda c: torch.ones(c, dtype=torch.int32), TypeError, "gamma must have a floating"),
])
def test_fused_glue_refuses_bad_parameters_naming_them(backend, argument, bad, error, words):
    """gather_layer_norm's weight / bias / eps and masked_residual's gamma are checked before any
    kernel (a wrong shape raised torch's RuntimeError from inside F.layer_norm or a broadcast)."""
    name, device = backend
    x = torch.randn(2, 6, 3, device=device)
    idx = torch.tensor([[0, 4], [5, 1]], device=device)
    value = bad(3)
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        value = value.to(device)
    if argument == "gamma":
        call = lambda: hier.masked_residual(x, idx, x[:, :2], value, backend=name)  # noqa: E731
    else:
        params = {"weight": None, "bias": None, "eps": 1e-5, argument: value}
        call = lambda: hier.gather_layer_norm(x, idx, backend=name, **params)  # noqa: E731
    with pytest.raises(error, match=words):
        call()


def test_naming_a_backend_without_row_ops_says_so(monkeypatch):
    module = backends.resolve("torch", "cpu")
    monkeypatch.delattr(module, "scatter_back")
    x, idx, v = torch.randn(1, 4, 2), torch.tensor([[1, 2]]), torch.randn(1, 2, 2)
    with pytest.raises(RuntimeError, match="has no scatter_back kernel"):
        hier.scatter_back(x, idx, v, backend="torch")


# ---------------------------------------------------------------------------------------------
# Gradients and torch.compile of the public ops


def test_gradients_are_scatters_and_gathers(backend):
    name, device = backend
    x = torch.randn(2, 12, 3, device=device, requires_grad=True)
    values = torch.randn(2, 5, 3, device=device, requires_grad=True)
    idx = _unique_indices(2, 12, 5, seed=4).to(device)
    g = torch.randn(2, 12, 3, device=device)
    gx, gv = torch.autograd.grad(hier.scatter_back(x, idx, values, backend=name), (x, values), g)
    assert torch.equal(gx, g)                                   # identity for x
    assert torch.equal(gv, torch.stack([g[b, idx[b]] for b in range(2)]))
    (gx,) = torch.autograd.grad(hier.gather_rows(x, idx, backend=name), x,
                                torch.ones(2, 5, 3, device=device))
    mask = torch.zeros(2, 12, 3, device=device)
    for b in range(2):
        mask[b, idx[b]] = 1
    assert torch.equal(gx, mask)


def test_gradients_match_reference(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(7)
    x0, v0 = torch.randn(2, 3, 4, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    g = torch.randn(2, 3, 4, 6, generator=gen)
    idx = _unique_indices(2, 12, 5, seed=5)
    grads = {}
    for which, (dev, kw) in {"backend": (device, {"backend": name}),
                             "reference": ("cpu", {"backend": "torch"})}.items():
        x = x0.to(dev).requires_grad_()
        v = v0.to(dev).requires_grad_()
        i = idx.to(dev)
        row_of = hier.kept_row_map(i, (3, 4), **kw)
        y = hier.scatter_back(x, i, hier.gather_rows(x, i, **kw) * v, row_of=row_of, **kw)
        y = y + hier.scatter_rows(v, i, like=x, **kw)
        grads[which] = [t.cpu() for t in torch.autograd.grad(y, (x, v), g.to(dev))]
    for got, expected in zip(grads["backend"], grads["reference"]):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("layout", ["BNC", "BHWC"])
def test_gradcheck(backend, layout):
    name, device = backend
    # Full Jacobians, first and second derivatives; the interpreted triton kernels would take
    # ~45 s, so there: fast mode's random projections, first derivatives only (the second are the
    # same ops again, and test_gradients_match_reference checks its gradients bit for bit).
    interpreted = name == "triton" and device == "cpu"
    shape = (2, 12, 3) if layout == "BNC" else (2, 3, 4, 3)
    x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
    values = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    idx = _unique_indices(2, 12, 5, seed=3).to(device)
    like = torch.empty(shape, dtype=torch.float64, device=device)
    for fn, inputs in [(lambda t: hier.gather_rows(t, idx, backend=name), (x,)),
                       (lambda t, v: hier.scatter_back(t, idx, v, backend=name), (x, values)),
                       (lambda v: hier.scatter_rows(v, idx, like=like, backend=name), (values,))]:
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=interpreted)
        if not interpreted:
            assert torch.autograd.gradgradcheck(fn, inputs)


def _compile_params():
    """Every backend with "aot_eager"; those with custom ops also with "inductor" (the torch
    backend's ops are torch's own)."""
    return [pytest.param(*p.values, compiler, marks=p.marks, id=f"{p.id}-{compiler}")
            for p in backend_params() for compiler in ("aot_eager", "inductor")
            if compiler == "aot_eager" or p.values[0][0] != "torch"]


@pytest.mark.parametrize("backend,compiler", _compile_params(), indirect=["backend"])
def test_compile_fullgraph_matches_eager(backend, compiler):
    """torch.compile(fullgraph=True) traces the ops without a graph break ("aot_eager": tracing,
    fake kernels, functionalization of the in-place op; "inductor": also runs them from
    inductor's generated code), on a channels-last NCHW view and, with inductor, then a (B, N, C)
    x (a recompile; not for the interpreted triton kernels, whose first compile takes seconds)."""
    name, device = backend

    def block(x, idx, v):
        row_of = hier.kept_row_map(idx, _grid(x), backend=name)
        rows = hier.gather_rows(x, idx, backend=name)
        out = hier.scatter_back(x, idx, rows * 2.0 + v, backend=name)
        dense = hier.scatter_rows(v, idx, like=x, row_of=row_of, backend=name)
        y = out.clone()
        hier.scatter_back(y, idx, v, inplace=True, backend=name)
        return out, dense, y

    gen = torch.Generator().manual_seed(12)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    xs = [_x("nchw", 2, 6, torch.float32, device, gen, h=4, w=5),
          _x("3d", 3, 8, torch.float32, device, gen, h=5, w=6)]
    interpreted = name == "triton" and device == "cpu"
    for x in xs if compiler == "inductor" and not interpreted else xs[:1]:
        idx = _indices(x.shape[0], _positions(x), 7, device, gen)
        v = _values(x.shape[0], 7, x.shape[-1], torch.float32, device, gen)
        for got, want in zip(compiled(x, idx, v), block(x, idx, v)):
            assert torch.equal(got, want)
    torch._dynamo.reset()
