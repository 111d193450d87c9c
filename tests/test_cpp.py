"""Checks specific to the C++ extension ("cpp" backend) beyond the shared parity matrix:
torch.compile without graph breaks or recompiles, opcheck, fp16/bf16, a 64x64 grid, thread-count
parity, the backward scatter against the reference, strided inputs, direct op misuse."""
import os
import re

import pytest
import torch

import papr_kernels
from papr_kernels import reference
from papr_kernels.ops import extension
from papr_kernels.testing import assert_matches_reference

from conftest import requires
from lane_order import lane_order_ranking, rounding_map

pytestmark = requires("cpp", "cpu")


def _inputs(batch=2, n=197, channels=16, proposal=8, f_size=(7, 7), dtype=torch.float32,
            f_dtype=torch.float32, integers=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=gen).to(dtype)
    if integers:
        f = torch.randint(-50, 50, (batch, proposal, *f_size), generator=gen).to(f_dtype)
    else:
        f = torch.randn(batch, proposal, *f_size, generator=gen).to(f_dtype)
    return x, f


def _prune(x, f, z=0.5, backend="cpp", **kw):
    return papr_kernels.prune(x, f, z, return_indices=True, backend=backend, **kw)


# The extension's two kernels: "cpp" on CPU tensors, "cuda" on CUDA tensors (skipped without one).
KERNELS = ["cpp", pytest.param("cuda", marks=requires("cuda", "cuda"))]


def _exact_as_reference(backend, x, f, z, **kw):
    """Indices and output of `backend` equal the reference's exactly (torch.equal)."""
    device = "cuda" if backend == "cuda" else "cpu"
    out, idx = _prune(x.to(device), f.to(device), z, backend=backend, **kw)
    ref_out, ref_idx = reference.prune(x, f, z, return_indices=True, **kw)
    assert torch.equal(idx.cpu(), ref_idx), (idx, ref_idx)
    assert torch.equal(out.cpu(), ref_out)


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


@pytest.mark.parametrize("backend", KERNELS)
def test_channel_mean_op(backend):
    """papr_kernels::channel_mean: opcheck (schema, fake tensor), 4-D and 5-D, both layouts, an
    empty batch, and bad f refused with an error naming it."""
    device = "cuda" if backend == "cuda" else "cpu"
    op = torch.ops.papr_kernels.channel_mean.default
    gen = torch.Generator().manual_seed(3)
    for f in (torch.randn(2, 40, 5, 6, generator=gen),
              torch.randn(2, 40, 5, 6, generator=gen).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 20, 3, 4, 5, generator=gen).to(torch.bfloat16),
              torch.randn(0, 8, 3, 3)):
        f = f.to(device)
        torch.library.opcheck(op, (f,))
        m = op(f)
        assert m.shape == (f.shape[0], 1, *f.shape[2:]) and m.dtype == torch.float64
        torch.testing.assert_close(m, f.double().mean(dim=1, keepdim=True), rtol=1e-15, atol=0)
    for bad in (torch.randn(2, 8, 9), torch.randn(2, 8, 3, 3).int(), torch.randn(2, 0, 3, 3)):
        with pytest.raises(RuntimeError, match="papr_kernels: f"):
            op(bad.to(device))


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


# The fp32/bf16/fp16 channel mean runs in blocks of 48 positions with a 1-51 position tail block
# (AVX2 where the CPU has it): every tail length, maps smaller than one register and several blocks.
@pytest.mark.parametrize("f_size", [(1, 1), (1, 2), (1, 3), (2, 2), (1, 5), (7, 7), (4, 12), (1, 51),
                                    (4, 13), (1, 53), (10, 10), (14, 14), (13, 17)])
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_proposal_map_size_matches_the_reference(f_size, f_dtype):
    for integers in (True, False):
        x, f = _inputs(batch=3, n=1 + 6 * 6, proposal=37, f_size=f_size, f_dtype=f_dtype,
                       integers=integers, seed=sum(f_size))
        out, idx = _prune(x, f, 0.9)
        assert_matches_reference(x, f, 0.9, out, idx, exact_indices=integers)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_channels_last_features_are_read_as_they_are(backend, f_dtype):
    """f from a channels_last proposal ((S, K) rows, channels innermost) is read as it is instead
    of copied to NCHW first (cpp: each row transposed inside the kernel; cuda: the mean kernel's
    threads laid over channels, same summation order): the same indices and tokens as contiguous
    f, bit for bit, for images (channels_last), video (channels_last_3d), one and several rows,
    and a row large enough for the CPU path that splits one row's mean over threads."""
    device = "cuda" if backend == "cuda" else "cpu"
    cases = [((3, 40, 7, 7), (14, 14), torch.channels_last),
             ((1, 40, 5, 9), (14, 14), torch.channels_last),
             ((2, 12, 4, 6, 6), (4, 6, 6), torch.channels_last_3d),
             ((1, 6000, 7, 7), (14, 14), torch.channels_last)]   # 1.2-2.4 MB rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        for shape, grid, layout in cases:
            gen = torch.Generator().manual_seed(len(shape))
            f = torch.randn(shape, generator=gen).to(f_dtype).to(device)
            x = torch.randn(shape[0], 1 + int(torch.tensor(grid).prod()), 4, generator=gen)
            x = x.to(device)
            f_nhwc = f.contiguous(memory_format=layout)
            assert not f_nhwc.is_contiguous()
            for order in ("score", "spatial"):
                want = _prune(x, f, 0.5, grid=grid, order=order, backend=backend)
                got = _prune(x, f_nhwc, 0.5, grid=grid, order=order, backend=backend)
                assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    finally:
        torch.set_num_threads(threads)


