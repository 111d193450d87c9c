"""Odd memory layouts, determinism across backends, threads and memory over many calls."""
import gc
import resource

import pytest
import torch

import papr_kernels
from papr_kernels import backends, reference
from papr_kernels.testing import assert_matches_reference

from conftest import backend_params, run_in_threads
from lane_order import lane_order_map, rounding_map


def _features(batch, seed=0, size=7):
    return torch.randn(batch, 8, size, size, generator=torch.Generator().manual_seed(seed))


def _layouts():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 197, 16, generator=gen)
    row = torch.randn(1, 197, 16, generator=gen)
    storage = torch.randn(2 * 197 * 8 + 8, generator=gen)
    return {
        "contiguous": base,
        "transposed": base.transpose(1, 2).contiguous().transpose(1, 2),
        "sliced_channels": torch.randn(2, 197, 32, generator=gen)[:, :, ::2],
        "expanded_batch": row.expand(2, -1, -1),                           # zero batch stride
        "expanded_channels": torch.randn(2, 197, 1, generator=gen).expand(-1, -1, 16),
        "overlapping_rows": storage.as_strided((2, 197, 16), (197 * 8, 8, 1)),  # rows overlap
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("f_layout", ["contiguous", "channels_last", "requires_grad"])
def test_memory_layouts(backend, layout, f_layout):
    name, device = backend
    x = _layouts()[layout].to(device)
    f = _features(2).to(device)
    if f_layout == "channels_last":
        f = f.to(memory_format=torch.channels_last)
    elif f_layout == "requires_grad":
        f.requires_grad_()
    x_before = x.clone()
    out, idx = papr_kernels.prune(x, f, 0.5, return_indices=True, backend=name)
    assert torch.equal(x, x_before)
    assert out.is_contiguous() or name == "torch"
    assert_matches_reference(x.cpu(), f.detach().cpu(), 0.5, out.cpu(), idx.cpu())


def test_all_backends_agree_on_tie_rich_inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1 + 16 * 16, 8, generator=gen)
    f = torch.randint(0, 3, (3, 1, 16, 16), generator=gen).float().expand(-1, 4, -1, -1)
    results = {}
    for name in papr_kernels.available_backends("cpu"):
        for order in ("score", "spatial"):
            results[name, order] = papr_kernels.prune(x, f, 0.4, order=order,
                                                      return_indices=True, backend=name)
    for (name, order), (out, idx) in results.items():
        ref_out, ref_idx = reference.prune(x, f, 0.4, order=order, return_indices=True)
        assert torch.equal(idx, ref_idx), name
        assert torch.equal(out, ref_out), name


def test_threads_give_serial_results(backend):
    name, device = backend
    shapes = [(1, 14, 16), (2, 16, 8), (3, 8, 32), (4, 24, 4), (2, 14, 768), (1, 32, 16),
              (5, 10, 3), (2, 12, 64)]   # (batch, grid side, channels): 8 threads, 8 shapes
    problems = []
    for i, (batch, side, channels) in enumerate(shapes):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(batch, 1 + side * side, channels, generator=gen).to(device)
        problems.append((x, _features(batch, seed=i, size=side // 2 + 1).to(device), 0.3 + 0.05 * i))
    serial = [papr_kernels.prune(x, f, z, return_indices=True, backend=name)
              for x, f, z in problems]
    results = run_in_threads(
        lambda problem: papr_kernels.prune(*problem, return_indices=True, backend=name),
        problems, repeats=5)
    for (out, idx), (ref_out, ref_idx) in zip(results, serial):
        assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)


def _rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def test_many_calls_leave_memory_flat(backend):
    name, device = backend
    if name == "triton" and device == "cpu":
        pytest.skip("11,000 calls take an hour in the Triton interpreter, whose memory is not "
                    "what runs in production; compiled Triton (CUDA) is tested")
    x = torch.randn(2, 197, 16, device=device, requires_grad=True)
    f = _features(2).to(device)

    def calls(count, backward):
        for _ in range(count):
            out = papr_kernels.prune(x, f, 0.5, backend=name)
            if backward:
                out.sum().backward()
        gc.collect()

    calls(200, backward=True)  # warm-up: allocator caches, compiled kernels
    before = _rss_mib()
    calls(10_000, backward=False)
    calls(1_000, backward=True)
    growth = _rss_mib() - before
    assert growth < 20, f"resident memory grew by {growth:.1f} MiB over the calls"


FAST_BACKENDS = backend_params("cpp", "cuda", "triton")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fast_backends_sum_channels_in_one_order(backend, dtype, layout):
    """cpp, cuda and triton add f's channels in papr_core.h's channel_sum order (16 interleaved
    lanes), so their float64 means are equal bit for bit and they keep the same tokens on CPU and
    GPU even where the order decides a float32 rounding (the reference, torch's mean, may differ
    there by one ULP, which SPEC allows)."""
    name, device = backend
    f = lane_order_map(dtype).contiguous(memory_format=layout).to(device)
    x = torch.randn(1, 65, 4).to(device)
    for order, expected in (("score", [1, 63, 0]), ("spatial", [0, 1, 63])):
        idx = papr_kernels.prune(x, f, 0.05, grid=(8, 8), order=order, return_indices=True,
                                 backend=name)[1]
        assert idx[0].tolist() == expected, (name, order)


def _problems():
    """(x, f, grid): random maps, and maps where the summation order decides the float32 means,
    contiguous and channels_last."""
    gen = torch.Generator().manual_seed(11)
    for f_shape, grid in (((3, 1024, 7, 7), (14, 14)), ((2, 40, 5, 9), (16, 12)),
                          ((2, 17, 12, 12), (24, 24)), ((2, 24, 3, 4, 4), (6, 7, 7))):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            f = torch.randn(f_shape, generator=gen).to(dtype)
            x = torch.randn(f_shape[0], 1 + int(torch.tensor(grid).prod()), 8, generator=gen)
            yield x, f, grid
    for channels, grid in ((67, (5, 6)), (130, (9, 11))):
        for dtype in (torch.float32, torch.bfloat16):
            f = rounding_map(2, channels, (5, 6), dtype, seed=channels)
            x = torch.randn(2, 1 + grid[0] * grid[1], 8, generator=gen)
            yield x, f, grid
            yield x, f.contiguous(memory_format=torch.channels_last), grid


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_backends_keep_the_cpu_kernel_s_tokens(backend):
    """No ULP exception between the compiled backends: every one, on every device, returns the
    `cpp` kernel's indices exactly, on random maps and on maps where only the summation order
    decides, for both orders and both align_corners settings."""
    name, device = backend
    if backends.unavailable_reason("cpp", "cpu") is not None:
        pytest.skip("the cpp kernel is the yardstick")
    for x, f, grid in _problems():
        for align in (True, False):
            kwargs = dict(grid=grid, align_corners=align, return_indices=True)
            want = papr_kernels.prune(x, f, 0.9, backend="cpp", **kwargs)[1]
            got = papr_kernels.prune(x.to(device), f.to(device), 0.9, backend=name, **kwargs)[1]
            assert torch.equal(got.cpu(), want), (name, tuple(f.shape), f.dtype, align)
