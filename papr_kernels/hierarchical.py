"""PaPr for hierarchical models (Swin, ConvNeXt): the three operators a pruned block needs.

Hierarchical models cannot drop tokens (windows and convolutions need the dense grid), so the
published method keeps the dense map and runs only the per-token part of each block (Swin's MLP
branch, ConvNeXt's pointwise convs) on the kept positions:

    idx  = select(f, (H, W), z)             # once per stage: top int(H*W*z) positions, (B, k)
    rows = gather_rows(x, idx)              # (B, k, C) from x (B, H, W, C) or (B, N, C)
    x    = scatter_back(x, idx, branch(rows))   # x with x[idx] + values at the kept positions
    y    = scatter_rows(values, idx, like=x)    # zeros with values at the kept positions

Positions are row-major over the (H, W) grid. `select` uses SPEC's scores (float32 channel mean
of f, bicubic, align_corners) and SPEC's total order (descending, ties to the lower index,
-0.0 == 0.0, NaN last), reusing `papr_kernels.reference`.

The indices of a row must be unique (select's are): the scatters are plain writes (no
accumulation, no atomics) and each op's backward is another of these ops, so double backward works.

Implementations are pluggable: `register_backend(name, impl, devices)` adds an object with
`gather_rows(x, indices)`, `scatter_rows(values, indices, shape)` and
`scatter_back(x, indices, values, inplace)` working on (B, N, C) or (B, H, W, C); the autograd
Functions below call whichever implementation was chosen, "torch" being the fallback.
"""
import math
import numbers
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import reference, validation

__all__ = ["select", "keep_count", "gather_rows", "scatter_back", "scatter_rows",
           "register_backend", "available_backends"]


# ---------------------------------------------------------------------------------------------
# Validation


def _shape(t: torch.Tensor) -> str:
    return validation._shape(t)


def _check_grid(grid) -> Tuple[int, int]:
    try:
        grid = tuple(grid)
    except TypeError:
        raise TypeError(f"grid must be a tuple of two ints (H, W), got {type(grid).__name__}") \
            from None
    if len(grid) != 2 or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool)
                                 for g in grid):
        raise ValueError(f"grid must be two ints (H, W), got {grid}")
    if min(grid) < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    return int(grid[0]), int(grid[1])


def _check_tokens(name: str, x) -> int:
    """x is (B, N, C) or (B, H, W, C); returns N."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{name} must be (B, N, C) or channels-last (B, H, W, C), "
                         f"got shape {_shape(x)}")
    if any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"{name} must have positions and channels (no zero-sized dimension "
                         f"after the batch), got shape {_shape(x)}")
    return math.prod(x.shape[1:-1])


def _check_indices(indices, batch: int, num_positions: int, device: torch.device,
                   what: str) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if indices.dim() != 2:
        raise ValueError(f"indices must be 2-D (B, k), got shape {_shape(indices)}")
    if indices.shape[0] != batch:
        raise ValueError(f"indices must have the batch size of {what} ({batch}), "
                         f"got {indices.shape[0]}")
    if indices.shape[1] > num_positions:
        raise ValueError(f"indices must have at most N = {num_positions} columns (one per kept "
                         f"position), got {indices.shape[1]}")
    if indices.device != device:
        raise ValueError(f"indices must be on the device of {what} ({device}), "
                         f"got {indices.device}")
    # A range check on a CUDA tensor would synchronise; there the indexing kernel reports it.
    if indices.device.type == "cpu" and indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_positions:
            raise ValueError(f"indices must lie in [0, N) = [0, {num_positions}), "
                             f"got values in [{lo}, {hi}]")


# ---------------------------------------------------------------------------------------------
# select


def keep_count(grid: Sequence[int], z: float) -> int:
    """Kept positions of an (H, W) grid at keep ratio z: int(H*W*z), clamped to [1, H*W].

    Hierarchical models have no prefix tokens, so this is SPEC's `keep_count` with P = 0.
    """
    num_positions = math.prod(grid)
    return reference.keep_count(num_positions, z, 0)


def select(f: torch.Tensor, grid: Sequence[int], z: float, align_corners: bool = True,
           order: str = "score") -> torch.Tensor:
    """The kept positions (B, k), int64, of the (H, W) grid, k = int(H*W*z) clamped to [1, H*W].

    Scores are SPEC's: the float32 channel mean of f (B, K, h, w) resized bicubic to (H, W),
    ranked in SPEC's total order. `order="score"` returns them in rank order, "spatial" ascending.
    The result carries no gradient. Call it once per stage and reuse it for all the stage's blocks.
    """
    validation.check_features(f, ranks=(4,))
    grid = _check_grid(grid)
    z = validation.check_z(z)
    align_corners = validation._check_flag("align_corners", align_corners)
    if order not in validation.ORDERS:
        raise ValueError(f"order must be one of {validation.ORDERS}, got {order!r}")
    k = keep_count(grid, z)
    if f.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.int64, device=f.device)
    with torch.no_grad():
        scores = reference.significance(f.detach(), grid, align_corners)
        return reference.select(scores, k, order)


# ---------------------------------------------------------------------------------------------
# The torch implementation


def _batch_rows(indices: torch.Tensor) -> torch.Tensor:
    return torch.arange(indices.shape[0], device=indices.device)[:, None]


def _index(x_shape, indices: torch.Tensor):
    """Advanced-index tuple addressing positions `indices` of an (B, N, C) or (B, H, W, C) tensor.

    For (B, H, W, C) it splits the flat index into (row, column), so x need not be contiguous
    (e.g. an NCHW tensor seen channels-last through permute(0, 2, 3, 1)) and is never copied.
    """
    rows = _batch_rows(indices)
    if len(x_shape) == 3:
        return rows, indices
    width = x_shape[2]
    return rows, torch.div(indices, width, rounding_mode="floor"), indices % width


def _flat_rows(indices: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Row numbers of the kept positions in the (B*N, C) view."""
    offsets = torch.arange(indices.shape[0], device=indices.device)[:, None] * num_positions
    return (indices + offsets).reshape(-1)


