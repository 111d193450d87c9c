"""SPEC's arguments: every check and the `Plan` a backend receives (SPEC.md, "Bad input").

Everything a user passes goes through a function of this module before any kernel runs, and
each misuse raises TypeError/ValueError naming the argument. `check_prune_args` turns `prune`'s
arguments into a `Plan`: the few integers and flags a backend needs besides the tensors.
The hierarchical ops' checks (positions grid, row tensors, indices, values) live here too.
"""
import math
import numbers
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

ORDERS = ("score", "spatial")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Plan(NamedTuple):
    """What `prune` will do, derived once from checked arguments."""

    num_tokens: int            # n: tokens per row of x, prefix included
    num_prefix_tokens: int     # P: leading tokens that are never pruned
    grid: Tuple[int, ...]      # token grid (H, W) or (T, H, W), prod(grid) == n - P
    keep: int                  # k: patch tokens kept
    align_corners: bool
    order: str                 # "score" or "spatial"
    identity: bool             # z == 1: x is returned unchanged, indices are arange(N)

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix_tokens


def keep_count(n: int, z: float, num_prefix_tokens: int = 1) -> int:
    """Number of patch tokens kept out of `n` tokens (prefix tokens included) at keep ratio `z`.

    As in the published code, `int(n * z)` counts the prefix tokens: ViT-B/16 at 224 px
    (n = 197) with z = 0.5 keeps 98 patches plus the class token. Hierarchical models pass
    n = H * W and no prefix.
    """
    return min(max(int(n * z), 1), n - num_prefix_tokens)


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


# ---------------------------------------------------------------------------------------------
# Scalars


def check_z(z) -> float:
    """z as a float, or TypeError/ValueError when it is not a keep ratio in (0, 1].

    Written with comparisons only (no math.isfinite), so that torch.compile traces it even when
    z is symbolic (`dynamic=True`): NaN fails `0 < z`, inf fails `z <= 1`.
    """
    if type(z) is not float and (  # float first: the ABC checks cost ~1 us a call
            isinstance(z, bool) or not isinstance(z, (numbers.Real, torch.SymFloat))):
        raise TypeError(f"z must be a real number (the keep ratio), got {type(z).__name__}")
    if not (0.0 < z <= 1.0):
        raise ValueError(f"z must be a keep ratio in (0, 1], got {z}")
    return float(z)


def check_order(order) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(name: str, value, low: int = 0) -> int:
    if type(value) is not int and (isinstance(value, bool) or
                                   not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_prefix(num_prefix_tokens, n: int) -> int:
    num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens)
    if not num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens must be in [0, n) = [0, {n}) so that at least one "
                         f"patch token remains, got {num_prefix_tokens}")
    return num_prefix_tokens


def _ints(name: str, value, rank: int, shape: str) -> Tuple[int, ...]:
    """`value` as a tuple of `rank` ints."""
    try:
        value = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints {shape}, got {type(value).__name__}") \
            from None
    if len(value) != rank or not all(
            isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in value):
        raise ValueError(f"{name} must be {rank} ints {shape}, got {value}")
    return tuple(int(g) for g in value)


def check_token_grid(grid: Optional[Sequence[int]], num_patches: int, f_dim: int
                     ) -> Tuple[int, ...]:
    """The token grid of `prune`: (H, W) for 4-D f, (T, H, W) for 5-D f, holding N patches."""
    rank = f_dim - 2
    if grid is None:
        if rank == 3:
            raise ValueError("grid (T, H, W) is required when f is 5-D (video)")
        if isinstance(num_patches, torch.Tensor):   # torch.jit.trace records sizes as tensors
            num_patches = int(num_patches)
        side = int(round(num_patches ** 0.5))  # = isqrt for perfect squares; traceable with dynamic=True
        if side * side != num_patches:
            raise ValueError(f"grid is required: the {num_patches} patch tokens do not form a "
                             f"square grid")
        return (side, side)
    grid = check_grid(grid, rank)
    if math.prod(grid) != num_patches:
        raise ValueError(f"grid {grid} must hold the {num_patches} patch tokens "
                         f"(prod(grid) == n - num_prefix_tokens)")
    return grid


def check_grid(grid, rank: int = 2) -> Tuple[int, ...]:
    """A grid of `rank` positive ints: (H, W) (a hierarchical stage, an image's tokens) or
    (T, H, W) (video tokens)."""
    grid = _ints("grid", grid, rank, "(H, W)" if rank == 2 else "(T, H, W)")
    if min(grid) < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    return grid


def check_keep_count_args(n, z, num_prefix_tokens) -> Tuple[int, float, int]:
    """`keep_count`'s arguments as a user gives them: n tokens, z, the prefix tokens (< n)."""
    n = check_int("n", n, low=1)
    return n, check_z(z), _check_prefix(num_prefix_tokens, n)


# ---------------------------------------------------------------------------------------------
# Tensors


