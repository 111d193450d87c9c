"""Triton-specific tests (the parity matrix in test_parity.py covers the shapes and dtypes).

On a machine without CUDA they run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it);
shapes stay small because the interpreter runs every program op by op in Python.
"""
import pytest
import torch

import papr_kernels
from papr_kernels import backends, reference
from papr_kernels.testing import assert_matches_reference

from conftest import requires

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = requires("triton", DEVICE)

if backends.unavailable_reason("triton", DEVICE) is None:   # else every test is skipped (or fails)
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


def _f_layouts():
    """f in the layouts a user passes: (name, f, read without a copy)."""
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(2, 24, 5, 6, generator=gen).to(DEVICE)
    video = torch.randn(2, 12, 3, 4, 5, generator=gen).to(DEVICE)
    return [
        ("contiguous", image, True),
        ("channels_last", image.contiguous(memory_format=torch.channels_last), True),
        ("channels_last_3d", video.contiguous(memory_format=torch.channels_last_3d), True),
        ("sliced_channels", torch.randn(2, 48, 5, 6, generator=gen).to(DEVICE)[:, ::2], True),
        ("one_column", torch.randn(2, 24, 5, 1, generator=gen).to(DEVICE)
         .contiguous(memory_format=torch.channels_last), True),
        ("expanded_channels", image[:, :1].expand(-1, 24, -1, -1), True),
        ("transposed_map", image.transpose(2, 3), False),     # positions not one strided dim
    ]


@pytest.mark.parametrize("case", range(len(_f_layouts())))
def test_features_are_read_through_their_strides(monkeypatch, split, case):
    """f laid out channels_last (what the proposal returns), sliced or expanded reaches the
    kernel as it is, its strides passed; f whose positions are no single strided dimension is
    copied first. Either way: the indices and tokens of contiguous f."""
    name, f, in_place = _f_layouts()[case]
    seen = []
    original = tp._prune_fwd_kernel.run

    def spy(*args, **kwargs):
        seen.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(tp._prune_fwd_kernel, "run", spy)
    split(2, 2)
    video = f.dim() == 5
    grid = (3, 4, 5) if video else (7, 6)
    x = torch.randn(2, 1 + (60 if video else 42), 8, device=DEVICE)
    for order in ("score", "spatial"):
        want = _prune(x, f.contiguous(), 0.5, grid=grid, order=order)
        seen.clear()
        got = _prune(x, f, 0.5, grid=grid, order=order)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), name
        assert_matches_reference(x, f, 0.5, *got, grid=grid, order=order)
        assert (seen[0].data_ptr() == f.data_ptr()) == in_place, name


@pytest.mark.parametrize("chunk", [1, 8])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_scores_chunk_by_chunk_match_reference(monkeypatch, chunk, order):
    # the float64 scores are computed CHUNK patches per loop iteration: with tiny chunks there are
    # many iterations, the last ones partly or wholly padding (N = 35 and 60 of 64 keys)
    monkeypatch.setattr(tp, "CHUNK_OVERRIDE", chunk)
    torch.manual_seed(4)
    x = torch.randn(2, 1 + 35, 4, device=DEVICE)
    f = torch.randint(-2, 3, (2, 3, 4, 3), device=DEVICE).float()   # tie-rich
    for align in (True, False):
        kwargs = dict(grid=(5, 7), align_corners=align, order=order)
        out, idx = _prune(x, f, 0.5, **kwargs)
        assert_matches_reference(x, f, 0.5, out, idx, exact_indices=True, **kwargs)
    x = torch.randn(2, 1 + 60, 4, device=DEVICE)
    f = torch.randint(-2, 3, (2, 2, 2, 3, 4), device=DEVICE).to(torch.bfloat16)
    # align_corners=True only: with False, ATen's AVX2 build contracts its source index
    # scale * (o + 0.5) - 0.5 into an FMA and this map then scores patch 29 of row 1 at
    # -1.1e-16 where the unfused interpreter gets 0.0 (a tie flip, independent of the chunking)
    kwargs = dict(grid=(3, 4, 5), align_corners=True, order=order)
    out, idx = _prune(x, f, 0.5, **kwargs)
    assert_matches_reference(x, f, 0.5, out, idx, exact_indices=True, **kwargs)


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
    torch.library.opcheck(torch.ops.papr_kernels.triton_channel_mean.default, (f,),
                          test_utils=("test_schema", "test_faketensor"))


