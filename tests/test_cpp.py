"""Checks specific to the C++ extension ("cpp" backend) beyond the shared parity matrix:
torch.compile without graph breaks or recompiles, opcheck, fp16/bf16, a 64x64 grid, thread-count
parity, the backward scatter against the reference, strided inputs, direct op misuse."""
import pytest
import torch

import papr_kernels
from papr_kernels import backends, reference
from papr_kernels.testing import assert_matches_reference

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason=f"cpp: {backends.unavailable_reason('cpp', 'cpu')}")


def _inputs(batch=2, n=197, channels=16, proposal=8, f_size=(7, 7), dtype=torch.float32,
            f_dtype=torch.float32, integers=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=gen).to(dtype)
    if integers:
        f = torch.randint(-50, 50, (batch, proposal, *f_size), generator=gen).to(f_dtype)
    else:
        f = torch.randn(batch, proposal, *f_size, generator=gen).to(f_dtype)
    return x, f


def _prune(x, f, z=0.5, **kw):
    return papr_kernels.prune(x, f, z, return_indices=True, backend="cpp", **kw)


def test_compile_fullgraph_has_no_graph_breaks():
    x, f = _inputs()
    explanation = torch._dynamo.explain(
        lambda x, f: papr_kernels.prune(x, f, 0.5, return_indices=True))(x, f)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_dynamic_batch_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(lambda x, f: papr_kernels.prune(x, f, 0.5, return_indices=True),
                       backend=counter, dynamic=True, fullgraph=True)
    for batch in (2, 5):
        x, f = _inputs(batch=batch, integers=True, f_size=(14, 14))
        out, idx = fn(x, f)
        assert_matches_reference(x, f, 0.5, out, idx, exact_indices=True)
    assert counter.frame_count == 1


def test_compile_inductor_forward_and_backward_match_reference():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, f: papr_kernels.prune(x, f, 0.5, return_indices=True),
                       fullgraph=True)
    x, f = _inputs(integers=True, f_size=(14, 14))
    x.requires_grad_(True)
    out, idx = fn(x, f)
    assert_matches_reference(x.detach(), f, 0.5, out.detach(), idx, exact_indices=True)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(gx, reference.scatter(grad, idx, x.shape[1], 1))


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(spatial, dtype):
    x, f = _inputs(dtype=dtype)
    # Autograd lives in papr_kernels.api.PruneFunction, not on the op: inputs without grad.
    torch.library.opcheck(torch.ops.papr_kernels.prune_forward.default,
                          (x, f, 1, [14, 14], 98, True, spatial))
    _, idx = torch.ops.papr_kernels.prune_forward(x, f, 1, [14, 14], 98, True, spatial)
    grad_out = torch.randn(2, 99, 16).to(dtype)
    torch.library.opcheck(torch.ops.papr_kernels.prune_backward.default, (grad_out, idx, 197, 1))


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("f_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_reduced_and_double_precision(x_dtype, f_dtype):
    x, f = _inputs(dtype=x_dtype, f_dtype=f_dtype, integers=True, f_size=(14, 14))
    for order in ("score", "spatial"):
        out, idx = _prune(x, f, order=order)
        assert out.dtype == x_dtype
        assert_matches_reference(x, f, 0.5, out, idx, exact_indices=True, order=order)


def test_half_features_with_subnormals_inf_and_nan():
    x, _ = _inputs(n=1 + 36, batch=3)
    f = torch.tensor([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, float("inf"), float("-inf"),
                      float("nan")] * 4, dtype=torch.float16).reshape(1, 1, 6, 6).repeat(3, 1, 1, 1)
    f[1] = f[1].flip(-1)
    f[2] = f[2] * -1
    for ac in (True, False):
        out, idx = _prune(x, f, 0.5, align_corners=ac)
        assert_matches_reference(x, f, 0.5, out, idx, align_corners=ac)


def test_large_grid_64x64():
    x, f = _inputs(batch=2, n=1 + 64 * 64, channels=8, f_size=(16, 16))
    for z in (0.1, 0.5, 0.9):
        out, idx = _prune(x, f, z, grid=(64, 64))
        assert_matches_reference(x, f, z, out, idx, grid=(64, 64))


def test_video_trilinear_exact_on_integer_features():
    x, f = _inputs(batch=2, n=1 + 4 * 6 * 6, f_size=(4, 6, 6), integers=True)
    out, idx = _prune(x, f, 0.4, grid=(4, 6, 6))
    assert_matches_reference(x, f, 0.4, out, idx, exact_indices=True, grid=(4, 6, 6))


def test_thread_count_does_not_change_results():
    x, f = _inputs(batch=7, channels=64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _prune(x, f, 0.3)
        torch.set_num_threads(max(2, threads))
        multi = _prune(x, f, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], multi[0]) and torch.equal(single[1], multi[1])


def test_backward_equals_reference_scatter_for_strided_grad():
    x, f = _inputs(batch=3, channels=24)
    x.requires_grad_(True)
    out, idx = _prune(x, f)
    grad = torch.randn(3, 24, out.shape[1]).transpose(1, 2)   # non-contiguous
    (gx,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(gx, reference.scatter(grad, idx, x.shape[1], 1))


def test_strided_x_and_f():
    x, f = _inputs(batch=2, channels=16)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)          # channel stride != 1
    x_s = torch.randn(2, 197, 32)[:, :, ::2]                      # channel stride 2
    f_s = torch.randn(2, 8, 7, 14)[..., ::2]
    for xx, ff in ((x_t, f), (x_s, f_s), (x[:, :, 4:12], f.permute(0, 1, 3, 2))):
        out, idx = _prune(xx, ff)
        assert_matches_reference(xx, ff, 0.5, out, idx)


def test_direct_op_misuse_raises_instead_of_reading_out_of_bounds():
    x, f = _inputs()
    op = torch.ops.papr_kernels.prune_forward
    for args in ((x, f, 1, [14, 14], 0, True, False),      # keep < 1
                 (x, f, 1, [14, 14], 197, True, False),    # keep > N
                 (x, f, 1, [14, 13], 98, True, False),     # grid does not hold N
                 (x, f, 197, [14, 14], 98, True, False),   # no patch tokens
                 (x, f[:1], 1, [14, 14], 98, True, False)):
        with pytest.raises(RuntimeError):
            op(*args)
    idx = torch.full((2, 98), 500, dtype=torch.int64)
    with pytest.raises(RuntimeError):
        torch.ops.papr_kernels.prune_backward(torch.randn(2, 99, 16), idx, 197, 1)


def test_package_works_without_the_extension():
    import subprocess
    import sys

    code = ("import sys; sys.modules['papr_kernels._C'] = None\n"
            "import torch, papr_kernels\n"
            "from papr_kernels import backends\n"
            "reason = backends.unavailable_reason('cpp', 'cpu')\n"
            "assert reason and 'papr_kernels._C' in reason, reason\n"
            "assert papr_kernels.available_backends('cpu') == ['torch'] or 'cpp' not in "
            "papr_kernels.available_backends('cpu')\n"
            "x, f = torch.randn(2, 197, 8), torch.randn(2, 4, 7, 7)\n"
            "assert papr_kernels.prune(x, f, 0.5).shape == (2, 99, 8)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