class TorchOps:
    """Plain PyTorch. Dense (contiguous) tensors: index_select / index_copy_ on the (B*N, C) row
    view (one gather, one plain write: indices are unique, nothing accumulates); any other
    strides (e.g. an NCHW tensor seen channels-last): advanced indexing and index_put without
    accumulation."""

    @staticmethod
    def unavailable_reason(device_type: str) -> Optional[str]:
        return None

    @staticmethod
    def gather_rows(x, indices):
        if x.is_contiguous():
            rows = _flat_rows(indices, math.prod(x.shape[1:-1]))
            return x.reshape(-1, x.shape[-1]).index_select(0, rows).view(*indices.shape, -1)
        return x[_index(x.shape, indices)]

    @staticmethod
    def scatter_rows(values, indices, shape):
        out = values.new_zeros(shape)
        rows = _flat_rows(indices, math.prod(shape[1:-1]))
        out.view(-1, shape[-1]).index_copy_(0, rows, values.reshape(-1, shape[-1]))
        return out

    @staticmethod
    def scatter_back(x, indices, values, inplace=False):
        out = x if inplace and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
        rows = _flat_rows(indices, math.prod(x.shape[1:-1]))
        out2d = out.view(-1, x.shape[-1])
        out2d.index_copy_(0, rows, out2d.index_select(0, rows) + values.reshape(-1, x.shape[-1]))
        if inplace and out is not x:
            x.copy_(out)
            return x
        return out


_BACKENDS: Dict[str, Tuple[object, Tuple[str, ...]]] = {}
_AUTO: Dict[str, list] = {}


def register_backend(name: str, impl, devices: Tuple[str, ...], auto: bool = True) -> None:
    """Add an implementation of the hierarchical ops; `auto` lets backend=None pick it on
    `devices` (later registrations are preferred over earlier ones, "torch" is the fallback)."""
    _BACKENDS[name] = (impl, tuple(devices))
    if auto:
        for d in devices:
            _AUTO.setdefault(d, []).insert(0, name)


register_backend("torch", TorchOps, ("cpu", "cuda", "meta"), auto=False)


def available_backends(device_type: str = "cpu"):
    return [n for n, (impl, devs) in _BACKENDS.items()
            if device_type in devs and impl.unavailable_reason(device_type) is None]