def test_channel_mean_reads_f_through_its_strides_and_falls_back_past_its_limit(monkeypatch):
    """One launch per call, f read as it is (channels_last: no copy), B = 0 without a launch;
    a map over MAX_SOURCE positions goes to the fallback backend, with the same bits."""
    seen = []
    original = tp._channel_mean_kernel.run

    def spy(*args, **kwargs):
        seen.append(args[0].data_ptr())
        return original(*args, **kwargs)

    monkeypatch.setattr(tp._channel_mean_kernel, "run", spy)
    f = torch.randn(3, 24, 9, 10, device=DEVICE).contiguous(memory_format=torch.channels_last)
    m = tp.channel_mean(f)
    assert seen == [f.data_ptr()]
    assert torch.equal(m, tp.fallback_backend(f.device.type).channel_mean(f))
    assert tp.channel_mean(f[:0]).shape == (0, 1, 9, 10) and len(seen) == 1
    big = torch.randn(1, 2, 33, 32, device=DEVICE)              # 1056 > MAX_SOURCE positions
    assert torch.equal(tp.channel_mean(big), tp.fallback_backend(big.device.type).channel_mean(big))
    assert len(seen) == 1


def test_eager_calls_launch_without_the_custom_op(monkeypatch, launches):
    """Plain eager skips the custom ops' dispatch (common.call): the kernels still run once each
    and the result is the reference's."""
    def not_called(*args):
        raise AssertionError("custom op called in plain eager")
    monkeypatch.setattr(tp, "triton_prune_forward", not_called)
    monkeypatch.setattr(tp, "triton_prune_backward", not_called)
    x = torch.randn(2, 17, 4, device=DEVICE, requires_grad=True)
    f = torch.randn(2, 3, 2, 2, device=DEVICE)
    out, idx = papr_kernels.prune(x, f, 0.5, backend="triton", return_indices=True)
    out.backward(torch.ones_like(out))
    assert launches == {"fwd": 1, "bwd": 1}
    assert_matches_reference(x.detach(), f, 0.5, out.detach(), idx)
    expected = reference.scatter(torch.ones_like(out), idx, 17, 1)
    assert torch.equal(x.grad, expected)


class _Subclass(torch.Tensor):
    pass