def channel_order_map(dtype, reverse: bool):
    """f (1, 4, 8, 8) at the token grid, where bicubic is the identity. Position 0: channels
    [1, 0, 0, 0] (mean 1/4). Positions 1 and 63: [1, 2^-24, 2^-53, 2^-53], added in channel
    order a float64 mean of exactly 1/4 + 2^-26, a float32 tie that rounds to 1/4; reversed, the
    two 2^-53 add up first and the mean rounds up to 1/4 + 2^-25, one float32 ULP more."""
    f = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    f[0, 0, 0, 0] = 1.0
    column = torch.tensor([1.0, 2.0 ** -24, 2.0 ** -53, 2.0 ** -53], dtype=torch.float64)
    for position in (1, 63):
        f[0, :, position // 8, position % 8] = column
    return (f.flip(1) if reverse else f).to(dtype)


@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_channels_are_summed_in_order_as_by_the_reference(f_dtype):
    """`cpp` adds each position's channels 0, 1, ..., K-1 in order, as torch's CPU mean does
    (and the CUDA kernel): on a float32 rounding tie the order decides the ranking."""
    x = torch.randn(1, 65, 4)
    for reverse, expected in ((False, [0, 1, 63]), (True, [1, 63, 0])):
        f = channel_order_map(f_dtype, reverse)
        want = reference.prune(x, f, 0.05, grid=(8, 8), return_indices=True)[1]
        assert want[0].tolist() == expected   # the case tells the two orders apart
        assert torch.equal(_prune(x, f, 0.05, grid=(8, 8))[1], want)


@pytest.mark.parametrize("channels", [3, 16, 21, 64, 67, 130])
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_mean_is_summed_in_lane_order(channels, f_dtype, layout):
    """Every K (below, at and past one 16-channel step, with tails), both layouts (the AVX2 paths
    for (K, S) and (S, K) rows and the portable loop under PAPR_KERNELS_NO_SIMD=1, through
    simd_cases), on maps where the summation order decides most float32 means: the ranking of
    the lane order written out in Python, exactly. (Summed channel by channel, 0..K-1, the
    rankings differ.)"""
    f = rounding_map(2, channels, (5, 6), f_dtype, seed=channels).contiguous(memory_format=layout)
    x = torch.randn(2, 1 + 30, 4)
    idx = _prune(x, f, 0.97, grid=(5, 6))[1]
    want = lane_order_ranking(f)
    assert torch.equal(idx, want[:, :idx.shape[1]])


def simd_cases():
    """Indices of `cpp` on random, integer and constant maps of every f dtype and several sizes
    (what test_simd_and_portable_means_choose_the_same_tokens runs in two processes)."""
    results = []
    for f_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for f_size in ((7, 7), (1, 51), (12, 12), (13, 17)):
            for kind in ("random", "integers", "constant"):
                x, f = _inputs(batch=2, n=1 + 8 * 8, channels=4, proposal=33, f_size=f_size,
                               f_dtype=f_dtype, integers=kind == "integers", seed=len(results))
                if kind == "constant":
                    f = torch.full_like(f, 0.3)
                results.append(_prune(x, f, 0.9, grid=(8, 8))[1])
        if f_dtype != torch.float16:   # 2^-53 is 0 in fp16
            for reverse in (False, True):
                f = channel_order_map(f_dtype, reverse)
                results.append(_prune(torch.zeros(1, 65, 4), f, 0.9, grid=(8, 8))[1])
            for channels in (21, 130):
                for layout in (torch.contiguous_format, torch.channels_last):
                    f = rounding_map(2, channels, (5, 6), f_dtype, seed=channels)
                    results.append(_prune(torch.zeros(2, 31, 4), f.contiguous(memory_format=layout),
                                          0.97, grid=(5, 6))[1])
    return results


def test_simd_and_portable_means_choose_the_same_tokens(tmp_path):
    """The AVX2 channel mean (picked at run time) and the portable loop (forced by
    PAPR_KERNELS_NO_SIMD=1 in a fresh process) add each position's channels in the same order,
    so they give the same scores bit for bit: the same indices everywhere."""
    import os
    import subprocess
    import sys
    out = tmp_path / "portable.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import test_cpp; "
            "torch.save(test_cpp.simd_cases(), sys.argv[2])")
    env = dict(os.environ, PAPR_KERNELS_NO_SIMD="1")
    subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(out)], env=env,
                   check=True, timeout=300)
    portable, here = torch.load(out), simd_cases()
    assert len(portable) == len(here) == 48
    for i, (a, b) in enumerate(zip(portable, here)):
        assert torch.equal(a, b), (i, a, b)


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


