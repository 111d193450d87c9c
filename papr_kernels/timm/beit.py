"""PaPr for timm `Beit` (BEiT, BEiT v2): a class token, an optional absolute position embedding,
and a relative position bias added to the attention logits, per block (each `Attention` with
its own `relative_position_bias_table`) and/or shared by all blocks (`model.rel_pos_bias`).

The patched `forward_features` is timm's with one step added, at the place of the ViT one
(`vit.py`): after the class token, the position embedding and `pos_drop`, before the blocks, the
patch tokens are pruned to the top `int(n * z)`. A bias is (heads, n, n) over the n = N + 1
tokens (class token first), so a sample keeping the tokens t = [0] + (1 + kept) needs its rows
and columns at t: (B, heads, k + 1, k + 1) (`_bias.py`: one gather per forward for the shared
bias, one per block in its attention's `_get_rel_pos_bias` for its own). `z = 1` runs timm's
own `forward_features`.
"""
from typing import Tuple

import torch
from timm.models.beit import Attention, Beit, Block

from ._bias import block_bias, kept_bias, kept_pairs, run_blocks
from ._core import Family, Patched, register_family, swap_class
from .vit import REPLACES, PrunedOnce

MERGE_REASON = ("ToMe merging is not defined with a relative position bias (a merged token has "
                "no single position to look its bias up by)")


class PaPrBeitAttention(Patched):
    """An attention with its own bias table: in a pruned block, each sample's bias."""

    def _get_rel_pos_bias(self) -> torch.Tensor:
        return block_bias(super()._get_rel_pos_bias(), self._papr)


class PaPrBeit(PrunedOnce):
    def _papr_features(self, images: torch.Tensor, x: torch.Tensor,
                       grid: Tuple[int, int]) -> torch.Tensor:
        state = self._papr
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        n = x.shape[1]
        x, kept = state.prune_tokens(x, images, grid, 1, return_indices=True)
        pairs = kept_pairs(kept, n, num_prefix_tokens=1)
        shared = None if self.rel_pos_bias is None else kept_bias(self.rel_pos_bias(), pairs)
        x = run_blocks(self, x, pairs, state, shared_rel_pos_bias=shared)
        return self.norm(x)


def _check(model: Beit, state) -> None:
    """The blocks must be timm's (their attention calls `_get_rel_pos_bias`, which the patch
    replaces) and every bias must be over the model's grid (as timm's forward needs too)."""
    grid = tuple(model.patch_embed.grid_size)
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(block, Block) or not isinstance(attn, Attention):
            raise TypeError(f"model.blocks[{i}] ({type(block).__name__}, attention "
                            f"{type(attn).__name__}) is not timm's beit Block with its Attention, "
                            f"which the patch gives each sample's relative position bias through "
                            f"Attention._get_rel_pos_bias")
        _check_window(f"model.blocks[{i}].attn", block.attn.window_size, grid)
    if model.rel_pos_bias is not None:
        _check_window("model.rel_pos_bias", model.rel_pos_bias.window_size, grid)


def _check_window(name: str, window, grid) -> None:
    if window is not None and tuple(window) != grid:
        raise ValueError(f"{name} has a relative position bias over a {tuple(window)} window; "
                         f"the patch gathers it at the kept tokens of the model's {grid} patch "
                         f"grid (timm's own forward needs them equal too)")


def _apply(model: Beit, state) -> None:
    swap_class(model, PaPrBeit, state)
    for block in model.blocks:
        if block.attn.relative_position_bias_table is not None:   # the others read no bias
            swap_class(block.attn, PaPrBeitAttention, state)


register_family(Family(Beit, check=_check, apply=_apply, default_z=0.5, options=("order",),
                       refusals={"merge_r": MERGE_REASON},
                       replaces=REPLACES))
