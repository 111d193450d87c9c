"""The "cpp" (CPU) and "cuda" backends: the C++/CUDA extension (csrc/).

`papr_kernels._C` registers `torch.ops.papr_kernels.prune_forward/prune_backward` and the row ops
of the hierarchical models `gather_rows/put_rows_/masked_residual` (schemas in csrc/ops/) with
their CPU kernels; `papr_kernels._C_cuda`, when built, adds the CUDA kernels (loaded only by a CUDA
build of torch: it links libtorch_cuda). Both use only torch's stable ABI and CPython's limited
API, so one build loads into every torch >= 2.10 (`build_info()["stable_abi"]`). This module adds
their fake kernels (torch.compile, meta tensors) and adapts them to the backend interface of
backends.py (prune and the row ops `gather_rows`, `scatter_rows`, `scatter_back`; on CPU also the
fused `masked_residual`). It imports without the extension; `unavailable_reason` then says why.
"""
import glob
import json
import os
import warnings
from typing import Optional

import torch

from .. import reference

STABLE_ABI_TARGET = "2.10"   # setup.py's: the oldest torch the extension loads into

try:
    from papr_kernels import _C  # loading the library registers the ops
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # not built (pure-Python install), or a torch older than 2.10
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    _PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if glob.glob(os.path.join(_PACKAGE, "_C.*so")):   # installed, but does not load: say so
        _IMPORT_ERROR += (f" (the extension needs torch >= {STABLE_ABI_TARGET}; this is torch "
                          f"{torch.__version__})")
        warnings.warn(f"papr_kernels: the C++/CUDA extension does not load, so prune runs on "
                      f"the slower backends: {_IMPORT_ERROR}", RuntimeWarning, stacklevel=2)


def build_info() -> Optional[dict]:
    """What the loaded extension was built for, read from the binary itself (setup.py records it):
    `torch` (the version it was compiled against), `stable_abi` (the oldest torch it loads into,
    e.g. "2.10"), `python_abi` ("cp310": abi3, CPython >= 3.10), `cuda` (CUDA toolkit version,
    None without CUDA kernels), `archs` (GPU architectures with SASS, e.g. ["8.0", "9.0"]), `ptx`
    (PTX embedded for the highest one, JIT-compiled by the driver on newer GPUs), `sanitize`.
    None when the extension does not load (or is a build older than this function).
    """
    if _IMPORT_ERROR is not None or not hasattr(_C, "build_info"):
        return None
    return json.loads(_C.build_info())


def cuda_library() -> Optional[str]:
    """The path of the CUDA kernels' library built with the loaded papr_kernels._C (beside it),
    or None (no extension, or built without CUDA: a library left by an earlier build is not
    this build's)."""
    if _IMPORT_ERROR is not None or (build_info() or {}).get("cuda") is None:
        return None
    found = glob.glob(os.path.join(os.path.dirname(_C.__file__), "_C_cuda.*so"))
    return found[0] if found else None


def _load_cuda_kernels() -> Optional[str]:
    """Load the CUDA kernels (they register themselves); None, or why they did not load."""
    if _IMPORT_ERROR is not None:
        return "the extension papr_kernels._C does not load"
    path = cuda_library()
    if path is None:
        return "the extension was built without CUDA kernels (FORCE_CUDA=0 or no nvcc)"
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    try:
        torch.ops.load_library(path)
    except Exception as exc:
        return f"the CUDA kernels do not load ({type(exc).__name__}: {exc})"
    return None


_CUDA_ERROR = _load_cuda_kernels()
_HAS_CUDA_KERNEL = _CUDA_ERROR is None
if _IMPORT_ERROR is None:
    _ns = torch.ops.papr_kernels
    _forward_op = _ns.prune_forward.default
    _backward_op = _ns.prune_backward.default

    @torch.library.register_fake("papr_kernels::prune_forward")
    def _prune_forward_fake(x, f, num_prefix_tokens, grid, keep, align_corners, spatial):
        out = x.new_empty(x.shape[0], num_prefix_tokens + keep, x.shape[2])
        return out, x.new_empty(x.shape[0], keep, dtype=torch.int64)

    @torch.library.register_fake("papr_kernels::prune_backward")
    def _prune_backward_fake(grad_out, indices, num_tokens, num_prefix_tokens):
        return grad_out.new_empty(grad_out.shape[0], num_tokens, grad_out.shape[2])

    _channel_mean_op = _ns.channel_mean.default

    @torch.library.register_fake("papr_kernels::channel_mean")
    def _channel_mean_fake(f):
        return f.new_empty((f.shape[0], 1, *f.shape[2:]), dtype=torch.float64)

    _gather_rows_op = _ns.gather_rows.default
    _put_rows_op = _ns.put_rows_.default

    @torch.library.register_fake("papr_kernels::gather_rows")
    def _gather_rows_fake(x, indices):
        return x.new_empty(x.shape[0], indices.shape[1], x.shape[3])

    @torch.library.register_fake("papr_kernels::put_rows_")
    def _put_rows_fake(out, indices, values, accumulate):
        return None

    _masked_residual_op = _ns.masked_residual.default

    @torch.library.register_fake("papr_kernels::masked_residual")
    def _masked_residual_fake(shortcut, row_of, values, gamma):
        return shortcut.new_empty(shortcut.shape)

    # No autograd kernel on the op itself: the package's PruneFunction (function.py) owns autograd
    # and calls prune_backward; a Python autograd kernel here would cost ~25 us per call at B = 1.