def test_direct_row_op_misuse_raises():
    """The row ops' custom ops called directly (the adapter in ops/extension.py, and the public
    ops before it, check their arguments; tests/test_rows.py covers the results)."""
    ops = torch.ops.papr_kernels
    x = torch.randn(2, 5, 7, 6)
    idx = torch.stack([torch.randperm(35, generator=torch.Generator().manual_seed(b))[:4]
                       for b in range(2)])
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
    row_of = torch.full((2, 35), -1, dtype=torch.int32)
    for args, words in (((x[0], row_of, values, None), "4-D"),
                        ((x, row_of.long(), values, None), "row_of must be int32"),
                        ((x, row_of[:, :34], values, None), r"row_of must be \(B, H\*W\)"),
                        ((x, row_of, values[:, :, :5], None), r"values must be \(B, k, C\)"),
                        ((x, row_of, values.double(), None), "values .* dtype of shortcut"),
                        ((x, row_of, values, torch.ones(5)), r"gamma must be \(C,\)"),
                        ((x, row_of, values, torch.ones(6).double()), "gamma .* dtype")):
        with pytest.raises(RuntimeError, match=words):
            ops.masked_residual(*args)


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


def test_an_installed_extension_that_does_not_load_is_reported(tmp_path):
    """A _C library that is there but does not load (a torch older than the stable ABI it
    needs, a broken file) warns once at first use and says so in the cpp backend's reason,
    with the torch it needs; prune still runs (on torch)."""
    import shutil
    import subprocess
    import sys

    package = os.path.dirname(papr_kernels.__file__)
    shutil.copytree(package, tmp_path / "papr_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "papr_kernels" / "_C.abi3.so").write_text("not a library")
    code = ("import warnings, torch, papr_kernels\n"
            "from papr_kernels import backends\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    reason = backends.unavailable_reason('cpp', 'cpu')\n"
            "print(reason)\n"
            "print([str(w.message) for w in caught])\n"
            "x, f = torch.randn(2, 197, 8), torch.randn(2, 4, 7, 7)\n"
            "print(papr_kernels.prune(x, f, 0.5).shape)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reason, warned, shape = proc.stdout.splitlines()
    assert "does not load" in reason and "needs torch >= 2.10; this is torch" in reason, reason
    assert "the C++/CUDA extension does not load" in warned, warned
    assert shape == "torch.Size([2, 99, 8])"


# ---- float64 scores (SPEC, semantics 1): exact ties on tie-rich maps --------------------------
# A constant region of f gives exactly equal float32 scores in the reference (float64 mean and
# resize, one rounding), so its tie order is the index order. A float32 resize would give
# values a few ULP apart there and rank them by rounding noise: these tests compare indices
# with torch.equal, no tolerance.

def _tie_maps():
    gen = torch.Generator().manual_seed(7)
    per_channel = torch.randn(2, 6, 1, 1, generator=gen).expand(2, 6, 5, 5).contiguous()
    plateau = torch.randn(2, 3, 7, 7, generator=gen)
    plateau[:, :, 1:6, 2:7] = 0.3712  # a constant block inside a random map
    integers = torch.randint(-4, 5, (2, 5, 7, 7), generator=gen).float()
    return {
        "ones": torch.ones(2, 4, 3, 3),
        "per_channel_constant": per_channel,
        "plateau": plateau,
        "integers": integers,
        "fp16_constant": torch.full((2, 4, 5, 5), 0.1, dtype=torch.float16),
        "bf16_constant": torch.full((2, 4, 5, 5), 0.1, dtype=torch.bfloat16),
        "fp64_constant": torch.full((2, 4, 5, 5), 0.1, dtype=torch.float64),
        "f32_thirds": torch.full((2, 3, 4, 4), 1.0 / 3.0),
    }


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("name", list(_tie_maps()))
@pytest.mark.parametrize("grid", [(14, 14), (9, 11)])
@pytest.mark.parametrize("backend", KERNELS)
def test_tie_rich_maps_give_exactly_the_reference_indices(backend, name, order, align_corners,
                                                          grid):
    f = _tie_maps()[name]
    n = 1 + grid[0] * grid[1]
    x = torch.randn(f.shape[0], n, 8, generator=torch.Generator().manual_seed(1))
    for z in (0.3, 0.77):
        _exact_as_reference(backend, x, f, z, grid=grid, order=order, align_corners=align_corners)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["constant", "per_channel_constant", "plateau"])
@pytest.mark.parametrize("backend", KERNELS)
def test_video_tie_rich_maps_give_exactly_the_reference_indices(backend, kind, f_dtype, order,
                                                                align_corners):
    gen = torch.Generator().manual_seed(3)
    if kind == "constant":
        f = torch.full((2, 3, 2, 3, 3), 0.7)
    elif kind == "per_channel_constant":
        f = torch.randn(2, 5, 1, 1, 1, generator=gen).expand(2, 5, 2, 3, 3).contiguous()
    else:
        f = torch.randn(2, 3, 3, 4, 4, generator=gen)
        f[:, :, :, 1:, 1:] = -0.41
    f = f.to(f_dtype)
    grid = (4, 7, 6)
    x = torch.randn(2, 1 + 4 * 7 * 6, 8, generator=gen)
    _exact_as_reference(backend, x, f, 0.4, grid=grid, order=order, align_corners=align_corners)


# The CUDA kernel ranks rows of up to 2048 patches in shared memory and sorts longer rows: both
# sides of that switch, on maps with large tied regions and on random ones.
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("grid", [(45, 45), (46, 46), (64, 64), (96, 100)], ids=str)
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_long_rows_with_plateaus_give_exactly_the_reference_indices(backend, grid, order):
    gen = torch.Generator().manual_seed(11)
    f = torch.randn(2, 4, 12, 12, generator=gen)
    f[0, :, 2:9, 3:11] = 0.25          # a plateau: ties across hundreds of patches
    f[1] = f[1].round()                # integer-valued: ties too
    x = torch.randn(2, 1 + grid[0] * grid[1], 4, generator=gen)
    for z in (0.05, 0.5, 1.0 - 1e-3):
        _exact_as_reference(backend, x, f, z, grid=grid, order=order)
    f = torch.randn(3, 4, 12, 12, generator=gen)
    x = torch.randn(3, 1 + grid[0] * grid[1], 4, generator=gen)
    out, idx = _prune(x.to("cuda" if backend == "cuda" else "cpu"),
                      f.to("cuda" if backend == "cuda" else "cpu"), 0.3, backend=backend,
                      grid=grid, order=order)
    assert_matches_reference(x, f, 0.3, out.cpu(), idx.cpu(), grid=grid, order=order)


@pytest.mark.parametrize("backend", KERNELS)
def test_double_features_are_not_rounded_to_float_before_the_mean(backend):
    # float64 f: channel 0 is 1 + 2^-30 on a random mask (not a float32 value: it rounds to 1),
    # channel 1 is -1. The reference's float64 mean is 2^-31 on the mask and 0 elsewhere, so the
    # masked region ranks first; rounding f to float32 first would make every score 0.
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 1, 6, 6, generator=gen) < 0.4
    f = torch.cat([1.0 + mask.double() * 2.0 ** -30, -torch.ones(2, 1, 6, 6, dtype=torch.float64)],
                  dim=1)
    x = torch.randn(2, 1 + 36, 4, generator=gen)
    for ac in (True, False):
        _exact_as_reference(backend, x, f, 0.3, align_corners=ac)
    _, ref_idx = reference.prune(x, f, 0.3, return_indices=True)
    assert not torch.equal(ref_idx[0], torch.arange(ref_idx.shape[1]))  # the test has teeth


