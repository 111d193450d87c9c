"""Argument checks shared by every backend, run before any kernel (SPEC.md, "Bad input").

`check_prune_args` turns the user's arguments into a `Plan`: the few integers and flags a backend
needs besides the tensors. Backends never see unchecked input.
"""
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

ORDERS = ("score", "spatial")


class Plan(NamedTuple):
    """What `prune` will do, derived once from checked arguments."""

    num_tokens: int            # n: tokens per row of x, prefix included
    num_prefix_tokens: int     # P: leading tokens that are never pruned
    grid: Tuple[int, ...]      # (H, W) or (T, H, W), prod(grid) == n - P
    keep: int                  # k: patch tokens kept
    align_corners: bool
    order: str                 # "score" or "spatial"
    identity: bool             # z == 1: x is returned unchanged

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix_tokens


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_floating_tensor(name: str, t) -> None:
    """TypeError unless `t` is a tensor of a floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, "
                        f"float64), got {t.dtype}")


def check_features(f, ranks=(4, 5)) -> None:
    """Proposal features: a floating tensor (B, K, h, w) (or (B, K, t, h, w)) with no empty
    dimension after the batch."""
    check_floating_tensor("f", f)
    if f.dim() not in ranks:
        shapes = " or ".join({4: "4-D (B, K, h, w)", 5: "5-D (B, K, t, h, w)"}[r] for r in ranks)
        raise ValueError(f"f must be {shapes}, got shape {_shape(f)}")
    if any(s == 0 for s in f.shape[1:]):
        raise ValueError(f"f must have channels and a spatial extent (no zero-sized dimension "
                         f"after the batch), got shape {_shape(f)}")


def _check_tensors(x, f) -> None:
    check_floating_tensor("x", x)
    check_floating_tensor("f", f)
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, n, C), got shape {_shape(x)}")
    check_features(f)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must have tokens and channels (B, n > 0, C > 0), got shape {_shape(x)}")
    if f.shape[0] != x.shape[0]:
        raise ValueError(f"f must have the batch size of x ({x.shape[0]}), got {f.shape[0]}")
    if f.device != x.device:
        raise ValueError(f"f must be on the device of x ({x.device}), got {f.device}")


def check_z(z) -> float:
    """z as a float, or TypeError/ValueError when it is not a keep ratio in (0, 1]."""
    if isinstance(z, bool) or not isinstance(z, numbers.Real):
        raise TypeError(f"z must be a real number (the keep ratio), got {type(z).__name__}")
    z = float(z)
    if not math.isfinite(z) or not 0.0 < z <= 1.0:
        raise ValueError(f"z must be a keep ratio in (0, 1], got {z}")
    return z


def _check_prefix(num_prefix_tokens, n: int) -> int:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens must be in [0, n) = [0, {n}) so that at least one "
                         f"patch token remains, got {num_prefix_tokens}")
    return int(num_prefix_tokens)


def _check_grid(grid: Optional[Sequence[int]], num_patches: int, f_dim: int) -> Tuple[int, ...]:
    rank = f_dim - 2
    if grid is None:
        if rank == 3:
            raise ValueError("grid (T, H, W) is required when f is 5-D (video)")
        side = int(round(num_patches ** 0.5))  # = isqrt for perfect squares; traceable with dynamic=True
        if side * side != num_patches:
            raise ValueError(f"grid is required: the {num_patches} patch tokens do not form a "
                             f"square grid")
        return (side, side)
    try:
        grid = tuple(grid)
    except TypeError:
        raise TypeError(f"grid must be a tuple of ints, got {type(grid).__name__}") from None
    if len(grid) != rank or not all(
            isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in grid):
        shape = "(H, W)" if rank == 2 else "(T, H, W)"
        raise ValueError(f"grid must be {rank} ints {shape} for {f_dim}-D f, got {grid}")
    grid = tuple(int(g) for g in grid)
    if min(grid) < 1 or math.prod(grid) != num_patches:
        raise ValueError(f"grid {grid} must be positive and hold the {num_patches} patch tokens "
                         f"(prod(grid) == n - num_prefix_tokens)")
    return grid


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_prune_args(x, f, z, num_prefix_tokens=1, grid=None, align_corners=True,
                     order="score") -> Plan:
    """Check `prune`'s arguments; raise TypeError/ValueError naming the argument, or return a Plan."""
    from . import reference  # keep_count lives with the rest of SPEC's semantics

    _check_tensors(x, f)
    z = check_z(z)
    n = x.shape[1]
    prefix = _check_prefix(num_prefix_tokens, n)
    grid = _check_grid(grid, n - prefix, f.dim())
    align_corners = _check_flag("align_corners", align_corners)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    keep = reference.keep_count(n, z, prefix)
    return Plan(n, prefix, grid, keep, align_corners, order, identity=(z == 1.0))


def all_patch_indices(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Indices returned with z == 1: arange(N) for every row."""
    return torch.arange(plan.num_patches, device=x.device).expand(x.shape[0], -1).contiguous()