def unavailable_reason(device_type: str) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return f"the C++ extension papr_kernels._C is not built or does not load ({_IMPORT_ERROR})"
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not _HAS_CUDA_KERNEL:
            return _CUDA_ERROR
        if not torch.cuda.is_available():
            return "no CUDA device here"
        return missing_gpu_code(torch.cuda.get_device_capability(), build_info())
    return f"no kernel for {device_type} tensors"


def missing_gpu_code(capability, info: Optional[dict]) -> Optional[str]:
    """None when the CUDA kernels of the build `info` run on a GPU of `capability` (major,
    minor): SASS of the same major and a lower or equal minor, or PTX of an older arch (the
    driver compiles it); else why not (every launch would fail with "no kernel image")."""
    info = info or {}
    archs = sorted(tuple(int(v) for v in a.split(".")) for a in info.get("archs", []))
    major, minor = capability
    if any(a[0] == major and a[1] <= minor for a in archs):
        return None
    if archs and info.get("ptx") and archs[-1] <= (major, minor):
        return None
    built = ", ".join(f"sm_{a}{b}" for a, b in archs) or "no GPU"
    return (f"the CUDA kernels were built for {built}{' + PTX' if info.get('ptx') else ''}"
            f", not for this GPU (sm_{major}{minor}): rebuild with "
            f"TORCH_CUDA_ARCH_LIST={major}.{minor}")


def forward(x, f, plan):
    return _forward_op(x, f, plan.num_prefix_tokens, plan.grid, plan.keep, plan.align_corners,
                       plan.order == "spatial")


def backward(grad_out, indices, plan):
    return _backward_op(grad_out, indices, plan.num_tokens, plan.num_prefix_tokens)


def channel_mean(f):
    """f's float64 channel mean (B, 1, *spatial) in the kernels' summation order."""
    return _channel_mean_op(f)


# ---------------------------------------------------------------------------------------------
# Row ops of the hierarchical models (the interface of backends.ROW_OPS). x is
# (B, N, C) or (B, H, W, C) with any strides; a 3-D x is the grid (B, 1, N, C). Indices (B, k)
# are unique per row; the caller (hierarchical.py) has validated them.


def _grid(x):
    return x.unsqueeze(1) if x.dim() == 3 else x


def gather_rows(x, indices):
    """(B, k, C) contiguous: the rows of x at the positions `indices`."""
    return _gather_rows_op(_grid(x), indices)


def scatter_rows(values, indices, shape):
    """A new contiguous zero tensor of `shape` holding `values` (B, k, C) at `indices`."""
    out = values.new_zeros(shape)
    _put_rows_op(_grid(out), indices, values, False)
    return out


def scatter_back(x, indices, values, inplace=False):
    """x with `values` added at `indices` (rounded like torch's a + b). inplace=False: a new
    contiguous tensor, x unchanged; inplace=True: written into x through its strides."""
    out = x if inplace else x.clone(memory_format=torch.contiguous_format)
    _put_rows_op(_grid(out), indices, values, True)
    return out


# The fused glue of a pruned ConvNeXt block (hierarchical.masked_residual), a CPU kernel only.
ROW_MAP_OPS = ("masked_residual",)


def masked_residual(shortcut, indices, values, gamma, row_of=None):
    """values * gamma + shortcut at `indices`, zero elsewhere: a new contiguous tensor of
    shortcut's shape; `row_of` is the stage's `kept_row_map` (built here when None). On CUDA
    (no kernel) the composition of the row ops."""
    if shortcut.device.type != "cpu":
        return reference.masked_residual(shortcut, indices, values, gamma, gather=gather_rows,
                                         scatter=scatter_rows)
    grid = _grid(shortcut)
    if row_of is None:
        row_of = reference.kept_row_map(indices, grid.shape[1] * grid.shape[2])
    return _masked_residual_op(grid, row_of, values, gamma).view(shortcut.shape)
