"""The row ops of the hierarchical models (`papr_kernels.hierarchical`: gather_rows, scatter_back,
scatter_rows), one provider per backend that can run on the device, side by side, plus the floor.

Shape: Swin-T's stage 1 (56 x 56 positions, C = 96) at its default z = 0.65, fp32, in the two
layouts the patch sees: a contiguous channels-last map (B, H, W, C) ("nhwc") and an NCHW tensor
seen through `permute(0, 2, 3, 1)` ("nchw-view", never copied by the kernels). Indices are
unique per row, as `select` returns them. The floor is one write of the op's output: a copy of
the gathered rows (gather_rows), a clone of x (scatter_back), a zero fill (scatter_rows).
"""
import pytest
import torch

import papr_bench as pb
import papr_kernels
from papr_kernels import hierarchical

H, W, C, Z = 56, 56, 96, 0.65
SHAPE = "swin-t-s1"
LAYOUTS = ("nhwc", "nchw-view")
OPS = ("gather_rows", "scatter_back", "scatter_rows")


def _batches(device, quick):
    if quick:
        return [1]
    return [64, 256] if device == "cuda" else [64]


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_rows":
        return
    quick = metafunc.config.getoption("--bench-quick")
    device = metafunc.config.getoption("--bench-device") or pb.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # the device fixture skips these cases with the reason
    provs = pb.backend_providers(device) + [pb.FLOOR]
    params = [pytest.param(layout, b, op, prov, id=f"{SHAPE}-{layout}-B{b}-{op}-{prov}")
              for layout in LAYOUTS for b in _batches(device, quick) for op in OPS
              for prov in provs]
    metafunc.parametrize("layout,batch,op,provider", params)


_CACHE = {}


def _inputs(layout, batch, device):
    """(x, indices, values), the last one cached."""
    key = (layout, batch, device)
    if key not in _CACHE:
        _CACHE.clear()
        gen = torch.Generator().manual_seed(0)
        k = papr_kernels.keep_count(H * W, Z, 0)
        idx = torch.stack([torch.randperm(H * W, generator=gen)[:k] for _ in range(batch)])
        values = torch.randn(batch, k, C, generator=gen)
        if layout == "nhwc":
            x = torch.randn(batch, H, W, C, generator=gen)
        else:
            x = torch.randn(batch, C, H, W, generator=gen)
        x = x.to(device)
        if layout == "nchw-view":
            x = x.permute(0, 2, 3, 1)
        _CACHE[key] = (x, idx.to(device), values.to(device))
    return _CACHE[key]


def test_rows(benchmark, device, layout, batch, op, provider):
    x, idx, values = _inputs(layout, batch, device)
    if provider == pb.FLOOR:
        target = {"gather_rows": lambda: values.clone(),
                  "scatter_back": lambda: x.clone(),
                  "scatter_rows": lambda: torch.zeros_like(x)}[op]
    else:
        kw = dict(backend=provider)
        target = {"gather_rows": lambda: hierarchical.gather_rows(x, idx, **kw),
                  "scatter_back": lambda: hierarchical.scatter_back(x, idx, values, **kw),
                  "scatter_rows": lambda: hierarchical.scatter_rows(values, idx, x, **kw)}[op]

    timed = pb.Timed(target, device)
    for _ in range(2):  # warm-up outside the timer
        timed()
    pb.sync(device)
    timed.event_times_s.clear()

    shape = f"{SHAPE}-{layout}"
    benchmark.group = f"rows {shape} fp32 B={batch} z={Z} {op}"
    benchmark.extra_info.update(
        suite="rows", shape=shape, dtype="fp32", batch=batch, mode=op, z=Z, provider=provider,
        device=device, positions=H * W, channels=C, kept=idx.shape[1],
    )
    benchmark(timed)
    if timed.event_median_s() is not None:
        benchmark.extra_info["event_median_s"] = timed.event_median_s()