# ---- build_info: what the binary was built for ------------------------------------------------

def _cuobjdump():
    import os
    import shutil

    import triton

    candidates = [shutil.which("cuobjdump"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "cuobjdump")]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _version_tuple(version):
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


def test_build_info_names_the_abi_and_the_kernels_built():


    info = extension.build_info()
    assert isinstance(info, dict) and {"torch", "cuda", "archs", "ptx"} <= set(info)
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["torch"]), info  # the torch it was compiled with
    # One binary for every torch from the stable-ABI target on (the loaded torch may differ).
    assert info["stable_abi"] == "2.10" and info["python_abi"] == "cp310", info
    assert extension.STABLE_ABI_TARGET == info["stable_abi"]   # setup.py's, restated there
    assert _version_tuple(torch.__version__) >= _version_tuple(info["stable_abi"])
    assert isinstance(info["archs"], list) and all(isinstance(a, str) for a in info["archs"])
    assert isinstance(info["ptx"], bool)
    # The CUDA kernels' library exists exactly when the build recorded CUDA; it loads only into
    # a CUDA build of torch.
    built_with_cuda = extension.cuda_library() is not None
    if built_with_cuda:
        assert info["cuda"] and info["archs"], info
        assert all(a[0].isdigit() and "." in a for a in info["archs"]), info
    else:
        assert info == {**info, "cuda": None, "archs": [], "ptx": False}
    assert extension._HAS_CUDA_KERNEL == (built_with_cuda and torch.version.cuda is not None), \
        extension._CUDA_ERROR


