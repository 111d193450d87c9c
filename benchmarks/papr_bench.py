"""Shared pieces of the benchmark suite: shapes, providers, floors, timing, the machine slug.

Imported by the pytest files in this folder and by `report.py`; kept free of pytest imports so
that `python benchmarks/papr_bench.py` prints the machine slug (used by `make bench`).
"""
import functools
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import papr_kernels
from papr_kernels import reference


# --------------------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    name: str
    num_patches: int             # N
    channels: int                # C
    prefix: int                  # P (class token)
    f_shape: Tuple[int, ...]     # proposal features without the batch: (K, h, w) or (K, t, h, w)
    grid: Optional[Tuple[int, ...]] = None

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.prefix


# MobileOne-S0's last stage: 1024 channels at 1/32 of the image (7x7 at 224 px, 12x12 at 384 px).
# Video: 8x14x14 tubelet tokens (VideoMAE ViT-B), a 3-D ConvNet proposal of 192 x 8 x 7 x 7.
SHAPES: Dict[str, Shape] = {s.name: s for s in [
    Shape("vit-s16-224", 196, 384, 1, (1024, 7, 7)),
    Shape("vit-b16-224", 196, 768, 1, (1024, 7, 7)),
    Shape("vit-l16-224", 196, 1024, 1, (1024, 7, 7)),
    Shape("vit-s16-384", 576, 384, 1, (1024, 12, 12)),
    Shape("vit-b16-384", 576, 768, 1, (1024, 12, 12)),
    Shape("vit-l16-384", 576, 1024, 1, (1024, 12, 12)),
    Shape("video-b-8x14x14", 1568, 768, 0, (192, 8, 7, 7), grid=(8, 14, 14)),
]}
HEADLINE = "vit-b16-224"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "bwd", "fwdbwd")


def batches(device: str, quick: bool, headline: bool) -> List[int]:
    """Batch sizes: the headline shape gets a sweep (the plot), the others both ends."""
    if quick:
        return [1]
    if device == "cuda":
        return [1, 4, 16, 64, 256, 1024] if headline else [1, 64, 1024]
    return [1, 4, 16, 64] if headline else [1, 64]


# ------------------------------------------------------------------------------------- providers

EAGER, COMPILE, FLOOR = "eager", "compile", "floor"
USER_COMPILE = "user-compile"   # torch.compile of `user_prune`, the user's own eager code
COMPILED = (COMPILE, USER_COMPILE)


def backend_providers(device: str) -> List[str]:
    """Every backend that can run on `device`, discovered at run time (triton on CPU only runs
    under the interpreter, which is not a kernel worth timing)."""
    names = papr_kernels.available_backends(device)
    if device == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def providers(device: str) -> List[str]:
    return [EAGER, COMPILE, USER_COMPILE] + backend_providers(device) + [FLOOR]


def allow_recompiles() -> None:
    """Every (model, shape, dtype, batch, grad mode) is its own static graph: allow them all, so
    that no case silently falls back to eager after dynamo's default limit of 8."""
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    allow_recompiles()
    return torch.compile(reference.prune, dynamic=False)


def prune_fn(provider: str, shape: Shape, z: float) -> Callable:
    """fn(x, f) -> pruned tokens, for a real provider (not the floor)."""
    kw = dict(num_prefix_tokens=shape.prefix, grid=shape.grid)
    if provider == EAGER:
        return lambda x, f: reference.prune(x, f, z, **kw)
    if provider == COMPILE:
        compiled = _compiled_reference()
        return lambda x, f: compiled(x, f, z, **kw)
    if provider == USER_COMPILE:
        compiled = compiled_user_prune()
        return lambda x, f: compiled(x, f, z, shape.prefix, shape.grid)
    return lambda x, f: papr_kernels.prune(x, f, z, backend=provider, **kw)


