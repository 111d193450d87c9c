"""The backend registry: which implementation of `prune` (and of the row ops) runs for given tensors.

A backend is a module, imported on first use, that follows `PruneBackend` (and, to serve the
hierarchical models, `RowBackend`). Auto selection (`backend=None`) takes, among the backends
listed for the tensors' device type, the first that can run; `PAPR_KERNELS_BACKEND` overrides it.
Whether a backend can run on a device type is decided here only (`unavailable_reason`).
"""
import importlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .reference import onnx_exporting
from .spec import Plan

ENV_VAR = "PAPR_KERNELS_BACKEND"


class PruneBackend(Protocol):
    """What a backend module provides for `prune` (papr_kernels.api)."""

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        """None when it can run on tensors of `device_type`, else why not (a sentence)."""

    def forward(self, x: torch.Tensor, f: torch.Tensor, plan: Plan
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(out, indices) for checked arguments with z < 1 and B > 0; f carries no gradient."""

    def backward(self, grad_out: torch.Tensor, indices: torch.Tensor, plan: Plan) -> torch.Tensor:
        """grad_x: grad_out's rows written at the prefix and at `indices` (unique: no atomics),
        zeros elsewhere."""

    def channel_mean(self, f: torch.Tensor) -> torch.Tensor:
        """f's float64 channel mean (B, 1, *spatial) as `forward` computes it (the compiled
        backends: papr_core.h's channel_sum order), for checked f without gradient."""


class RowBackend(Protocol):
    """The row ops of the hierarchical models (papr_kernels.hierarchical), over x (B, N, C) or
    channels-last (B, H, W, C) of any strides, with indices (B, k) unique per row and checked."""

    def gather_rows(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B, k, C): the rows of x at `indices`."""

    def scatter_rows(self, values: torch.Tensor, indices: torch.Tensor,
                     shape: Sequence[int]) -> torch.Tensor:
        """Zeros of `shape` holding `values` (B, k, C) at `indices`."""

    def scatter_back(self, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                     inplace: bool) -> torch.Tensor:
        """x + values at `indices` (written into x when `inplace`)."""


@dataclass(frozen=True)
class Backend:
    name: str
    module: str                  # import path of the module implementing it
    devices: Tuple[str, ...]     # device types it supports
    description: str


# Registration order is the auto-selection preference, fastest first.
_REGISTRY: Dict[str, Backend] = {}
_AUTO_ORDER: Dict[str, List[str]] = {}   # device type -> backend names, preferred first
_MODULES: Dict[str, object] = {}
_IMPORT_ERRORS: Dict[str, str] = {}


def register(backend: Backend, auto_for: Tuple[str, ...] = ()) -> None:
    """Add a backend; `auto_for` lists the device types on which auto selection may pick it."""
    _REGISTRY[backend.name] = backend
    for device_type in auto_for:
        _AUTO_ORDER.setdefault(device_type, []).append(backend.name)


def names() -> List[str]:
    return list(_REGISTRY)


def _load(name: str):
    if name not in _MODULES and name not in _IMPORT_ERRORS:
        try:
            _MODULES[name] = importlib.import_module(_REGISTRY[name].module)
        except Exception as exc:  # a missing extension or triton must not break the package
            _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
    return _MODULES.get(name)


def _constant_result(fn):
    """`torch.compiler.assume_constant_result(fn)` without importing torch._dynamo, which would
    make `import papr_kernels` 1.5 s slower: on torch <= 2.14 that decorator only sets this
    mark (tests/test_api.py checks it against torch's); a newer torch gets its own decorator."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) > (2, 14):
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


# torch.compile evaluates it once while tracing and bakes the answer in (it imports modules,
# which dynamo cannot trace): prune() compiles with fullgraph=True even on a cold start.
@_constant_result
def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None when backend `name` can run on `device_type`, else a sentence saying why not."""
    backend = _REGISTRY[name]
    if device_type not in backend.devices:
        return f"runs on {'/'.join(backend.devices)} tensors only, not {device_type}"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device here"
    module = _load(name)
    if module is None:
        return f"cannot be imported ({_IMPORT_ERRORS[name]})"
    return module.unavailable_reason(device_type)


def available(device_type: Optional[str] = None) -> List[str]:
    """Backends that can run on `device_type`, or on any device of this machine when None."""
    device_types = [device_type] if device_type else _local_device_types()
    return [name for name in _REGISTRY
            if any(unavailable_reason(name, d) is None for d in device_types)]


def _local_device_types() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# CPython keeps os.environ's values in the dict `_data` (encoded keys), updated by every
# assignment to os.environ: reading it is ~50 ns, os.environ.get of an unset variable ~700 ns
# (a KeyError raised and caught), ~5% of a B = 1 prune on CPU.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def env_backend() -> Optional[str]:
    """PAPR_KERNELS_BACKEND as it is now, None when unset or empty."""
    if type(_ENVIRON_DATA) is dict and _ENV_KEY is not None:
        value = _ENVIRON_DATA.get(_ENV_KEY)
        return os.environ.decodevalue(value) if value else None
    return os.environ.get(ENV_VAR) or None


ROW_OPS = ("gather_rows", "scatter_rows", "scatter_back")


def _missing(module, ops: Tuple[str, ...]) -> List[str]:
    return [op for op in ops if not hasattr(module, op)]


def pick(name: Optional[str], device_type: str, ops: Tuple[str, ...] = ()) -> str:
    """The name of the backend that runs `prune` (and the functions `ops`, e.g. ROW_OPS) for
    tensors on `device_type`: `name`, else PAPR_KERNELS_BACKEND, else auto selection (which
    skips backends without `ops`). Raises saying why when the one asked for cannot run.

    Under torch.onnx.export it is always "torch": the reference's aten ops translate to standard
    ONNX ops (reference.significance / top_k say how), the extension's custom ops have none."""
    if onnx_exporting():
        name = "torch"
    from_env = False
    if name is None:
        name = env_backend()
        from_env = name is not None
    if name is None:
        for candidate in _AUTO_ORDER.get(device_type, []) + ["torch"]:
            if unavailable_reason(candidate, device_type) is None and not (
                    ops and _missing(_MODULES[candidate], ops)):
                return candidate
        raise RuntimeError(f"no papr_kernels backend can run on {device_type} tensors")
    if name not in _REGISTRY:
        if from_env:
            raise ValueError(f"the environment variable {ENV_VAR} must be one of {names()} or "
                             f"unset, got {name!r}")
        raise ValueError(f"backend must be one of {names()} or None, got {name!r}")
    asked = f"{ENV_VAR}={name}" if from_env else f"backend {name!r}"
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise RuntimeError(f"{asked} cannot run on {device_type} tensors here: {reason}")
    missing = ops and _missing(_MODULES[name], ops)
    if missing:
        raise RuntimeError(f"{asked} has no {', '.join(missing)} kernel")
    return name


def resolve(name: Optional[str], device_type: str, ops: Tuple[str, ...] = ()):
    """The module of the backend `pick` names (a PruneBackend, and a RowBackend with ROW_OPS)."""
    return _MODULES[pick(name, device_type, ops)]


def prune_backend(name: Optional[str], device: torch.device):
    """`resolve(name, device.type)` for `prune`, remembered per (name, device,
    PAPR_KERNELS_BACKEND): pick's walk and `device.type` (~0.8 us by itself) cost ~3 us of a
    B = 1 prune on CPU. Availability is fixed per process (what `unavailable_reason` assumes for
    torch.compile too); a name that cannot run raises every time (it is never stored, so the
    memo only holds registered names, a few per device); under torch.compile and ONNX export
    pick decides every time."""
    if not (name is None or type(name) is str) or torch.compiler.is_compiling() or \
            onnx_exporting():
        return resolve(name, device.type)
    key = (name, device, env_backend())
    module = _PRUNE_BACKENDS.get(key)
    if module is None:
        module = _PRUNE_BACKENDS[key] = resolve(name, device.type)
    return module


_PRUNE_BACKENDS: Dict[Tuple[Optional[str], torch.device, Optional[str]], object] = {}


# Auto preference: CUDA tensors -> triton, then cuda; CPU tensors -> cpp; torch is the fallback.
register(Backend("triton", "papr_kernels.ops.triton", ("cuda", "cpu"),
                 "fused Triton kernels (CPU tensors only under TRITON_INTERPRET=1)"),
         auto_for=("cuda",))
register(Backend("cuda", "papr_kernels.ops.extension", ("cuda",),
                 "CUDA kernel of the C++ extension"), auto_for=("cuda",))
register(Backend("cpp", "papr_kernels.ops.extension", ("cpu",),
                 "C++ CPU kernel of the extension"), auto_for=("cpu",))
register(Backend("torch", "papr_kernels.ops.torch", ("cpu", "cuda", "meta"),
                 "pure-PyTorch reference (SPEC's executable form)"))
