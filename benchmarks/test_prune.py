"""`prune` forward, backward and forward+backward for every provider, side by side.

Providers (one per case): the eager reference, torch.compile(reference), every backend that can
run on the device (discovered at run time), and the floor (the bytes the op cannot avoid).
"""
import pytest
import torch

import papr_bench as pb
from papr_kernels import reference

Z = 0.5
Z_SWEEP = (0.1, 0.3, 0.5, 0.7, 0.9)


def _options(config):
    quick = config.getoption("--bench-quick")
    device = config.getoption("--bench-device") or pb.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # the device fixture skips these cases with the reason
    return quick, device


def _prune_cases(quick, device):
    """(shape, dtype, batch, mode, provider, skip reason or None)."""
    provs = pb.providers(device)
    combos = []
    if quick:
        combos += [(pb.HEADLINE, "fp32", 1, m) for m in pb.MODES]
        combos += [("vit-s16-224", "bf16", 1, "fwdbwd"), ("video-b-8x14x14", "fp32", 1, "fwdbwd")]
    else:
        head = pb.batches(device, quick, headline=True)
        combos += [(pb.HEADLINE, "fp32", b, m) for b in head for m in pb.MODES]
        for shape in pb.SHAPES:
            for dt in pb.DTYPES:
                for b in pb.batches(device, quick, headline=False):
                    if shape == pb.HEADLINE and dt == "fp32" and b in head:
                        continue
                    combos += [(shape, dt, b, m) for m in pb.MODES]
    max_b = max(pb.batches(device, quick, headline=False))
    cases = []
    for shape, dt, b, mode in combos:
        for prov in provs:
            skip = None
            if prov in pb.COMPILED:
                # inductor needs 7-20 s per static graph on 2 busy CPU cores: the compile provider
                # gets the headline shape at every batch, the other shapes at the largest batch
                # (fp32 only on CPU).
                if quick:
                    skip = "quick mode: no torch.compile (its first compile alone takes ~20 s here)"
                elif shape != pb.HEADLINE and (b != max_b or (device == "cpu" and dt != "fp32")):
                    skip = ("torch.compile off the headline shape: largest batch only"
                            + (", fp32 only on CPU" if device == "cpu" else ""))
            cases.append((shape, dt, b, mode, prov, skip))
    return cases


def pytest_generate_tests(metafunc):
    quick, device = _options(metafunc.config)
    if metafunc.function.__name__ == "test_prune":
        params = []
        for shape, dt, b, mode, prov, skip in _prune_cases(quick, device):
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            params.append(pytest.param(shape, dt, b, mode, prov, marks=marks,
                                       id=f"{shape}-{dt}-B{b}-{mode}-{prov}"))
        metafunc.parametrize("shape,dtype,batch,mode,provider", params)
    elif metafunc.function.__name__ == "test_zsweep":
        zs = (0.3, 0.7) if quick else Z_SWEEP
        params = [pytest.param(z, prov, id=f"z{z}-{prov}") for z in zs for prov in pb.providers(device)
                  if not (quick and prov in pb.COMPILED)]
        metafunc.parametrize("z,provider", params)


def _run(benchmark, device, suite, shape_name, dtype_name, batch, mode, provider, z):
    shape = pb.SHAPES[shape_name]
    x, f = pb.inputs(shape, pb.DTYPES[dtype_name], batch, device)
    keep = reference.keep_count(shape.num_tokens, z, shape.prefix)
    kept_tokens = shape.prefix + keep

    if provider == pb.FLOOR:
        g = torch.randn(batch, kept_tokens, shape.channels, device=device, dtype=x.dtype)
        fwd = lambda: pb.floor_fwd(x, f, kept_tokens)  # noqa: E731
        bwd = lambda: pb.floor_bwd(g, shape.num_tokens)  # noqa: E731
        target = {"fwd": fwd, "bwd": bwd, "fwdbwd": lambda: (fwd(), bwd())}[mode]
    else:
        fn = pb.prune_fn(provider, shape, z)
        if mode == "fwd":
            target = lambda: fn(x, f)  # noqa: E731
        else:
            xr = x.detach().requires_grad_()
            out = fn(xr, f)
            g = torch.randn_like(out)
            if mode == "bwd":
                target = lambda: torch.autograd.grad(out, xr, g, retain_graph=True)  # noqa: E731
            else:
                target = lambda: torch.autograd.grad(fn(xr, f), xr, g)  # noqa: E731

    timed = pb.Timed(target, device)
    for _ in range(2):  # warm-up outside the timer: torch.compile, allocator, caches
        timed()
    pb.sync(device)
    timed.event_times_s.clear()

    benchmark.group = f"{suite} {shape_name} {dtype_name} B={batch} z={z} {mode}"
    benchmark.extra_info.update(
        suite=suite, shape=shape_name, dtype=dtype_name, batch=batch, mode=mode, z=z,
        provider=provider, device=device, num_tokens=shape.num_tokens, channels=shape.channels,
        kept_tokens=kept_tokens,
    )
    benchmark(timed)
    if timed.event_median_s() is not None:
        benchmark.extra_info["event_median_s"] = timed.event_median_s()


def test_prune(benchmark, device, shape, dtype, batch, mode, provider):
    _run(benchmark, device, "prune", shape, dtype, batch, mode, provider, Z)


def test_zsweep(benchmark, device, quick, z, provider):
    """Forward at several keep ratios, ViT-B/16-224 fp32 at one batch."""
    batch = 1 if quick else (256 if device == "cuda" else 16)
    _run(benchmark, device, "zsweep", pb.HEADLINE, "fp32", batch, "fwd", provider, z)