def _resolve(backend: Optional[str], device_type: str):
    if backend is None:
        for name in _AUTO.get(device_type, []):
            impl, _ = _BACKENDS[name]
            if impl.unavailable_reason(device_type) is None:
                return impl
        return TorchOps
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)} or None, got {backend!r}")
    impl, devices = _BACKENDS[backend]
    reason = (f"runs on {'/'.join(devices)} tensors only" if device_type not in devices
              else impl.unavailable_reason(device_type))
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run hierarchical ops on {device_type} "
                           f"tensors here: {reason}")
    return impl


# ---------------------------------------------------------------------------------------------
# Autograd: each op's backward is one of the other ops, so every order of derivative works.


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, impl):
        ctx.save_for_backward(indices)
        ctx.shape, ctx.impl = x.shape, impl
        return impl.gather_rows(x, indices)

    @staticmethod
    def backward(ctx, grad_rows):
        (indices,) = ctx.saved_tensors
        return _ScatterRows.apply(grad_rows, indices, ctx.shape, ctx.impl), None, None


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, shape, impl):
        ctx.save_for_backward(indices)
        ctx.impl = impl
        return impl.scatter_rows(values, indices, shape)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        return _GatherRows.apply(grad_out, indices, ctx.impl), None, None, None


class _ScatterBack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, values, impl):
        ctx.save_for_backward(indices)
        ctx.impl = impl
        return impl.scatter_back(x, indices, values, False)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[2]:
            grad_values = _GatherRows.apply(grad_out, indices, ctx.impl)
        return grad_out, None, grad_values, None


# ---------------------------------------------------------------------------------------------
# Public ops


def gather_rows(x: torch.Tensor, indices: torch.Tensor, *, backend: Optional[str] = None
                ) -> torch.Tensor:
    """The rows of x at the kept positions: (B, k, C).

    x is (B, N, C) or channels-last (B, H, W, C) (any strides, positions row-major over (H, W));
    indices (B, k) int64, unique per row. Differentiable in x (backward: a scatter, no atomics).
    """
    n = _check_tokens("x", x)
    _check_indices(indices, x.shape[0], n, x.device, "x")
    impl = _resolve(backend, x.device.type)
    return _GatherRows.apply(x, indices, impl)


def scatter_rows(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor, *,
                 backend: Optional[str] = None) -> torch.Tensor:
    """A zero tensor shaped like `like` ((B, N, C) or (B, H, W, C)) holding `values` (B, k, C)
    at the kept positions. `like` only gives the shape. Differentiable in values."""
    n = _check_tokens("like", like)
    _check_values(values, indices, like, "like")
    _check_indices(indices, like.shape[0], n, like.device, "like")
    impl = _resolve(backend, like.device.type)
    return _ScatterRows.apply(values, indices, tuple(like.shape), impl)


def scatter_back(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, *,
                 inplace: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """x with `values` (B, k, C) added at the kept positions: out[b, i] = x[b, i] + values[b, j]
    for i = indices[b, j]; the other positions are x's. One gather and one plain write (indices
    are unique: no accumulation, no atomics). Differentiable in x and values.

    `inplace=True` writes into x (only allowed when autograd does not record the op).
    """
    n = _check_tokens("x", x)
    _check_values(values, indices, x)
    _check_indices(indices, x.shape[0], n, x.device, "x")
    impl = _resolve(backend, x.device.type)
    if inplace:
        if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
            raise ValueError("inplace must be False when x or values requires grad")
        return impl.scatter_back(x, indices, values, True)
    return _ScatterBack.apply(x, indices, values, impl)


def _check_values(values, indices, x, name: str = "x") -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    k = indices.shape[1] if isinstance(indices, torch.Tensor) and indices.dim() == 2 else None
    expected = (x.shape[0], k, x.shape[-1])
    if values.dim() != 3 or values.shape[0] != x.shape[0] or values.shape[2] != x.shape[-1] or (
            k is not None and values.shape[1] != k):
        raise ValueError(f"values must be (B, k, C) = {expected} to match {name} and indices, "
                         f"got shape {_shape(values)}")
    if values.dtype != x.dtype:
        raise TypeError(f"values must have the dtype of {name} ({x.dtype}), got {values.dtype}")
    if values.device != x.device:
        raise ValueError(f"values must be on the device of {name} ({x.device}), "
                         f"got {values.device}")
