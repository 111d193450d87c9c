"""PaPr for timm `Hiera` (image models: `hiera_*`): whole mask units are kept or pruned.

Hiera is built to run on a subset of its mask units (MAE pretraining: `forward(x, mask)`): each
unit (8 x 8 tokens at the default settings, 32 x 32 pixels) is pooled and attended to within
itself in the early stages, and every later stage takes any set of units. PaPr selects the units
from the proposal map resized to the unit grid (`mask_spatial_shape`, 7 x 7 at 224 px: one
MobileOne-S0 cell per unit) and keeps the top `int(units * z)` in spatial order, which is the
order of Hiera's own mask.

The patched `forward_features` is timm's with one difference besides the units' selection: the
patch embedding sees the whole image (PaPr prunes after the embedding, as for ViTs), where
timm's masked forward zeroes the pruned units' pixels first (MAE's guard against leaking them
into the kept tokens' overlapping 7 x 7 kernels). The kept units' tokens are gathered (no
boolean mask: the shapes stay static for torch.compile and export). `z = 1` runs timm's own.
"""
import math
from typing import Optional

import torch
from timm.models.hiera import Hiera
from torch.utils.checkpoint import checkpoint

from .. import hierarchical
from ._core import Family, PatchedModel, register_family, swap_class
from .vit import REPLACES


class PaPrHiera(PatchedModel):
    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         return_intermediates: bool = False):
        if self._papr.z == 1:
            return super().forward_features(x, mask=mask,
                                            return_intermediates=return_intermediates)
        if mask is not None:
            raise ValueError("mask: a PaPr-patched Hiera makes its own mask units' mask from "
                             "the proposal; pass mask=None (or set model.papr_z = 1, or unpatch)")
        if self.training and self.patch_drop_rate > 0:
            raise ValueError("a PaPr-patched Hiera cannot also drop mask units at random in "
                             "training (patch_drop_rate > 0): set model.patch_drop_rate = 0, "
                             "model.papr_z = 1 or unpatch")
        units = self._papr_kept_units(x)                    # (B, k), ascending
        x = self.unroll(self._pos_embed(self.patch_embed(x)))
        x = keep_units(x, units, self.mu_size)
        intermediates = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if return_intermediates and i in self.stage_ends:
                intermediates.append(self.reroll(x, i, mask=self._papr_unit_mask(units)))
        return (x, intermediates) if return_intermediates else x

    def _papr_kept_units(self, images: torch.Tensor) -> torch.Tensor:
        state = self._papr
        f = state.proposal_features(images)
        return hierarchical.select(f, tuple(self.mask_spatial_shape), state.z,
                                   state.align_corners, order="spatial")

    def _papr_unit_mask(self, units: torch.Tensor) -> torch.Tensor:
        """Hiera's mask (B, units) for `reroll`: True at the kept units."""
        mask = torch.zeros(units.shape[0], math.prod(self.mask_spatial_shape), dtype=torch.bool,
                           device=units.device)
        return mask.scatter_(1, units, True)


def keep_units(x: torch.Tensor, units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """The tokens of the kept mask units, in Hiera's unrolled order: x (B, unit_size * U, C)
    holds token j of unit u at j * U + u; returns (B, unit_size * k, C) for `units` (B, k)
    ascending, the layout timm's boolean mask gives."""
    batch, _, channels = x.shape
    x = x.view(batch, unit_size, -1, channels)
    index = units[:, None, :, None].expand(batch, unit_size, units.shape[1], channels)
    return x.gather(2, index).reshape(batch, -1, channels)


def _check(model: Hiera, state) -> None:
    if len(model.mask_spatial_shape) != 2:
        raise ValueError(f"Hiera with a {len(model.mask_spatial_shape)}-D mask unit grid "
                         "(video) is not supported: image models only")


register_family(Family(Hiera, check=_check,
                       apply=lambda model, state: swap_class(model, PaPrHiera, state),
                       default_z=0.5, options=(),
                       refusals={"order": "Hiera keeps its mask units in spatial order",
                                 "merge_r": "Hiera pools tokens within mask units: merging "
                                            "tokens is not defined there"},
                       replaces=REPLACES))
