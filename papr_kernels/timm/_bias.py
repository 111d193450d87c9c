"""A relative position bias at each sample's kept tokens, shared by the families whose attention
adds one to its logits (`beit.py`, `relpos.py`).

A bias is (heads, n, n) over the n = P + N tokens (P prefix tokens first). A sample keeping the
patches `kept` keeps the tokens t = [0, ..., P - 1] + (P + kept) and needs the bias at rows and
columns t: (B, heads, L, L), L = P + k, an additive attention mask that timm's attention takes
as it takes its own (1, heads, n, n) one. The flat positions t[i] * n + t[j] (`kept_pairs`) are
computed once per forward; a shared bias is gathered at them once per forward, a block's own
bias where the block computes it (`block_bias`, from a patched method of its attention), in one
`gather` each (`kept_bias`). The blocks find the positions in a per-thread slot that `run_block`
sets around each block call (`run_blocks`; also around its recomputation under gradient
checkpointing).
"""
from typing import Optional

import torch
from timm.models._manipulate import checkpoint
from torch import nn

from ._core import PerThread


def kept_pairs(kept: torch.Tensor, n: int, num_prefix_tokens: int) -> torch.Tensor:
    """The flat positions (B, L, L) in an (n, n) bias of the prefix tokens and the kept patch
    tokens `kept` (B, k) of each sample (patch i is token num_prefix_tokens + i), in their
    order; L = num_prefix_tokens + k."""
    prefix = torch.arange(num_prefix_tokens, device=kept.device).expand(kept.shape[0], -1)
    tokens = torch.cat((prefix, kept + num_prefix_tokens), dim=1)
    return tokens[:, :, None] * n + tokens[:, None, :]


def kept_bias(bias: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """A (heads, n, n) bias at `pairs` (`kept_pairs`): each sample's (B, heads, L, L),
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


def run_block(block: nn.Module, x: torch.Tensor, pairs: torch.Tensor, state,
              **kwargs) -> torch.Tensor:
    """block(x, **kwargs) with `block_bias` reading `pairs` (the slot is restored after: a
    patched model run inside a block, from a hook, leaves the outer one's)."""
    slot = _PAIRS.slot
    outer = slot.state, slot.pairs
    slot.state, slot.pairs = state, pairs
    try:
        return block(x, **kwargs)
    finally:
        slot.state, slot.pairs = outer


def run_blocks(model: nn.Module, x: torch.Tensor, pairs: torch.Tensor, state,
               **kwargs) -> torch.Tensor:
    """x through `model.blocks`, each by `run_block` (checkpointed when the model has gradient
    checkpointing on)."""
    checkpointing = model.grad_checkpointing and not torch.jit.is_scripting()
    for block in model.blocks:
        if checkpointing:
            x = checkpoint(run_block, block, x, pairs, state, **kwargs)
        else:
            x = run_block(block, x, pairs, state, **kwargs)
    return x


def block_bias(bias: torch.Tensor, state) -> torch.Tensor:
    """A block's own (1, heads, n, n) bias, at the kept tokens when the block runs in a pruned
    forward of the model with `state` (`run_block`), else as it is."""
    slot = _PAIRS.slot
    if slot.state is not state:
        return bias
    return kept_bias(bias[0], slot.pairs)
