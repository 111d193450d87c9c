"""PaPr for timm `Cait` (CaiT): the patch tokens (with their position embedding) go through
`blocks` (LayerScale blocks with talking-heads attention) without a class token; the class token
joins only in `blocks_token_only`, whose class attention lets it attend to itself and the patch
tokens, and is put first before the final norm.

The patched `forward_features` is timm's with one step added: after the position embedding and
`pos_drop`, before `blocks`, the patch tokens are pruned to the top `int(n * z)` (no prefix
token at that point). Every later step takes any token count as it is: the blocks, the class
attention (over the class token and the kept tokens), the norm and the 'avg' pooling (over the
kept tokens). One code path for timm 1.0.20 (the class attention inline in `forward_features`)
and newer (`forward_cls`; `blocks_token_only` None after `prune_intermediate_layers`, no class
token then). `z = 1` runs timm's own `forward_features`.
"""
from typing import Tuple

import torch
from timm.models._manipulate import checkpoint_seq
from timm.models.cait import Cait

from ._core import Family, register_family, swap_class
from .vit import REPLACES, PrunedOnce

MERGE_REASON = ("ToMe merging is not defined for CaiT: its talking-heads attention mixes the "
                "heads' logits, where proportional attention adds log(size), and the merged "
                "tokens' sizes would have to reach the class attention's softmax and the 'avg' "
                "pooling")


class PaPrCait(PrunedOnce):
    def _papr_features(self, images: torch.Tensor, x: torch.Tensor,
                       grid: Tuple[int, int]) -> torch.Tensor:
        x = self.pos_drop(x + self.pos_embed)
        x = self._papr.prune_tokens(x, images, grid, 0)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if self.blocks_token_only is not None:
            cls_token = self.cls_token.expand(x.shape[0], -1, -1)
            for block in self.blocks_token_only:
                cls_token = block(x, cls_token)
            x = torch.cat((cls_token, x), dim=1)
        return self.norm(x)


register_family(Family(Cait, check=lambda model, state: None,
                       apply=lambda model, state: swap_class(model, PaPrCait, state),
                       default_z=0.5, options=("order",),
                       refusals={"merge_r": MERGE_REASON},
                       replaces=REPLACES))
