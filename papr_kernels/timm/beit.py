"""PaPr for timm `Beit` (BEiT, BEiT v2): a class token, an optional absolute position embedding,
and a relative position bias added to the attention logits, per block (each `Attention` with
its own `relative_position_bias_table`) and/or shared by all blocks (`model.rel_pos_bias`).

The patched `forward_features` is timm's with one step added, at the place of the ViT one
(`vit.py`): after the class token, the position embedding and `pos_drop`, before the blocks, the
patch tokens are pruned to the top `int(n * z)`. A bias is (heads, n, n) over the n = N + 1
tokens (class token first), so a sample keeping the tokens t = [0] + (1 + kept) needs its rows
and columns at t: (B, heads, k + 1, k + 1), an additive attention mask that timm's attention
takes as it takes its own (1, heads, n, n) one. The flat positions t[i] * n + t[j] of those
entries (`kept_pairs`) are computed once per forward; the shared bias is gathered at them once
per forward, each block's own bias in its `_get_rel_pos_bias` (one `gather`, `kept_bias`).
The blocks find the positions in a per-thread slot set around each block call (also around
its recomputation under gradient checkpointing). `z = 1` runs timm's own `forward_features`.
"""
from typing import Optional

import torch
from timm.models._manipulate import checkpoint
from timm.models.beit import Attention, Beit, Block

from ..api import prune
from ._core import Family, Patched, PatchedModel, PerThread, register_family, swap_class
from .vit import token_grid

MERGE_REASON = ("ToMe merging is not defined with a relative position bias (a merged token has "
                "no single position to look its bias up by)")


def kept_pairs(kept: torch.Tensor, n: int) -> torch.Tensor:
    """The flat positions (B, k + 1, k + 1) in an (n, n) bias of the class token and the kept
    patch tokens `kept` (B, k) of each sample (patch i is token 1 + i), in their order."""
    tokens = torch.cat((kept.new_zeros(kept.shape[0], 1), kept + 1), dim=1)
    return tokens[:, :, None] * n + tokens[:, None, :]


def kept_bias(bias: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """A (heads, n, n) bias at `pairs` (`kept_pairs`): each sample's (B, heads, k + 1, k + 1),
    contiguous (one gather from the bias seen per sample without a copy): an attention mask
    every SDPA kernel takes as it is, and that ONNX export's decomposition of SDPA keeps in
    shape (a transposed mask made it emit strides its own reshape then refused)."""
    batch, heads = pairs.shape[0], bias.shape[0]
    flat = bias.reshape(1, heads, -1).expand(batch, -1, -1)
    index = pairs.reshape(batch, 1, -1).expand(-1, heads, -1)
    return flat.gather(2, index).view(batch, heads, *pairs.shape[1:])


class _BlockPairs:
    """The `kept_pairs` of the block running in this thread and the `PaPrState` of its model;
    None outside a pruned block call."""

    def __init__(self):
        self.state = None
        self.pairs: Optional[torch.Tensor] = None


_PAIRS = PerThread(_BlockPairs)   # per thread: `_PAIRS.slot`


def _run_block(block: Block, x: torch.Tensor, shared_bias: Optional[torch.Tensor],
               pairs: torch.Tensor, state) -> torch.Tensor:
    """block(x) with its attention reading `pairs` (the slot is restored after: a patched model
    run inside a block, from a hook, leaves the outer one's)."""
    slot = _PAIRS.slot
    outer = slot.state, slot.pairs
    slot.state, slot.pairs = state, pairs
    try:
        return block(x, shared_rel_pos_bias=shared_bias)
    finally:
        slot.state, slot.pairs = outer


class PaPrBeitAttention(Patched):
    """An attention with its own bias table: in a pruned block, each sample's bias."""

    def _get_rel_pos_bias(self) -> torch.Tensor:
        bias = super()._get_rel_pos_bias()    # (1, heads, n, n)
        slot = _PAIRS.slot
        if slot.state is not self._papr:
            return bias
        return kept_bias(bias[0], slot.pairs)


class PaPrBeit(PatchedModel):
    """Overrides `forward_features`; put before the model's own class in the MRO."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        state = self._papr
        if state.z == 1:
            return super().forward_features(x)    # timm's own, bit for bit
        images = x
        x = self.patch_embed(x)
        grid = token_grid(self, images, x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        n = x.shape[1]
        x, kept = prune(x, state.proposal_features(images), state.z, num_prefix_tokens=1,
                        grid=grid, align_corners=state.align_corners, order=state.order,
                        return_indices=True)
        pairs = kept_pairs(kept, n)
        shared = None if self.rel_pos_bias is None else kept_bias(self.rel_pos_bias(), pairs)
        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting()
        for block in self.blocks:
            if checkpointing:
                x = checkpoint(_run_block, block, x, shared, pairs, state)
            else:
                x = _run_block(block, x, shared, pairs, state)
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
                       refusals={"merge_r": MERGE_REASON}))
