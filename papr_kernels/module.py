"""`PaPr`: the operator as an nn.Module, in the style of timm's PatchDropout."""
from typing import Optional, Sequence

import torch
from torch import nn

from . import backends, spec
from .api import prune, refuse_script


class PaPr(nn.Module):
    """Keep the prefix tokens and the top-z fraction of patch tokens, ranked by proposal features.

    Unlike PatchDropout it is a deterministic inference-time op: it prunes in train and eval mode
    alike, and z = 1 returns x unchanged.
    """

    def __init__(self, z: float, num_prefix_tokens: int = 1, order: str = "score",
                 grid: Optional[Sequence[int]] = None, align_corners: bool = True,
                 return_indices: bool = False, backend: Optional[str] = None):
        super().__init__()
        z = spec.check_z(z)              # what can be checked before x and f: here, not at
        spec.check_order(order)          # the first call; z stored as the float it checks to
        spec.check_int("num_prefix_tokens", num_prefix_tokens)
        spec.check_flag("align_corners", align_corners)
        spec.check_flag("return_indices", return_indices)
        if grid is not None:
            if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
                raise TypeError(f"grid must be None or a sequence of ints (H, W) or (T, H, W), "
                                f"got {type(grid).__name__}")
            if len(grid) not in (2, 3):
                raise ValueError(f"grid must be 2 ints (H, W) or 3 ints (T, H, W), got "
                                 f"{tuple(grid)}")
            grid = spec.check_grid(grid, len(grid))
        if backend is not None and backend not in backends.names():
            raise ValueError(f"backend must be one of {backends.names()} or None, got "
                             f"{backend!r}")
        self.z = z
        self.num_prefix_tokens = num_prefix_tokens
        self.order = order
        self.grid = grid
        self.align_corners = align_corners
        self.return_indices = return_indices
        self.backend = backend

    def forward(self, x: torch.Tensor, f: torch.Tensor):
        return prune(x, f, self.z, num_prefix_tokens=self.num_prefix_tokens, grid=self.grid,
                     align_corners=self.align_corners, order=self.order,
                     return_indices=self.return_indices, backend=self.backend)

    def __prepare_scriptable__(self):
        refuse_script("papr_kernels.PaPr")

    def extra_repr(self) -> str:
        return f"z={self.z}, num_prefix_tokens={self.num_prefix_tokens}, order={self.order!r}"
