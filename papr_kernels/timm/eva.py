"""PaPr for timm `Eva` and its subclasses (EVA-02, and the `vit_*_rope_*` models timm builds on
`Eva`): ViTs with rotary position embeddings (ROPE) of the patch tokens.

The patched `forward_features` is timm's with one step added, at the place of the ViT one
(`vit.py`): after `_pos_embed` (absolute position embedding, prefix tokens, the ROPE table of
the grid), before `norm_pre` and the blocks, the patch tokens are pruned to the top
`int(n * z)`. Each sample keeps different positions, so the (N, ...) ROPE table becomes a
per-sample (B, ...) one, gathered at the kept indices as timm gathers it for its own patch
dropout (`apply_keep_indices_nlc`); the attention leaves the prefix tokens unrotated as before.
Depth-dependent ROPE ('mixed') is gathered the same way, one table per block. `z = 1` runs
timm's own `forward_features`.

Not supported with z < 1: timm's training-time patch dropout (`patch_drop_rate > 0` in train
mode: timm drops tokens inside `_pos_embed`, before the place of the pruning), `attn_mask` /
`is_causal`, and token merging (`merge_r`).
"""
from typing import Optional, Tuple

import torch
from timm.layers.pos_embed_sincos import apply_keep_indices_nlc
from timm.models._manipulate import checkpoint
from timm.models.eva import Eva

from ._core import Family, register_family, swap_class
from .vit import REPLACES, PrunedOnce, check_no_mask

MERGE_REASON = ("ToMe merging is not defined with rotary position embeddings (a merged token has "
                "no single position to rotate by)")


def kept_rope(rope: Optional[torch.Tensor], tokens: torch.Tensor, kept: torch.Tensor,
              mixed: bool) -> Optional[torch.Tensor]:
    """The ROPE table of the kept patch positions `kept` (B, k), per sample, laid out as timm's
    `Eva._pos_embed` lays out the table after its patch dropout: (B, 1, k, dim), or
    (depth, B, heads, k, dim) for depth-dependent ('mixed') ROPE (Eva and NaFlexVit)."""
    if rope is None:
        return None
    rope = apply_keep_indices_nlc(tokens, rope, kept)
    return rope.transpose(0, 1) if mixed else rope.unsqueeze(1)


class PaPrEva(PrunedOnce):
    def _papr_features(self, images: torch.Tensor, x: torch.Tensor, grid: Tuple[int, int],
                       **masks) -> torch.Tensor:
        """`masks`: timm's `attn_mask` / `is_causal` as its `forward` passes them (timm 1.0.20
        passes neither); taken at z = 1 only."""
        _check_forward(self, **masks)
        x, rope = self._pos_embed(x)
        x, kept = self._papr.prune_tokens(x, images, grid, self.num_prefix_tokens,
                                           return_indices=True)
        rope = kept_rope(rope, x, kept, mixed=getattr(self, "rope_mixed", False))
        x = self.norm_pre(x)
        per_block = rope is not None and getattr(self, "rope_mixed", False)
        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting()
        for i, block in enumerate(self.blocks):
            rope_i = rope[i] if per_block else rope
            x = checkpoint(block, x, rope=rope_i) if checkpointing else block(x, rope=rope_i)
        return self.norm(x)


def _check_forward(model: Eva, attn_mask: Optional[torch.Tensor] = None,
                   is_causal: bool = False) -> None:
    check_no_mask(attn_mask, is_causal)
    if model.training and model.patch_drop is not None:
        raise ValueError("timm's patch dropout (patch_drop_rate > 0) in train mode is not "
                         "supported on a PaPr-pruned Eva (timm drops tokens inside _pos_embed, "
                         "before the pruning); use model.eval(), model.papr_z = 1 or "
                         "patch_drop_rate=0")


register_family(Family(Eva, check=lambda model, state: None,
                       apply=lambda model, state: swap_class(model, PaPrEva, state),
                       default_z=0.5, options=("order",),
                       refusals={"merge_r": MERGE_REASON},
                       replaces=REPLACES))