def test_build_info_agrees_with_the_binary_s_cuda_code():
    import subprocess

    if not extension._HAS_CUDA_KERNEL:
        pytest.skip(f"no CUDA kernels loaded: {extension._CUDA_ERROR}")
    library = extension.cuda_library()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    info = extension.build_info()
    elf = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", library], capture_output=True, text=True).stdout
    sass = sorted({f"{m[:-1]}.{m[-1]}" for m in __import__("re").findall(r"\.sm_(\d+)a?\.", elf)})
    assert sass == sorted(a.rstrip("af") for a in info["archs"]), (elf, info)
    assert bool(ptx.strip()) == info["ptx"], (ptx, info)


def test_build_info_is_none_without_the_extension():
    import subprocess
    import sys

    code = ("import sys; sys.modules['papr_kernels._C'] = None\n"
            "from papr_kernels.ops import extension\n"
            "assert extension.build_info() is None\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_info_says_what_the_extension_was_built_for(capsys):
    from papr_kernels.__main__ import main

    build = extension.build_info()
    assert main(["info"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("extension _C"))
    assert f"built against torch {build['torch']}" in line
    for arch in build["archs"]:
        assert f"sm_{arch.replace('.', '')}" in line
    assert ("+ PTX" in line) == build["ptx"]


@pytest.mark.parametrize("capability,runs", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True),   # sm_80 SASS runs on 8.x
    ((9, 0), True), ((10, 0), True), ((12, 0), True),  # sm_90 SASS; compute_90 PTX, JIT-compiled
    ((7, 5), False), ((7, 0), False),                  # older than every arch built: no code
])
def test_cuda_backend_is_unavailable_on_a_gpu_without_code(capability, runs):
    """The cuda backend runs only where the binary has SASS or PTX for the GPU (a T4 or V100
    got every launch failing with "no kernel image" while auto selection picked it)."""
    info = {"archs": ["8.0", "9.0"], "ptx": True}
    reason = extension.missing_gpu_code(capability, info)
    assert (reason is None) == runs, reason
    if not runs:
        assert f"sm_{capability[0]}{capability[1]}" in reason and "sm_80, sm_90 + PTX" in reason
    assert extension.missing_gpu_code((10, 0), dict(info, ptx=False)) is not None
    assert extension.missing_gpu_code((8, 0), {"archs": [], "ptx": False}) is not None


def test_cuda_kernels_of_an_earlier_build_are_not_loaded(monkeypatch):
    """A _C built without CUDA does not load a _C_cuda library an earlier build left beside it
    (its ops would not match this build's schemas)."""
    monkeypatch.setattr(extension, "build_info", lambda: {"cuda": None, "archs": []})
    assert extension.cuda_library() is None