def test_launchers_run_bare_only_where_nothing_records_the_call():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    x = torch.randn(3)

    def scaled(t):   # 1 where the launcher may run bare, 2 where the custom op must be used
        return t * (1 if common.untraced(t) else 2)

    assert torch.equal(scaled(x), x)
    assert torch.equal(scaled(torch.nn.Parameter(x)), x)
    assert not common.untraced(x.as_subclass(_Subclass))
    with FakeTensorMode():
        assert not common.untraced(torch.empty(3))
    with TorchFunctionMode():
        assert not common.untraced(x)
    assert torch.equal(torch.vmap(scaled)(x[None]), 2 * x[None])
    assert torch.equal(torch.jit.trace(scaled, x, check_trace=False)(x), 2 * x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(scaled, fullgraph=True, backend="eager")(x), 2 * x)


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    x = torch.randn(2, 17, 4, device=DEVICE)
    f = torch.randn(2, 3, 2, 2, device=DEVICE)
    fn = torch.compile(lambda x, f: papr_kernels.prune(x, f, 0.5, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    out = fn(x, f)
    assert torch.equal(out, papr_kernels.prune(x, f, 0.5, backend="torch"))


def test_patch_limit_is_what_one_program_holds():
    # gpu_report compiles (and checks for spills) the sort of up to 4096 keys: no larger N runs
    assert tp.MAX_PATCHES == 4096
    f = torch.randn(1, 1, 7, 7)
    assert tp.fallback_reason(f, 4096) is None and tp.fallback_reason(f, 4097) is not None


def _expected_fallback(device):
    """The fastest non-triton backend of `device` (registration order is preference order)."""
    for name in ("cuda", "cpp") if device == "cuda" else ("cpp",):
        if backends.unavailable_reason(name, device) is None:
            return name
    return "torch"


@pytest.mark.parametrize("grid,fshape", [((65, 65), (1, 2, 5, 5)), ((4, 33, 33), (1, 2, 2, 3, 3))])
def test_large_grid_runs_on_the_fastest_other_backend(launches, monkeypatch, grid, fshape):
    """N > MAX_PATCHES: forward and backward go to the fallback backend, never the kernels
    (4225 and 4356 patches: the N <= 4096 sort would not fit)."""
    torch.manual_seed(6)
    n = 1 + int(torch.tensor(grid).prod())
    x = torch.randn(2, n, 3, device=DEVICE, requires_grad=True)
    f = torch.randn(2, *fshape[1:], device=DEVICE)
    fallback = tp.fallback_backend(x.device.type)
    assert fallback is backends.resolve(_expected_fallback(x.device.type), x.device.type)
    # exactly what the fallback backend gives (its own tests compare it with the reference)
    want_out, want_idx = papr_kernels.prune(x.detach(), f, 0.3, grid=grid, return_indices=True,
                                            backend=_expected_fallback(x.device.type))
    calls = {"forward": 0, "backward": 0}
    for op in calls:
        def spy(*args, _op=op, _orig=getattr(fallback, op)):
            calls[_op] += 1
            return _orig(*args)
        monkeypatch.setattr(fallback, op, spy)
    out, idx = _prune(x, f, 0.3, grid=grid)
    assert torch.equal(idx, want_idx) and torch.equal(out, want_out)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, reference.scatter(g, idx, n, 1))
    assert calls == {"forward": 1, "backward": 1}
    assert launches == {"fwd": 0, "bwd": 0}


def test_backward_with_duplicate_and_out_of_range_indices_stays_in_bounds(split):
    """The custom op called directly (prune's indices are unique and in range): a patch named
    twice gets a zero row (as if pruned), an index outside [0, N) names nothing, and no program
    reads past grad_out (a duplicate's summed position would: 2 + 5 >= k = 6)."""
    split(2, 2)
    torch.manual_seed(7)
    P, N, C = 2, 10, 5
    g = torch.randn(2, P + 6, C, device=DEVICE)
    idx = torch.tensor([[3, 3, 7, 1, 9, 0],          # 3 twice (j = 0, 1)
                        [4, -1, 6, 12, 8, 6]],       # 6 twice (j = 2, 5), -1 and 12 out of range
                       device=DEVICE)
    got = torch.ops.papr_kernels.triton_prune_backward(g, idx, P + N, P)
    want = torch.zeros(2, P + N, C, device=DEVICE)
    want[:, :P] = g[:, :P]
    for b in range(2):
        row = idx[b].tolist()
        for j, i in enumerate(row):
            if 0 <= i < N and row.count(i) == 1:
                want[b, P + i] = g[b, P + j]
    assert torch.equal(got, want)


def test_backward_rejects_mismatched_shapes():
    g = torch.randn(1, 5, 2, device=DEVICE)
    with pytest.raises(ValueError, match="triton_prune_backward"):
        torch.ops.papr_kernels.triton_prune_backward(g, torch.zeros(1, 3, dtype=torch.int64,
                                                                    device=DEVICE), 10, 1)


@requires("triton", "cuda")
def test_launches_run_on_the_current_stream():
    """Work queued on a side stream before the launch (a long sleep, then writing x) must be
    complete when the kernels read x: they run on the current stream, after it."""
    from papr_kernels.ops.triton import rows as tr
    torch.manual_seed(8)
    x_src = torch.randn(4, 1 + 196, 64, device="cuda")
    f = torch.randn(4, 8, 7, 7, device="cuda")
    want_out, want_idx = reference.prune(x_src, f, 0.5, return_indices=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x = torch.zeros_like(x_src)
        torch.cuda._sleep(50_000_000)   # ~tens of ms of GPU time on s before x is written
        x.copy_(x_src)
        out, idx = _prune(x, f, 0.5)
        rows = tr.gather_rows(x[:, 1:], idx)
        gx = torch.ops.papr_kernels.triton_prune_backward(out, idx, x.shape[1], 1)
    s.synchronize()
    assert torch.equal(idx, want_idx) and torch.equal(out, want_out)
    assert torch.equal(rows, want_out[:, 1:])
    assert torch.equal(gx, reference.scatter(want_out, want_idx, x.shape[1], 1))


@requires("triton", "cuda")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_run_on_the_tensors_device():
    from papr_kernels.ops.triton import rows as tr
    torch.manual_seed(9)
    x = torch.randn(3, 1 + 196, 32)
    f = torch.randn(3, 8, 7, 7)
    want_out, want_idx = reference.prune(x, f, 0.5, return_indices=True)
    with torch.cuda.device(0):       # current device 0, tensors on device 1
        x1, f1 = x.to("cuda:1"), f.to("cuda:1")
        out, idx = _prune(x1, f1, 0.5)
        rows = tr.gather_rows(x1[:, 1:], idx)
        gx = torch.ops.papr_kernels.triton_prune_backward(out, idx, x.shape[1], 1)
        torch.cuda.synchronize(1)
    assert out.device == idx.device == torch.device("cuda:1")
    assert torch.equal(idx.cpu(), want_idx) and torch.equal(out.cpu(), want_out)
    assert torch.equal(rows.cpu(), want_out[:, 1:])
    assert torch.equal(gx.cpu(), reference.scatter(want_out, want_idx, x.shape[1], 1))



def test_interpreter_set_after_the_kernels_exist_is_reported_not_crashed():
    """TRITON_INTERPRET=1 set after the kernels were defined (compiled, not interpreted) cannot
    run CPU tensors: the backend says why instead of failing inside a launch."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")

    code = ("import os, torch, papr_kernels\n"
            "os.environ.pop('TRITON_INTERPRET', None)\n"
            "assert 'triton' not in papr_kernels.available_backends('cpu')\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "assert 'triton' not in papr_kernels.available_backends('cpu')\n"
            "x, f = torch.randn(1, 17, 4), torch.randn(1, 3, 4, 4)\n"
            "try:\n"
            "    papr_kernels.prune(x, f, 0.5, backend='triton')\n"
            "except RuntimeError as exc:\n"
            "    assert 'was set after' in str(exc), exc\n"
            "else:\n"
            "    raise AssertionError('no error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
