"""The "cpp" (CPU) and "cuda" backends: the C++/CUDA extension `papr_kernels._C` (csrc/).

The extension registers `torch.ops.papr_kernels.prune_forward/prune_backward` (schemas in
csrc/ops.cpp, CPU and CUDA kernels); this module adds their fake kernels (torch.compile,
meta tensors) and adapts them to the backend interface of backends.py. It imports
without the extension; `unavailable_reason` then says why.
"""
from typing import Optional

import torch

try:
    from papr_kernels import _C  # noqa: F401  (loading the library registers the ops)
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # not built (pure-Python install), or built against another torch
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_HAS_CUDA_KERNEL = False
if _IMPORT_ERROR is None:
    _ns = torch.ops.papr_kernels
    _forward_op = _ns.prune_forward.default
    _backward_op = _ns.prune_backward.default
    _HAS_CUDA_KERNEL = torch._C._dispatch_has_kernel_for_dispatch_key(
        "papr_kernels::prune_forward", "CUDA")

    @torch.library.register_fake("papr_kernels::prune_forward")
    def _prune_forward_fake(x, f, num_prefix_tokens, grid, keep, align_corners, spatial):
        out = x.new_empty(x.shape[0], num_prefix_tokens + keep, x.shape[2])
        return out, x.new_empty(x.shape[0], keep, dtype=torch.int64)

    @torch.library.register_fake("papr_kernels::prune_backward")
    def _prune_backward_fake(grad_out, indices, num_tokens, num_prefix_tokens):
        return grad_out.new_empty(grad_out.shape[0], num_tokens, grad_out.shape[2])

    # No autograd kernel on the op itself: the package's PruneFunction (function.py) owns autograd
    # and calls prune_backward; a Python autograd kernel here would cost ~25 us per call at B = 1.


def unavailable_reason(device_type: str) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return f"the C++ extension papr_kernels._C is not built or does not load ({_IMPORT_ERROR})"
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not _HAS_CUDA_KERNEL:
            return "the extension was built without CUDA kernels (FORCE_CUDA=0 or no nvcc)"
        if not torch.cuda.is_available():
            return "no CUDA device here"
        return None
    return f"no kernel for {device_type} tensors"


def forward(x, f, plan):
    return _forward_op(x, f, plan.num_prefix_tokens, plan.grid, plan.keep, plan.align_corners,
                       plan.order == "spatial")


def backward(grad_out, indices, plan):
    return _backward_op(grad_out, indices, plan.num_tokens, plan.num_prefix_tokens)
