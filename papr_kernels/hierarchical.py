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
-0.0 == 0.0, NaN last), computed by the backend's prune kernel (below).

The indices of a row must be unique (select's are): the scatters are plain writes (no
accumulation, no atomics) and each op's backward is another of these ops, so double backward works.

Every backend of `papr_kernels.backends` runs them: `select` is the backend's prune kernel on a
one-channel, zero-stride token tensor (the scores and the ranking are the prune op's; the gather
moves k floats), and the row ops are the backend's `gather_rows` / `scatter_rows` /
`scatter_back` (the plain-PyTorch versions are in `papr_kernels.reference`). `backend=None`
picks the fastest that can run, as `prune` does.
"""
import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

from . import backends, reference, validation

__all__ = ["select", "keep_count", "gather_rows", "scatter_back", "scatter_rows"]


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
    # A range check on a CUDA tensor would synchronise, and under torch.compile it would break
    # the graph on a data-dependent branch; there the kernels guard themselves (cpp checks every
    # index, cuda asserts, triton masks; torch's indexing raises).
    if indices.device.type == "cpu" and indices.numel() > 0 and \
            not torch.compiler.is_compiling():
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
           order: str = "score", *, backend: Optional[str] = None) -> torch.Tensor:
    """The kept positions (B, k), int64, of the (H, W) grid, k = int(H*W*z) clamped to [1, H*W].

    Scores are SPEC's: the float32 channel mean of f (B, K, h, w) resized bicubic to (H, W),
    ranked in SPEC's total order. `order="score"` returns them in rank order, "spatial" ascending;
    z = 1 returns every position in ascending order, as `prune` does.
    The result carries no gradient. Call it once per stage and reuse it for all the stage's blocks.
    """
    validation.check_features(f, ranks=(4,))
    grid = _check_grid(grid)
    z = validation.check_z(z)
    align_corners = validation._check_flag("align_corners", align_corners)
    if order not in validation.ORDERS:
        raise ValueError(f"order must be one of {validation.ORDERS}, got {order!r}")
    k = keep_count(grid, z)
    impl = backends.resolve(backend, f.device.type)
    if f.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.int64, device=f.device)
    num_positions = grid[0] * grid[1]
    if k == num_positions:                       # z == 1: every position, as prune's arange(N)
        return torch.arange(num_positions, device=f.device).expand(f.shape[0], -1).contiguous()
    plan = validation.Plan(num_tokens=num_positions, num_prefix_tokens=0, grid=grid, keep=k,
                           align_corners=align_corners, order=order, identity=False)
    tokens = torch.zeros((), dtype=torch.float32, device=f.device).expand(
        f.shape[0], num_positions, 1)            # the prune kernel's x, one channel, no memory
    with torch.no_grad():
        return impl.forward(tokens, f.detach(), plan)[1]


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
    impl = backends.resolve(backend, x.device.type, backends.ROW_OPS)
    return _GatherRows.apply(x, indices, impl)


def scatter_rows(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor, *,
                 backend: Optional[str] = None) -> torch.Tensor:
    """A zero tensor shaped like `like` ((B, N, C) or (B, H, W, C)) holding `values` (B, k, C)
    at the kept positions. `like` only gives the shape. Differentiable in values."""
    n = _check_tokens("like", like)
    _check_values(values, indices, like, "like")
    _check_indices(indices, like.shape[0], n, like.device, "like")
    impl = backends.resolve(backend, like.device.type, backends.ROW_OPS)
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
    impl = backends.resolve(backend, x.device.type, backends.ROW_OPS)
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