def user_prune(x: torch.Tensor, f: torch.Tensor, z: float, num_prefix_tokens: int = 1,
               grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """PaPr as a user writes it in plain PyTorch (fp32 scores, no float64, no checks): what
    `torch.compile` competes with (issue 14). Not SPEC-exact: ties and rounding may differ."""
    batch, num_tokens, channels = x.shape
    num_patches = num_tokens - num_prefix_tokens
    side = int(num_patches ** 0.5)
    mode = "bicubic" if f.dim() == 4 else "trilinear"   # video: (B, K, t, h, w)
    scores = F.interpolate(f.mean(dim=1, keepdim=True), size=grid or (side, side),
                           mode=mode, align_corners=True).flatten(1)
    keep = min(max(int(num_tokens * z), 1), num_patches)
    indices = scores.topk(keep, dim=1).indices
    patches = x[:, num_prefix_tokens:].gather(1, indices[..., None].expand(-1, -1, channels))
    return torch.cat([x[:, :num_prefix_tokens], patches], dim=1)


@functools.lru_cache(maxsize=None)
def compiled_user_prune():
    allow_recompiles()
    return torch.compile(user_prune, dynamic=False)


# ------------------------------------------------------------------------------------ the floor
# The bytes the fused op cannot avoid. Forward: read f once, read and write the output-sized
# block of x. Backward: read grad_out, write the whole grad_x (kept rows copied, the rest zero).

def floor_fwd(x: torch.Tensor, f: torch.Tensor, kept_tokens: int):
    return x.narrow(1, 0, kept_tokens).clone(), f.sum()


def floor_bwd(grad_out: torch.Tensor, num_tokens: int):
    batch, kept_tokens, channels = grad_out.shape
    grad_x = grad_out.new_empty(batch, num_tokens, channels)
    grad_x.narrow(1, 0, kept_tokens).copy_(grad_out)
    grad_x.narrow(1, kept_tokens, num_tokens - kept_tokens).zero_()
    return grad_x


# ---------------------------------------------------------------------------------------- inputs

_INPUT_CACHE: Dict[tuple, tuple] = {}


def inputs(shape: Shape, dtype: torch.dtype, batch: int, device: str):
    """(x, f) for a case; the last one is cached (generating 300 MB of randn is slow on CPU)."""
    key = (shape.name, dtype, batch, device)
    if key not in _INPUT_CACHE:
        _INPUT_CACHE.clear()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, shape.num_tokens, shape.channels, generator=gen, dtype=torch.float32)
        f = torch.randn(batch, *shape.f_shape, generator=gen, dtype=torch.float32)
        _INPUT_CACHE[key] = (x.to(device=device, dtype=dtype), f.to(device=device, dtype=dtype))
    return _INPUT_CACHE[key]


F_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def with_f_layout(f: torch.Tensor, layout: str) -> torch.Tensor:
    """f in `layout`: "contiguous" (torch.randn's), or "channels_last" (what papr_kernels'
    proposal returns for an image network)."""
    return f.contiguous(memory_format=F_LAYOUTS[layout])


# ---------------------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_per_call(fn: Callable, calls: int, device: str = "cpu") -> float:
    """Wall seconds per call of `calls` calls issued back to back (synchronised before and after
    on CUDA: what a Python loop sees)."""
    return issue_and_wall_per_call(fn, calls, device)[1]


def issue_and_wall_per_call(fn: Callable, calls: int, device: str = "cpu") -> Tuple[float, float]:
    """(issue, wall) seconds per call of `calls` calls issued back to back: issue until the last
    call returns (the host's own cost; on CUDA the GPU may still be running them), wall until the
    device is done too (the larger of the host's and the GPU's time)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    sync(device)
    return (issued - start) / calls, (time.perf_counter() - start) / calls


def calls_per_block(fn: Callable, target_s: float, device: str = "cpu") -> int:
    """How many calls of fn (one timed) fill a block of `target_s` seconds: blocks long enough
    for the clock, short enough that many interleaved rounds fit."""
    return max(1, int(target_s / max(time_per_call(fn, 1, device), 1e-7)))


class Timed:
    """Wraps the timed callable. On CUDA it synchronises inside the call (so pytest-benchmark's
    wall clock covers the kernels) and records CUDA events around it; `event_median_s` is the
    device-side median the report prefers. On CPU it is the callable itself."""

    def __init__(self, fn: Callable, device: str):
        self.fn, self.device, self.event_times_s = fn, device, []

    def __call__(self):
        if self.device != "cuda":
            return self.fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.fn()
        end.record()
        end.synchronize()
        self.event_times_s.append(start.elapsed_time(end) * 1e-3)
        return out

    def event_median_s(self) -> Optional[float]:
        return statistics.median(self.event_times_s) if self.event_times_s else None


# --------------------------------------------------------------------------------------- machine

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug(device: Optional[str] = None) -> str:
    """`cpu-2core-amd-epyc`, or `cuda-nvidia-h100-80gb-hbm3` when benchmarking a GPU."""
    device = device or default_device()
    if device == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(0))
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{cores}core-{_slug(cpu_model())}"


def machine_description(device: str) -> Dict[str, object]:
    import os
    desc = {
        "slug": machine_slug(device),
        "device": device,
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "papr_kernels": papr_kernels.__version__,
        "backends": backend_providers(device),
    }
    if device == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(0)
    return desc


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    print(machine_slug())
