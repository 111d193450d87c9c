"""PaPr for timm `VisionTransformer` and its subclasses (DeiT distilled, register tokens, gap).

The patched `forward_features` is timm's with one step added: after `_pos_embed`, before
`patch_drop` (timm's random token dropout in training), `norm_pre` and the blocks, the patch
tokens are pruned to the top `int(n * z)` by the proposal network's features of the same input
image. The grid is read from the actual input (non-square and `dynamic_img_size` inputs work);
`num_prefix_tokens` (class, distillation, register tokens) comes from the model. With
`merge_r > 0` the second half of the blocks also merges tokens (`papr_kernels.merge`), with
gradient checkpointing too when it is on.
"""
from typing import Optional, Tuple

import torch
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from .. import merge
from ..api import prune
from ._core import Family, PatchedModel, register_family, swap_class


def token_grid(model: VisionTransformer, images: torch.Tensor, tokens: torch.Tensor) -> Tuple[int, int]:
    """The patch grid (H, W) of this input: from NHWC tokens when `dynamic_img_size`, else from
    the image size."""
    if tokens.dim() == 4:
        return int(tokens.shape[1]), int(tokens.shape[2])
    embed = model.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        return tuple(int(s) for s in embed.dynamic_feat_size(images.shape[-2:]))
    return tuple(int(s) for s in embed.grid_size)


class PaPrVisionTransformer(PatchedModel):
    """Overrides `forward_features`; put before the model's own class in the MRO."""

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        state = self._papr
        z, merge_r = state.z, state.merge_r
        images = x
        x = self.patch_embed(x)
        grid = token_grid(self, images, x)
        x = self._pos_embed(x)
        if z < 1:
            if attn_mask is not None or is_causal:
                raise ValueError("attn_mask / is_causal are not supported on a PaPr-pruned model "
                                 "(the token count changes); set model.papr_z = 1 or unpatch")
            f = state.proposal_features(images)
            x = prune(x, f, z, num_prefix_tokens=self.num_prefix_tokens, grid=grid,
                      align_corners=state.align_corners, order=state.order)
        x = self.patch_drop(x)
        x = self.norm_pre(x)

        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting()
        if merge_r > 0:
            if attn_mask is not None or is_causal:
                raise ValueError("attn_mask / is_causal are not supported with token merging")
            size = None
            first_merge = len(self.blocks) // 2
            for i, block in enumerate(self.blocks):
                if i < first_merge:
                    x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
                elif checkpointing:
                    x, size = checkpoint(merge.proportional_block_forward, block, x, size,
                                         merge_r, self.num_prefix_tokens, use_reentrant=False)
                else:
                    x, size = merge.proportional_block_forward(block, x, size, merge_r,
                                                               self.num_prefix_tokens)
        elif attn_mask is not None or is_causal:
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        elif checkpointing:
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return x


def _check(model: VisionTransformer, state) -> None:
    if state.merge_r:
        for block in model.blocks:
            merge.check_block(block)


register_family(Family(VisionTransformer, check=_check,
                       apply=lambda model, state: swap_class(model, PaPrVisionTransformer, state),
                       default_z=0.5, options=("order", "merge_r")))
