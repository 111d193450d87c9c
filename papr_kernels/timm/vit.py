"""PaPr for timm `VisionTransformer` and its subclasses (DeiT distilled, register tokens, gap).

The patched `forward_features` is timm's with one step added: after `_pos_embed`, before
`patch_drop` (timm's random token dropout in training), `norm_pre` and the blocks, the patch
tokens are pruned to the top `int(n * z)` by the proposal network's features of the same input
image. The grid is read from the actual input (non-square and `dynamic_img_size` inputs work);
`num_prefix_tokens` (class, distillation, register tokens) comes from the model. With
`merge_r > 0` the second half of the blocks also merges tokens (`papr_kernels.merge`), with
gradient checkpointing too when it is on, and the head's pooling weighs each token by its size
(the number of tokens it stands for): 'avg' and the mean of 'avgmax' become
sum(x * size) / sum(size) over the pooled tokens, 'map' adds log(size) to its attention logits.
The sizes go from `forward_features` to `pool` through a per-thread slot (`_MergeSizes`).
"""
import inspect
from typing import Optional, Tuple

import torch
from timm.models._manipulate import checkpoint_seq
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from .. import merge
from ._core import (Family, PatchedModel, PerThread, check_own_methods, register_family,
                    swap_class)


def token_grid(model: VisionTransformer, images: torch.Tensor, tokens: torch.Tensor) -> Tuple[int, int]:
    """The patch grid (H, W) of this input: from NHWC tokens when `dynamic_img_size`, else from
    the image size."""
    if tokens.dim() == 4:
        return int(tokens.shape[1]), int(tokens.shape[2])
    embed = model.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        return tuple(int(s) for s in embed.dynamic_feat_size(images.shape[-2:]))
    return tuple(int(s) for s in embed.grid_size)


def check_no_mask(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """timm's `attn_mask` / `is_causal` are per token of the full sequence: refused when pruning."""
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask / is_causal are not supported on a PaPr-pruned model (the "
                         "token count changes); set model.papr_z = 1 or unpatch")


# What the patched model class of every family pruned once reimplements (`Family.replaces`: a
# model class overriding it is refused, its override would be bypassed).
REPLACES = ("forward_features",)


class PrunedOnce(PatchedModel):
    """A family pruned once, before its blocks, in its own `_papr_features(images, tokens, grid)`
    (Eva, Beit, CaiT, RelPos ViTs): `forward_features` is timm's own at z = 1 (bit for bit), else
    that, given the embedded patch tokens and the grid of this input. Put before the model's own
    class in the MRO."""

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._papr.z == 1:
            return super().forward_features(x, **kwargs)    # timm's own, bit for bit
        tokens = self.patch_embed(x)
        return self._papr_features(x, tokens, token_grid(self, x, tokens), **kwargs)

    def _papr_features(self, images: torch.Tensor, x: torch.Tensor, grid: Tuple[int, int],
                       **kwargs) -> torch.Tensor:
        raise NotImplementedError


class _MergeSizes:
    """The token sizes (B, t, 1) that the last merging `forward_features` of this thread
    returned with its tokens, and the `PaPrState` of the model that ran it. `pool` uses them
    for tokens of that model with that batch and token count; `forward` clears them when its
    head is done."""

    def __init__(self):
        self.state = None
        self.size: Optional[torch.Tensor] = None


_SIZES = PerThread(_MergeSizes)   # per thread: `_SIZES.slot`


class PaPrVisionTransformer(PatchedModel):
    """Overrides `forward_features` (and, for merging, `forward` and `pool`); put before the
    model's own class in the MRO."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # timm's own arguments passed on as given (timm 1.0.20's forward takes no attn_mask).
        if self._papr.merge_r == 0:
            return super().forward(x, *args, **kwargs)
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            _SIZES.slot.state = None
            _SIZES.slot.size = None

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        size = _SIZES.slot.size if _SIZES.slot.state is self._papr else None
        if size is None or tuple(size.shape[:2]) != tuple(x.shape[:2]):
            return super().pool(x, pool_type)
        pool_type = self.global_pool if pool_type is None else pool_type
        if self.attn_pool is None and pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)   # 'token', 'max', '': sizes change nothing
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        if self.attn_pool is not None:        # 'map' (others are refused at patch time)
            # Proportional attention in the pooling too: (B, heads, latents, N) logits + log(size).
            return self.attn_pool(x, attn_mask=size.log()[:, None, None, :, 0].to(x.dtype))
        mean = merge.weighted_mean(x, size)
        return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        state = self._papr
        z, merge_r = state.z, state.merge_r
        images = x
        x = self.patch_embed(x)
        grid = token_grid(self, images, x)
        x = self._pos_embed(x)
        if z < 1:
            check_no_mask(attn_mask, is_causal)
            x = state.prune_tokens(x, images, grid, self.num_prefix_tokens)
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
            _SIZES.slot.state = state if size is not None else None
            _SIZES.slot.size = size
        elif attn_mask is not None or is_causal:
            masks = {"attn_mask": attn_mask}
            if is_causal:   # only when set: timm 1.0.20's blocks take attn_mask alone
                masks["is_causal"] = True
            for block in self.blocks:
                x = block(x, **masks)
        elif checkpointing:
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return x


def _check(model: VisionTransformer, state) -> None:
    if state.merge_r:
        check_own_methods(model, VisionTransformer, ("pool",), "model")  # size-weighted pooling
        for block in model.blocks:
            merge.check_block(block)
        _check_pooling(model)


def _check_pooling(model: VisionTransformer) -> None:
    """Merging needs a pooling that can weigh tokens by size: class token, avg, avgmax, max,
    none, or 'map' with timm's `AttentionPoolLatent` (given log(size) as its attention mask)."""
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        if not hasattr(model, "pool"):
            raise ValueError(f"merge_r > 0 needs timm >= 1.0.20 (VisionTransformer.pool), got "
                             f"merge_r with global_pool={model.global_pool!r}")
        return
    if (type(pool) is not AttentionPoolLatent or pool.pos_embed is not None
            or "attn_mask" not in inspect.signature(pool.forward).parameters):
        raise ValueError(f"merge_r > 0 is not supported with global_pool={model.global_pool!r} "
                         f"({type(pool).__name__}): its attention cannot weigh merged tokens by "
                         f"size; use merge_r=0")


register_family(Family(VisionTransformer, check=_check,
                       apply=lambda model, state: swap_class(model, PaPrVisionTransformer, state),
                       default_z=0.5, options=("order", "merge_r"),
                       replaces=REPLACES))
