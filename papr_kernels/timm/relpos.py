"""PaPr for timm `VisionTransformerRelPos` (`vit_relpos_*`, `vit_srelpos_*`): a ViT without an
absolute position embedding whose attention adds a relative position bias to its logits, per
block (each attention's `rel_pos`, a `RelPosMlp` or `RelPosBias`) or shared by all blocks
(`model.shared_rel_pos`, passed to each block as `shared_rel_pos`).

The patched `forward_features` is timm's with one step added: after the class token (if any),
before the blocks, the patch tokens are pruned to the top `int(n * z)`. A bias is
(1, heads, n, n) over the n = P + N tokens (P = 0 or 1 prefix tokens first, their rows and
columns included), so a sample keeping the tokens t = [0..P-1] + (P + kept) needs its rows and
columns at t: (B, heads, L, L) (`_bias.py`: one gather per forward for the shared bias, passed
to the blocks as timm passes its own; one per block in its `rel_pos.get_bias` for its own).
`z = 1` runs timm's own `forward_features`.
"""
from typing import Tuple

import torch
from timm.layers import RelPosBias, RelPosMlp
from timm.models.vision_transformer_relpos import RelPosAttention, VisionTransformerRelPos

from ._bias import block_bias, kept_bias, kept_pairs, run_blocks
from ._core import Family, Patched, register_family, swap_class
from .beit import MERGE_REASON
from .vit import REPLACES, PrunedOnce

BIAS_MODULES = (RelPosMlp, RelPosBias)


class PaPrRelPos(Patched):
    """A block's own `RelPosMlp` / `RelPosBias`: in a pruned block, each sample's bias."""

    def get_bias(self) -> torch.Tensor:
        return block_bias(super().get_bias(), self._papr)


class PaPrVisionTransformerRelPos(PrunedOnce):
    def _papr_features(self, images: torch.Tensor, x: torch.Tensor,
                       grid: Tuple[int, int]) -> torch.Tensor:
        state = self._papr
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        n, prefix = x.shape[1], self.num_prefix_tokens
        x, kept = state.prune_tokens(x, images, grid, prefix, return_indices=True)
        pairs = kept_pairs(kept, n, prefix)
        shared = None
        if self.shared_rel_pos is not None:
            shared = kept_bias(self.shared_rel_pos.get_bias()[0], pairs)
        x = run_blocks(self, x, pairs, state, shared_rel_pos=shared)
        return self.norm(x)


def _check(model: VisionTransformerRelPos, state) -> None:
    """The attentions must be timm's (they read a block's bias through `rel_pos.get_bias`, which
    the patch replaces, or add the shared one) and every bias must be over the model's grid and
    prefix tokens (as timm's forward needs too)."""
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, RelPosAttention):
            raise TypeError(f"model.blocks[{i}].attn ({type(attn).__name__}) is not timm's "
                            f"RelPosAttention, which the patch gives each sample's relative "
                            f"position bias")
        if attn.rel_pos is not None:
            _check_bias(f"model.blocks[{i}].attn.rel_pos", attn.rel_pos, model)
    if model.shared_rel_pos is not None:
        _check_bias("model.shared_rel_pos", model.shared_rel_pos, model)


def _check_bias(name: str, bias, model: VisionTransformerRelPos) -> None:
    if not isinstance(bias, BIAS_MODULES):
        raise TypeError(f"{name} ({type(bias).__name__}) is not timm's RelPosMlp or RelPosBias, "
                        f"whose get_bias the patch gathers at the kept tokens")
    grid = tuple(model.patch_embed.grid_size)
    # timm 1.0.20's RelPosBias keeps no prefix_tokens: its rows are the window's and the prefix
    prefix = getattr(bias, "prefix_tokens", bias.bias_shape[0] - bias.window_area)
    if tuple(bias.window_size) != grid or prefix != model.num_prefix_tokens:
        raise ValueError(f"{name} is a bias over a {tuple(bias.window_size)} window and "
                         f"{prefix} prefix tokens; the patch gathers it at the kept "
                         f"tokens of the model's {grid} patch grid and {model.num_prefix_tokens} "
                         f"prefix tokens (timm's own forward needs them equal too)")


def _apply(model: VisionTransformerRelPos, state) -> None:
    swap_class(model, PaPrVisionTransformerRelPos, state)
    for block in model.blocks:
        if block.attn.rel_pos is not None:   # the others add the shared bias or none
            swap_class(block.attn.rel_pos, PaPrRelPos, state)


register_family(Family(VisionTransformerRelPos, check=_check, apply=_apply, default_z=0.5,
                       options=("order",), refusals={"merge_r": MERGE_REASON},
                       replaces=REPLACES))
