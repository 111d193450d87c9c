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

The glue of a pruned block, for inference (outside SPEC; the patched timm models use it):

    m    = proposal_map(f)                        # once per forward: f's float64 channel mean
    idx  = select(m, (H, W), z, order="spatial")  # per stage, without re-reading f
    row_of = kept_row_map(idx, (H, W))            # per stage: each position's kept row or -1
    rows = gather_layer_norm(x, idx, weight, bias, eps)   # gather + LayerNorm, (B, k, C)
    y    = masked_residual(shortcut, idx, values, gamma, row_of=row_of)
           # ConvNeXt: shortcut + gamma * values at the kept positions, 0 elsewhere

A backend with a fused kernel runs it in one pass (`triton`: both; `cpp`: masked_residual);
elsewhere, and whenever autograd records or autocast is on, they are the composition of the
row ops above (`papr_kernels.reference` states it once). The ops that write every position
(`scatter_rows`, out-of-place `scatter_back`, `masked_residual`) take the stage's `row_of`
(optional): the kernels that read a map (the backend's ROW_MAP_OPS) then look each position's
kept row up instead of building the map per call; the other backends ignore it.
"""
from typing import Optional, Sequence

import torch

from . import api, backends, reference, spec

__all__ = ["select", "gather_rows", "scatter_back", "scatter_rows", "proposal_map",
           "kept_row_map", "gather_layer_norm", "masked_residual"]


def select(f: torch.Tensor, grid: Sequence[int], z: float, align_corners: bool = True,
           order: str = "score", *, backend: Optional[str] = None) -> torch.Tensor:
    """The kept positions (B, k), int64, of the (H, W) grid, k = int(H*W*z) clamped to [1, H*W].

    Scores are SPEC's (the channel mean of f (B, K, h, w) resized bicubic to (H, W), float64
    rounded once to float32), ranked in SPEC's total order. `order="score"` returns them in rank
    order, "spatial" ascending; keeping every position returns them in ascending order, as
    `prune` does at z = 1. The result carries no gradient. Call it once per stage and reuse it
    for all the stage's blocks.
    """
    plan = spec.check_select_args(f, grid, z, align_corners, order)
    impl = backends.resolve(backend, f.device.type)
    tokens = torch.zeros((), dtype=torch.float32, device=f.device).expand(
        f.shape[0], plan.num_tokens, 1)          # the prune kernel's x, one channel, no memory
    with torch.no_grad():
        return api.run(tokens, f, plan, impl)[1]


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
        like = grad_rows.new_empty(()).expand(ctx.shape)      # the shape, no memory
        return _ScatterRows.apply(grad_rows, indices, like, ctx.impl, None), None, None


class _ScatterRows(torch.autograd.Function):
    # `like` is a tensor, not a shape tuple: torch.jit.trace records tensor arguments of a
    # Function but fails on traced sizes passed as plain ints ("unordered_map::at").
    @staticmethod
    def forward(ctx, values, indices, like, impl, row_of):
        ctx.save_for_backward(indices)
        ctx.impl = impl
        return impl.scatter_rows(values, indices, tuple(like.shape),
                                 **_map_kwarg(impl, "scatter_rows", row_of))

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        return _GatherRows.apply(grad_out, indices, ctx.impl), None, None, None, None


class _ScatterBack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, values, impl, row_of):
        ctx.save_for_backward(indices)
        ctx.impl = impl
        return impl.scatter_back(x, indices, values, False,
                                 **_map_kwarg(impl, "scatter_back", row_of))

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[2]:
            grad_values = _GatherRows.apply(grad_out, indices, ctx.impl)
        return grad_out, None, grad_values, None, None


def _map_kwarg(impl, op: str, row_of: Optional[torch.Tensor]) -> dict:
    """`row_of=` for a backend whose `op` reads the kept-row map; nothing for the others."""
    if row_of is None or op not in getattr(impl, "ROW_MAP_OPS", ()):
        return {}
    return {"row_of": row_of}


# ---------------------------------------------------------------------------------------------
# Public ops


def gather_rows(x: torch.Tensor, indices: torch.Tensor, *, backend: Optional[str] = None
                ) -> torch.Tensor:
    """The rows of x at the kept positions: (B, k, C).

    x is (B, N, C) or channels-last (B, H, W, C) (any strides, positions row-major over (H, W));
    indices (B, k) int64, unique per row. Differentiable in x (backward: a scatter, no atomics).
    """
    spec.check_rows("x", x)
    spec.check_indices(indices, x, "x")
    impl = backends.resolve(backend, x.device.type, backends.ROW_OPS)
    return _GatherRows.apply(x, indices, impl)


def scatter_rows(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor, *,
                 row_of: Optional[torch.Tensor] = None, backend: Optional[str] = None
                 ) -> torch.Tensor:
    """A zero tensor shaped like `like` ((B, N, C) or (B, H, W, C)) holding `values` (B, k, C)
    at the kept positions. `like` only gives the shape; `row_of`, if given, is
    `kept_row_map(indices, grid)`. Differentiable in values."""
    spec.check_rows("like", like)
    spec.check_values(values, indices, like, "like")
    spec.check_indices(indices, like, "like")
    spec.check_row_map(row_of, like)
    impl = backends.resolve(backend, like.device.type, backends.ROW_OPS)
    return _ScatterRows.apply(values, indices, like, impl, row_of)


def scatter_back(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, *,
                 inplace: bool = False, row_of: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> torch.Tensor:
    """x with `values` (B, k, C) added at the kept positions: out[b, i] = x[b, i] + values[b, j]
    for i = indices[b, j]; the other positions are x's. One gather and one plain write (indices
    are unique: no accumulation, no atomics). Differentiable in x and values.

    `inplace=True` writes into x (only allowed when autograd does not record the op).
    `row_of`, if given, is `kept_row_map(indices, grid)` (read by the out-of-place kernel).
    """
    spec.check_rows("x", x)
    spec.check_values(values, indices, x, "x")
    spec.check_indices(indices, x, "x")
    spec.check_row_map(row_of, x)
    impl = backends.resolve(backend, x.device.type, backends.ROW_OPS)
    if spec.check_flag("inplace", inplace):
        _check_writable(x, values)
        out = impl.scatter_back(x, indices, values, True)
        if not torch.compiler.is_compiling() and not x.is_inference():
            # A kernel outside autograd's view (cpp) leaves x's version as it was: bump it, so
            # that a backward needing x's old values raises as after any in-place op.
            torch.autograd.graph.increment_version(x)
        return out
    return _ScatterBack.apply(x, indices, values, impl, row_of)


def _check_writable(x: torch.Tensor, values: torch.Tensor) -> None:
    """What torch refuses for an in-place write into x, refused before any kernel runs."""
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
        raise ValueError("inplace must be False when x or values requires grad")
    if torch.compiler.is_compiling():
        return
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("inplace=True cannot write into x, an inference tensor, outside "
                         "torch.inference_mode")
    if torch._debug_has_internal_overlap(x) == 1:
        raise ValueError("inplace=True cannot write into x: several of its elements share "
                         "memory (an expanded view)")
    if _byte_ranges_meet(x, values):
        raise ValueError("inplace=True cannot write into x while reading values from the same "
                         "memory (values is a view of x): pass values that do not alias x")


def _byte_ranges_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of a and b intersect (conservative: interleaved views meet)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t):   # torch's strides are >= 0
        extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


# ---------------------------------------------------------------------------------------------
# Fused glue of a pruned block (inference; differentiable through the composition above)


def proposal_map(f: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """f's float64 channel mean (B, 1, h, w), without gradient: `select(proposal_map(f), ...)`
    equals `select(f, ...)` bit for bit on the same backend, and reads B*h*w values instead of
    f's B*K*h*w (one map per forward for every stage). The backend computes the mean as its
    `prune` does (the compiled ones in their one summation order, so the map, and the kept
    positions, are the same on CPU and GPU); the mean of one float64 channel is exact."""
    spec.check_features(f, ranks=(4,))
    impl = backends.resolve(backend, f.device.type)
    with torch.no_grad():
        return impl.channel_mean(f.detach())


def kept_row_map(indices: torch.Tensor, grid: Sequence[int], *,
                 backend: Optional[str] = None) -> torch.Tensor:
    """Each position's kept row: (B, H*W) int32, row_of[b, p] = j where indices[b, j] == p,
    -1 at the pruned positions (a (B, N, C) tensor's grid is (1, N)). Build it once per stage,
    next to `select`, and pass it (`row_of=`) to the stage's dense ops: the Triton kernels then
    look a position's row up instead of building the map on every call. The backend's kernel
    (`triton`: a fill and one scatter launch) or `reference.kept_row_map`: the same map; an
    index outside [0, H*W) is skipped, as the row kernels skip it."""
    height, width = spec.check_grid(grid)
    spec.check_indices(indices, _shape_only(indices, (height, width)), "the grid")
    impl = backends.resolve(backend, indices.device.type, backends.ROW_OPS)
    build = getattr(impl, "kept_row_map", reference.kept_row_map)
    with torch.no_grad():
        return build(indices, height * width)


def _shape_only(indices, grid) -> torch.Tensor:
    """A (B, H, W, 1) tensor without memory: what `spec.check_indices` checks indices against."""
    is_tensor = isinstance(indices, torch.Tensor)
    batch = indices.shape[0] if is_tensor and indices.dim() == 2 else 0
    device = indices.device if is_tensor else None
    return torch.zeros((), device=device).expand(batch, *grid, 1)


def _records(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fused_kernel(impl, name: str, x: torch.Tensor, values=None, params=()):
    """The backend's fused kernel `name`, or None where the composition must run: the backend
    has none, autograd records, autocast is on, or the tensors are not what the kernel takes
    (one dtype and device, per-channel params (C,))."""
    kernel = getattr(impl, name, None)
    given = [t for t in (x, values, *params) if t is not None]
    if kernel is None or _records(*given) or torch.is_autocast_enabled(x.device.type):
        return None
    if any(t.dtype != x.dtype or t.device != x.device for t in given):
        return None
    if any(p is not None and tuple(p.shape) != (x.shape[-1],) for p in params):
        return None   # a scalar gamma: torch's broadcasting
    return kernel


def _differentiable_ops(impl, row_of=None):
    def gather(x, indices):
        return _GatherRows.apply(x, indices, impl)

    def scatter(values, indices, shape):
        return _ScatterRows.apply(values, indices, values.new_empty(()).expand(shape), impl,
                                  row_of)

    return dict(gather=gather, scatter=scatter)


def gather_layer_norm(x: torch.Tensor, indices: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], eps: float, *,
                      backend: Optional[str] = None) -> torch.Tensor:
    """`F.layer_norm(gather_rows(x, indices), (C,), weight, bias, eps)`: (B, k, C), the kept
    rows normalized over their channels (x as for `gather_rows`). Fused: one read of the kept
    rows, one write. The fused kernel's statistics sum in another order than torch's, so its
    rows agree with torch's within float rounding (a few ULP), not bit for bit."""
    spec.check_rows("x", x)
    spec.check_indices(indices, x, "x")
    spec.check_channel_param("weight", weight, x, "x")
    spec.check_channel_param("bias", bias, x, "x")
    eps = spec.check_eps(eps)
    impl = backends.resolve(backend, x.device.type, backends.ROW_OPS)
    kernel = _fused_kernel(impl, "gather_layer_norm", x, params=(weight, bias))
    if kernel is None:
        return reference.gather_layer_norm(x, indices, weight, bias, eps,
                                           gather=_differentiable_ops(impl)["gather"])
    return kernel(x, indices, weight, bias, eps)


def masked_residual(shortcut: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                    gamma: Optional[torch.Tensor] = None, *, row_of: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """ConvNeXt's pruned block output, a new contiguous tensor of shortcut's shape ((B, N, C) or
    (B, H, W, C), any strides): `values[b, j] * gamma + shortcut[b, p]` at p = indices[b, j]
    (the product rounded first, as torch rounds the two ops), zero at every other position;
    gamma is None, (C,) or a scalar. Fused (one dtype, gamma (C,) or None): one pass writing
    the output once. `row_of`, if given, is `kept_row_map(indices, grid)`."""
    spec.check_rows("shortcut", shortcut)
    spec.check_indices(indices, shortcut, "shortcut")
    spec.check_row_map(row_of, shortcut)
    spec.check_values(values, indices, shortcut, "shortcut", same_dtype=False)  # (autocast)
    spec.check_channel_param("gamma", gamma, shortcut, "shortcut", scalar=True)
    impl = backends.resolve(backend, shortcut.device.type, backends.ROW_OPS)
    kernel = _fused_kernel(impl, "masked_residual", shortcut, values, params=(gamma,))
    if kernel is None:
        return reference.masked_residual(shortcut, indices, values, gamma,
                                         **_differentiable_ops(impl, row_of))
    return kernel(shortcut, indices, values, gamma,
                  **_map_kwarg(impl, "masked_residual", row_of))