def check_floating_tensor(name: str, t) -> None:
    """TypeError unless `t` is a tensor of one of SPEC's floating dtypes (fp16, bf16, fp32, fp64;
    float8 and other floating types are refused before any kernel sees them)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, "
                        f"float64), got {t.dtype}")


def check_features(f, ranks=(4, 5)) -> None:
    """Proposal features: a floating tensor (B, K, h, w) (or (B, K, t, h, w)) with no empty
    dimension after the batch."""
    check_floating_tensor("f", f)
    if f.dim() not in ranks:
        shapes = " or ".join({4: "4-D (B, K, h, w)", 5: "5-D (B, K, t, h, w)"}[r] for r in ranks)
        raise ValueError(f"f must be {shapes}, got shape {shape_str(f)}")
    if any(s == 0 for s in f.shape[1:]):
        raise ValueError(f"f must have channels and a spatial extent (no zero-sized dimension "
                         f"after the batch), got shape {shape_str(f)}")


def _check_tokens_and_features(x, f) -> None:
    check_floating_tensor("x", x)
    check_floating_tensor("f", f)
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, n, C), got shape {shape_str(x)}")
    check_features(f)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must have tokens and channels (B, n > 0, C > 0), got shape "
                         f"{shape_str(x)}")
    if f.shape[0] != x.shape[0]:
        raise ValueError(f"f must have the batch size of x ({x.shape[0]}), got {f.shape[0]}")
    if f.device != x.device:
        raise ValueError(f"f must be on the device of x ({x.device}), got {f.device}")


def check_prune_args(x, f, z, num_prefix_tokens=1, grid=None, align_corners=True,
                     order="score") -> Plan:
    """Check `prune`'s arguments; raise TypeError/ValueError naming the argument, or return a Plan.

    The Plan of arguments seen before with the same signature (`prune_signature`) comes from a
    cache: the full checks cost ~4 us a call, a large share of a B = 1 prune on CPU (issue 14)."""
    signature = prune_signature(x, f, z, num_prefix_tokens, grid, align_corners, order)
    plan = _PLANS.get(signature) if signature is not None else None
    if plan is None:
        plan = _check_prune_args(x, f, z, num_prefix_tokens, grid, align_corners, order)
        if signature is not None:
            _remember_plan(signature, plan)
    return plan


# Plans of checked signatures. Only arguments that passed every check are ever stored, so a hit
# means the same checks would pass again; a miss runs them all (and raises what they raise).
_PLANS: Dict[tuple, Plan] = {}
_MAX_PLANS = 256


def prune_signature(x, f, z, num_prefix_tokens, grid, align_corners, order) -> Optional[tuple]:
    """Everything `_check_prune_args` reads, as a dict key: the shapes, dtypes and devices of x
    and f and the other arguments. None (no caching) unless every argument has its plain type:
    equal values of different types hash alike (True == 1 == 1.0, (14.0, 14.0) == (14, 14)) but
    are not equally valid. None while torch.compile traces (symbolic shapes, no dict to guard on).
    """
    if (type(x) is not torch.Tensor or type(f) is not torch.Tensor or type(z) is not float
            or type(num_prefix_tokens) is not int or type(align_corners) is not bool
            or type(order) is not str or not (grid is None or _plain_int_tuple(grid))
            or torch.compiler.is_compiling()):
        return None
    return (x.shape, x.dtype, x.device, f.shape, f.dtype, f.device, z, num_prefix_tokens, grid,
            align_corners, order)


def _plain_int_tuple(value) -> bool:
    return type(value) is tuple and all(type(v) is int for v in value)


def _remember_plan(signature: tuple, plan: Plan) -> None:
    if len(_PLANS) >= _MAX_PLANS:  # a new shape every call (e.g. varying batch) stays bounded
        _PLANS.clear()
    _PLANS[signature] = plan


def _check_prune_args(x, f, z, num_prefix_tokens, grid, align_corners, order) -> Plan:
    _check_tokens_and_features(x, f)
    z = check_z(z)
    n = x.shape[1]
    prefix = _check_prefix(num_prefix_tokens, n)
    grid = check_token_grid(grid, n - prefix, f.dim())
    return Plan(n, prefix, grid, keep_count(n, z, prefix), check_flag("align_corners", align_corners),
                check_order(order), identity=z == 1.0)


def check_select_args(f, grid, z, align_corners, order) -> Plan:
    """`hierarchical.select`'s arguments as the Plan of a prune without prefix over (H, W);
    every position kept (k == H * W) counts as z == 1."""
    check_features(f, ranks=(4,))
    grid = check_grid(grid)
    num_positions = grid[0] * grid[1]
    keep = keep_count(num_positions, check_z(z), 0)
    return Plan(num_positions, 0, grid, keep, check_flag("align_corners", align_corners),
                check_order(order), identity=keep == num_positions)


def check_row_map(row_of: Optional[torch.Tensor], like: torch.Tensor) -> None:
    """A given map is int32 (B, N) on like's device; its entries are the caller's (the kernels
    read an entry outside [0, k) as a pruned position)."""
    if row_of is None:
        return
    expected = (like.shape[0], math.prod(like.shape[1:-1]))
    if not isinstance(row_of, torch.Tensor):
        raise TypeError(f"row_of must be a torch.Tensor or None, got {type(row_of).__name__}")
    if row_of.dtype != torch.int32:
        raise TypeError(f"row_of must be int32 (kept_row_map), got {row_of.dtype}")
    if tuple(row_of.shape) != expected or row_of.device != like.device:
        raise ValueError(f"row_of must be (B, N) = {expected} on {like.device} (kept_row_map), "
                         f"got shape {shape_str(row_of)} on {row_of.device}")


def check_rows(name: str, x) -> int:
    """Row-op tensor (B, N, C) or channels-last (B, H, W, C) of a floating dtype; returns N."""
    check_floating_tensor(name, x)
    if x.dim() not in (3, 4):
        raise ValueError(f"{name} must be (B, N, C) or channels-last (B, H, W, C), "
                         f"got shape {shape_str(x)}")
    if any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"{name} must have positions and channels (no zero-sized dimension "
                         f"after the batch), got shape {shape_str(x)}")
    return math.prod(x.shape[1:-1])


def check_channel_param(name: str, p, x, x_name: str, scalar: bool = False) -> None:
    """An optional per-channel parameter of a fused row op (a norm's weight / bias, a layer
    scale): None or a floating (C,) tensor on the device of the row-op tensor `x` (`x_name`);
    with `scalar`, one value for every channel ((), (1,)) too."""
    if p is None:
        return
    check_floating_tensor(name, p)
    if tuple(p.shape) != (x.shape[-1],) and not (scalar and p.numel() == 1 and p.dim() <= 1):
        either = "a scalar, " if scalar else ""
        raise ValueError(f"{name} must be None, {either}or (C,) = ({x.shape[-1]},) to match the "
                         f"channels of {x_name}, got shape {shape_str(p)}")
    if p.device != x.device:
        raise ValueError(f"{name} must be on the device of {x_name} ({x.device}), "
                         f"got {p.device}")


def check_eps(eps) -> float:
    """A norm's epsilon: a finite real number >= 0 (compared, not math.isfinite: under
    torch.compile(dynamic=True) a module's float is symbolic, and math.isfinite of it breaks
    the graph; NaN fails the comparison)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_indices(indices, x, name: str) -> None:
    """Kept positions (B, k) of the row-op tensor `x` (called `name`)."""
    batch, num_positions, device = x.shape[0], math.prod(x.shape[1:-1]), x.device
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if indices.dim() != 2:
        raise ValueError(f"indices must be 2-D (B, k), got shape {shape_str(indices)}")
    if indices.shape[0] != batch:
        raise ValueError(f"indices must have the batch size of {name} ({batch}), "
                         f"got {indices.shape[0]}")
    if indices.shape[1] > num_positions:
        raise ValueError(f"indices must have at most N = {num_positions} columns (one per kept "
                         f"position), got {indices.shape[1]}")
    if indices.device != device:
        raise ValueError(f"indices must be on the device of {name} ({device}), "
                         f"got {indices.device}")
    # A range check on a CUDA tensor would synchronise, and under torch.compile it would break
    # the graph on a data-dependent branch; there the kernels guard themselves (cpp checks every
    # index, cuda and triton mask out-of-range rows; torch's indexing raises).
    if indices.device.type == "cpu" and indices.numel() > 0 and \
            not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_positions:
            raise ValueError(f"indices must lie in [0, N) = [0, {num_positions}), "
                             f"got values in [{lo}, {hi}]")


def check_values(values, indices, x, name: str, same_dtype: bool = True) -> None:
    """Rows (B, k, C) to put at `indices` of the row-op tensor `x` (called `name`), in x's dtype
    unless `same_dtype` is False (an op whose composition promotes, as torch's ops do)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    k = indices.shape[1] if isinstance(indices, torch.Tensor) and indices.dim() == 2 else None
    expected = (x.shape[0], k, x.shape[-1])
    if values.dim() != 3 or values.shape[0] != x.shape[0] or values.shape[2] != x.shape[-1] or (
            k is not None and values.shape[1] != k):
        raise ValueError(f"values must be (B, k, C) = {expected} to match {name} and indices, "
                         f"got shape {shape_str(values)}")
    if same_dtype and values.dtype != x.dtype:
        raise TypeError(f"values must have the dtype of {name} ({x.dtype}), got {values.dtype}")
    check_floating_tensor("values", values)
    if values.device != x.device:
        raise ValueError(f"values must be on the device of {name} ({x.device}), "
                         f"got {values.device}")
