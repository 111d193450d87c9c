"""PaPr patch pruning in plain PyTorch: the executable form of SPEC.md.

Every other backend is tested against this module, so it favours plain, obviously correct code
over speed. The four steps of the method are separate functions:

    scores  = significance(f, grid)          # channel mean, resized to the token grid
    k       = keep_count(n, z, P)            # int(n * z) on the full token count, clamped
    indices = top_k(scores, k, order)        # SPEC's total order, top k
    out     = gather(x, indices, P)          # prefix tokens, then the kept patch tokens

and `scatter` is the gradient of `gather`. The row ops of the hierarchical models
(`gather_rows`, `scatter_rows`, `scatter_back`) follow, then the glue of a pruned block they
compose (`gather_layer_norm`, `masked_residual`), which the fused kernels must match.
"""
import math
import struct
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn.functional as F

from . import spec
from .spec import keep_count  # noqa: F401  (step 2 of the method, defined with the checks)


def significance(f: torch.Tensor, grid: Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """Per-patch significance (B, prod(grid)) in float32.

    The proposal features are averaged over channels, then resized to the token grid: bicubic
    (A = -0.75, clamped border taps) for images (B, K, h, w), trilinear for video (B, K, t, h, w).
    Both steps run in float64 (`significance64`) and the result is rounded once to float32
    (SPEC, semantics 1), so every backend gets the same scores and a constant region of f ties
    exactly.
    """
    return significance64(f, grid, align_corners).float()


def significance64(f: torch.Tensor, grid: Sequence[int], align_corners: bool = True
                   ) -> torch.Tensor:
    """The float64 scores (B, prod(grid)) of `significance`, before their rounding to float32
    (`papr_kernels.testing` bounds how far another summation order can move them).
    Under torch.onnx.export the resize is written as float64 taps (`_resize_by_taps`), so the
    ONNX graph keeps SPEC's float64 scores (ONNX Runtime's Resize has no float64 kernel).
    """
    mode = "bicubic" if f.dim() == 4 else "trilinear"
    channel_mean = proposal_map(f)
    if onnx_exporting():
        resized = _resize_by_taps(channel_mean, tuple(grid), align_corners, mode == "bicubic")
    elif channel_mean.device.type not in ("cpu", "meta") and \
            tuple(grid) == tuple(channel_mean.shape[2:]):
        # At an unchanged size CUDA's interpolate copies, while SPEC's formula (the CPU kernel's)
        # still weighs the zero-weight taps, so an inf spreads NaN to its neighbours (0 * inf).
        # This small (B, 1, h, w) map is resized on the CPU to stay identical on every device.
        resized = F.interpolate(channel_mean.cpu(), size=tuple(grid), mode=mode,
                                align_corners=align_corners).to(channel_mean.device)
    else:
        resized = F.interpolate(channel_mean, size=tuple(grid), mode=mode,
                                align_corners=align_corners)
    return resized.flatten(1)


def proposal_map(f: torch.Tensor) -> torch.Tensor:
    """The float64 channel mean (B, 1, ...) of f: step one of `significance`. A one-channel
    float64 f is its own map, so `significance(proposal_map(f), grid)` is `significance(f, grid)`
    bit for bit (the mean of one float64 value is exact)."""
    return f.double().mean(dim=1, keepdim=True)


def onnx_exporting() -> bool:
    """True inside torch.onnx.export (is_exporting first: a module flag, the cheaper check;
    torch.compile folds both to False)."""
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


def _taps(in_size: int, out_size: int, align_corners: bool, cubic: bool):
    """[(indices, weights)] per tap, each (out_size,): where and how much of the input each
    output position reads along one dimension, as PyTorch's CPU kernel computes them
    (ATen/native/UpSample.h: source index, floorf, clamped lambda, clamped taps; float64)."""
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    else:
        scale = in_size / out_size
    taps = [([], []) for _ in range(4 if cubic else 2)]
    for i in range(out_size):
        # ATen's CPU build fuses scale * (i + 0.5) - 0.5 into one FMA: the exact value, rounded once
        real = scale * i if align_corners else float(Fraction(scale) * (i + 0.5) - Fraction(1, 2))
        if not cubic and real < 0:
            real = 0.0
        floor32 = math.floor(struct.unpack("f", struct.pack("f", real))[0])   # C floorf
        index = min(int(floor32), in_size - 1)
        t = min(max(real - index, 0.0), 1.0)
        if cubic:
            a, t2 = -0.75, 1.0 - t
            weights = (((a * (t + 1.0) - 5 * a) * (t + 1.0) + 8 * a) * (t + 1.0) - 4 * a,
                       ((a + 2) * t - (a + 3)) * t * t + 1,
                       ((a + 2) * t2 - (a + 3)) * t2 * t2 + 1,
                       ((a * (t2 + 1.0) - 5 * a) * (t2 + 1.0) + 8 * a) * (t2 + 1.0) - 4 * a)
            indices = [max(min(index - 1 + j, in_size - 1), 0) for j in range(4)]
        else:
            weights = (1.0 - t, t)
            indices = (index, index + (1 if index < in_size - 1 else 0))
        for (tap_indices, tap_weights), j, w in zip(taps, indices, weights):
            tap_indices.append(j)
            tap_weights.append(w)
    return taps


def _resize_by_taps(m: torch.Tensor, size: Sequence[int], align_corners: bool,
                    cubic: bool) -> torch.Tensor:
    """F.interpolate(m, size, mode="bicubic" / "trilinear") of float64 m (B, 1, *spatial) as
    index_select / mul / add, used under torch.onnx.export (exported as Gather / Mul / Add):
    ONNX Runtime's Resize has no float64 kernel, and this keeps SPEC's float64 scores. Same
    taps, weights and summation order as PyTorch's CPU kernel (every tap weighed, zero weights
    included), separable, last dimension first; equal up to float64 rounding (FMA), which the
    rounding to float32 erases."""
    for dim in reversed(range(2, m.dim())):
        shape = [1] * m.dim()
        shape[dim] = size[dim - 2]
        out = None
        for indices, weights in _taps(m.shape[dim], size[dim - 2], align_corners, cubic):
            term = m.index_select(dim, torch.tensor(indices, device=m.device)) * torch.tensor(
                weights, dtype=m.dtype, device=m.device).view(shape)
            out = term if out is None else out + term
        m = out
    return m


def _total_order(scores: torch.Tensor) -> torch.Tensor:
    """scores with NaN as -inf and -0.0 as +0.0: SPEC's ranking key."""
    return torch.where(scores.isnan(), float("-inf"), scores) + 0.0  # -0.0 + 0.0 == +0.0


def rank(scores: torch.Tensor) -> torch.Tensor:
    """All patch indices (B, N) by descending score: SPEC's total order.

    Ties go to the lower index (stable sort), -0.0 equals +0.0 and NaN ranks as -inf.
    """
    return torch.argsort(_total_order(scores), dim=1, descending=True, stable=True)


def top_k(scores: torch.Tensor, k: int, order: str = "score") -> torch.Tensor:
    """The k kept patch indices (B, k), int64, in rank order or ascending ("spatial").

    Under `torch.onnx.export` the ranking is `torch.topk`, exported as ONNX TopK (largest,
    sorted), whose specification puts equal values in ascending index order: SPEC's tie rule
    (the stable sort of `rank` has no ONNX translation). Eager results never take this branch.
    """
    if onnx_exporting():
        indices = torch.topk(_total_order(scores), k, dim=1, largest=True, sorted=True).indices
    else:
        indices = rank(scores)[:, :k]
    if order == "spatial":
        indices = indices.sort(dim=1).values
    return indices


def gather(x: torch.Tensor, indices: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The prefix tokens of x, then its patch tokens at `indices` (B, k)."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    patches = x[:, num_prefix_tokens:][rows, indices]
    return torch.cat([x[:, :num_prefix_tokens], patches], dim=1)


def scatter(grad_out: torch.Tensor, indices: torch.Tensor, num_tokens: int,
            num_prefix_tokens: int) -> torch.Tensor:
    """Gradient of `gather` for x: grad_out's rows put back in place, zeros at pruned tokens.

    The indices of a row are unique, so this is a plain write, not an accumulation.
    """
    batch, _, channels = grad_out.shape
    grad_x = grad_out.new_zeros(batch, num_tokens, channels)
    grad_x[:, :num_prefix_tokens] = grad_out[:, :num_prefix_tokens]
    rows = torch.arange(batch, device=grad_out.device)[:, None]
    grad_x[:, num_prefix_tokens:][rows, indices] = grad_out[:, num_prefix_tokens:]
    return grad_x


def all_indices(batch: int, num_patches: int, device) -> torch.Tensor:
    """The indices of z == 1: arange(N) for every row (SPEC, semantics 5)."""
    return torch.arange(num_patches, device=device).expand(batch, -1).contiguous()


def prune(x, f, z, *, num_prefix_tokens=1, grid=None, align_corners=True, order="score",
          return_indices=False):
    """SPEC's `prune` in plain PyTorch, differentiable through ordinary autograd."""
    plan = spec.check_prune_args(x, f, z, num_prefix_tokens, grid, align_corners, order)
    if plan.identity:
        out, indices = x, all_indices(x.shape[0], plan.num_patches, x.device)
    else:
        indices = top_k(significance(f, plan.grid, align_corners), plan.keep, order)
        out = gather(x, indices, num_prefix_tokens)
    return (out, indices) if return_indices else out


# Row ops of the hierarchical models (Swin, ConvNeXt: papr_kernels.hierarchical). x is (B, N, C)
# or channels-last (B, H, W, C) with positions row-major over (H, W); indices (B, k) are unique
# per row, so the scatters are plain writes (index_copy_), never accumulations.

def _flat_rows(indices: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Row numbers of the kept positions in the (B*N, C) view."""
    offsets = torch.arange(indices.shape[0], device=indices.device)[:, None] * num_positions
    return (indices + offsets).reshape(-1)


def _position_index(x_shape, indices: torch.Tensor):
    """Advanced-index tuple addressing positions `indices` of a (B, N, C) or (B, H, W, C) tensor
    (split into row and column for 4-D, so a strided x, e.g. NCHW seen through permute, is never
    copied)."""
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None]
    if len(x_shape) == 3:
        return rows, indices
    width = x_shape[2]
    return rows, torch.div(indices, width, rounding_mode="floor"), indices % width


def kept_row_map(indices: torch.Tensor, num_positions: int) -> torch.Tensor:
    """The inverse of `indices`: (B, N) int32, row_of[b, p] = j where indices[b, j] == p, -1 at
    the pruned positions. An index outside [0, N) is skipped (written to a spare last element,
    so nothing lands out of bounds); a repeated position gets one of its rows."""
    batch = indices.shape[0]
    inside = ((indices >= 0) & (indices < num_positions)).reshape(-1)
    targets = torch.where(inside, _flat_rows(indices, num_positions), batch * num_positions)
    rows = torch.arange(indices.shape[1], dtype=torch.int32, device=indices.device)
    row_of = torch.full((batch * num_positions + 1,), -1, dtype=torch.int32,
                        device=indices.device)
    row_of.scatter_(0, targets, rows.expand(indices.shape).reshape(-1))
    return row_of[:-1].view(batch, num_positions)


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, k, C): the rows of x at the kept positions."""
    if x.is_contiguous():
        rows = _flat_rows(indices, math.prod(x.shape[1:-1]))
        return x.reshape(-1, x.shape[-1]).index_select(0, rows).view(*indices.shape, x.shape[-1])
    return x[_position_index(x.shape, indices)]


def scatter_rows(values: torch.Tensor, indices: torch.Tensor, shape) -> torch.Tensor:
    """A zero tensor of `shape` holding `values` (B, k, C) at the kept positions."""
    out = values.new_zeros(shape)
    rows = _flat_rows(indices, math.prod(shape[1:-1]))
    out.view(-1, shape[-1]).index_copy_(0, rows, values.reshape(-1, shape[-1]))
    return out


def scatter_back(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 inplace: bool = False) -> torch.Tensor:
    """x with `values` added at the kept positions (into x itself when `inplace`)."""
    out = x if inplace and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
    rows = _flat_rows(indices, math.prod(x.shape[1:-1]))
    out2d = out.view(-1, x.shape[-1])
    out2d.index_copy_(0, rows, out2d.index_select(0, rows) + values.reshape(-1, x.shape[-1]))
    if inplace and out is not x:
        x.copy_(out)
        return x
    return out


# The glue of a pruned block, composed of the row ops (the Triton backend fuses each into one
# pass). `gather` / `scatter` default to the functions above; papr_kernels.hierarchical passes
# its differentiable ones when autograd records.

def gather_layer_norm(x: torch.Tensor, indices: torch.Tensor, weight, bias, eps: float,
                      gather=gather_rows) -> torch.Tensor:
    """(B, k, C): LayerNorm over the channels of the rows of x at the kept positions."""
    return F.layer_norm(gather(x, indices), (x.shape[-1],), weight, bias, eps)


def masked_residual(shortcut: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, gamma,
                    gather=gather_rows, scatter=scatter_rows) -> torch.Tensor:
    """ConvNeXt's pruned block output, contiguous with shortcut's shape: `values * gamma +
    shortcut` at the kept positions (gamma None: `values + shortcut`), zero at the pruned ones.
    Rounded as those two torch ops round (the product first), in their promoted dtype."""
    rows = (values if gamma is None else values * gamma) + gather(shortcut, indices)
    return scatter(rows, indices, tuple(shortcut.shape))
