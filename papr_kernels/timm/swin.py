"""PaPr for timm `SwinTransformer` and `SwinTransformerV2`: window attention runs on all tokens;
the MLP branch runs on the kept tokens only and is added back in place; pruned tokens keep their
residual unchanged. Swin (pre-norm): norm2, mlp, drop_path2, with the gather of the kept rows
fused with norm2 (`_stages.gather_norm`). Swin V2 (residual post-norm): mlp, norm2, drop_path2
on the gathered rows. The add back is one in-place read-modify-write of the kept rows."""
from timm.models.swin_transformer import (SwinTransformer, SwinTransformerBlock,
                                          SwinTransformerStage)
from timm.models.swin_transformer_v2 import (SwinTransformerV2, SwinTransformerV2Block,
                                             SwinTransformerV2Stage)

from .. import hierarchical
from . import _stages
from ._core import Family, Patched, register_family


class PaPrSwinStage(_stages.AddBackStage):
    def _papr_grid(self, x):
        return int(x.shape[1]), int(x.shape[2])       # (B, H, W, C)


class PaPrSwinBlock(Patched):
    def _papr_forward(self, x, indices, row_of):
        x = x + self.drop_path1(self._attn(self.norm1(x)))           # dense: (B, H, W, C)
        rows = _stages.gather_norm(self.norm2, x, indices)            # (B, k, C), normalized
        return _stages.add_back(x, indices, self.drop_path2(self.mlp(rows)), row_of)


class PaPrSwinV2Block(Patched):
    def _papr_forward(self, x, indices, row_of):
        x = x + self.drop_path1(self.norm1(self._attn(x)))           # dense: (B, H, W, C)
        rows = hierarchical.gather_rows(x, indices)                   # (B, k, C)
        return _stages.add_back(x, indices, self.drop_path2(self.norm2(self.mlp(rows))), row_of)


def _register(model_class: type, stage_class: type, block_class: type, block_mixin: type) -> None:
    def check(model, state) -> None:
        list(_stages.pruned_blocks(state, model.layers, stage_class, block_class))  # checks each

    register_family(Family(
        model_class, check=check,
        apply=lambda model, state: _stages.apply(model, state, model.layers, PaPrSwinStage,
                                                 block_mixin),
        default_z=_stages.DEFAULT_Z, options=_stages.OPTIONS))


_register(SwinTransformer, SwinTransformerStage, SwinTransformerBlock, PaPrSwinBlock)
_register(SwinTransformerV2, SwinTransformerV2Stage, SwinTransformerV2Block, PaPrSwinV2Block)
