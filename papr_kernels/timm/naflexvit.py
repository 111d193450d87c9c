"""PaPr for timm `NaFlexVit` (`naflexvit_*`, the SigLIP-2 NaFlex and C-RADIO backbones, and the
ViT / Eva names built with `use_naflex=True`), called with NCHW images.

`NaFlexVit.embeds` does the patch embedding (a convolution, or a linear layer on timm's own
patchify of the images), the position embedding of the patch tokens (learned or factorized,
resized to the grid of the input), the prefix tokens (class, registers) and `pos_drop`; the
model then makes the ROPE table of the grid (when `rope_type` is set), drops patches in training
(`patch_drop`), applies `norm_pre` and the blocks. The patched `forward_features` is timm's with
one step added at the place of the ViT one (`vit.py`): after `embeds` and the ROPE table, before
`patch_drop`, the patch tokens are pruned to the top `int(n * z)`; the ROPE rows of each sample's
kept tokens are gathered as in `eva.py` (axial, DINOv3, MRoPE: one (B, 1, k, dim) table; 'mixed':
one per block). The pooling ('avg', 'avgmax', 'max', 'map', 'token') sees the kept tokens only.
In train mode timm's patch dropout (`patch_drop_rate > 0`) then drops among the kept tokens, as on
a ViT. `z = 1` runs timm's own `forward_features`; `forward_intermediates` stays dense.

Not supported with z < 1: NaFlex ("sequence") mode, i.e. pre-patchified patches with
`patch_coord` / `patch_valid` / `attn_mask` or a dict input (the proposal needs the images), and
token merging (`merge_r`).
"""
from typing import Optional

import torch
from timm.models._manipulate import checkpoint

from ._core import Family, PatchedModel, register_family, swap_class
from .eva import kept_rope
from .vit import REPLACES

try:
    from timm.models.naflexvit import NaFlexVit
except ImportError:    # a timm without NaFlexVit: nothing to register
    NaFlexVit = None

MERGE_REASON = ("ToMe merging is not implemented for NaFlexVit (its pooling cannot weigh merged "
                "tokens by size, and merging is not defined with its rotary embeddings)")


def check_image_input(patches, patch_coord, patch_valid, attn_mask) -> None:
    """A pruned NaFlexVit takes NCHW images only: NaFlex mode's patches have no image to run the
    proposal on, and its masks are per token of the full sequence."""
    given = [name for name, value in (("patch_coord", patch_coord), ("patch_valid", patch_valid),
                                      ("attn_mask", attn_mask)) if value is not None]
    if given or not isinstance(patches, torch.Tensor) or patches.dim() != 4:
        what = (", ".join(given) + " given" if given else
                f"patches of shape {tuple(patches.shape)}" if isinstance(patches, torch.Tensor)
                else f"a {type(patches).__name__} input")
        raise ValueError(f"a PaPr-pruned NaFlexVit takes (B, C, H, W) images ({what}): NaFlex "
                         f"mode (pre-patchified patches with patch_coord / patch_valid / "
                         f"attn_mask, or a dict input) cannot run the proposal network on images; "
                         f"set model.papr_z = 1 (timm's own forward) or unpatch")


class PaPrNaFlexVit(PatchedModel):
    """Overrides `forward_features`; put before the model's own class in the MRO."""

    def forward_features(self, patches: torch.Tensor, patch_coord: Optional[torch.Tensor] = None,
                         patch_valid: Optional[torch.Tensor] = None,
                         attn_mask: Optional[torch.Tensor] = None):
        if self._papr.z == 1:    # timm's own, bit for bit (NaFlex mode included)
            return super().forward_features(patches, patch_coord=patch_coord,
                                            patch_valid=patch_valid, attn_mask=attn_mask)
        check_image_input(patches, patch_coord, patch_valid, attn_mask)
        return self._papr_features(patches)

    def _papr_features(self, images: torch.Tensor) -> torch.Tensor:
        x, grid = self.embeds(images)      # prefix + patch tokens, position embedding added
        rope = None if self.rope is None else self.rope.get_embed(shape=grid)
        grid_hw = (int(grid[0]), int(grid[1]))   # ints under jit.trace too (sizes are tensors)
        x, kept = self._papr.prune_tokens(x, images, grid_hw, self.num_prefix_tokens,
                                           return_indices=True)
        if self.training and self.patch_drop is not None:     # drops among the kept tokens
            x, dropped = self.patch_drop(x)
            kept = kept if dropped is None else kept.gather(1, dropped)
        rope = kept_rope(rope, x, kept, mixed=self.rope_is_mixed)
        x = self.norm_pre(x)
        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting()
        for i, block in enumerate(self.blocks):
            kwargs = {} if rope is None else {"rope": rope[i] if self.rope_is_mixed else rope}
            x = checkpoint(block, x, **kwargs) if checkpointing else block(x, **kwargs)
        return self.norm(x)


if NaFlexVit is not None:
    register_family(Family(NaFlexVit, check=lambda model, state: None,
                           apply=lambda model, state: swap_class(model, PaPrNaFlexVit, state),
                           default_z=0.5, options=("order",),
                           refusals={"merge_r": MERGE_REASON},
                           replaces=REPLACES))
