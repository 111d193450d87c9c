"""PaPr for timm `ConvNeXt` (`conv_mlp` True or False; not ConvNeXt-V2): the depthwise conv and
the shortcut run dense; the pointwise part (norm, mlp, layer scale gamma, drop_path) runs on the
kept positions only; the block output is shortcut + branch at kept positions and zero at pruned
ones (residual zeroed too), as in the published method."""
from timm.layers import GlobalResponseNormMlp
from timm.models.convnext import ConvNeXt, ConvNeXtBlock

from .. import hierarchical
from . import _stages
from ._core import Family, Patched, register_family
from ._stages import PrunedStage


class PaPrConvNeXtStage(PrunedStage):
    def _papr_grid(self, x):
        return int(x.shape[2]), int(x.shape[3])       # (B, C, H, W)


class PaPrConvNeXtBlock(Patched):
    def _papr_forward(self, x, indices):
        shortcut = self.shortcut(x).permute(0, 2, 3, 1)              # dense, viewed (B, H, W, C)
        rows = hierarchical.gather_rows(self.conv_dw(x).permute(0, 2, 3, 1), indices)  # (B, k, C)
        if self.use_conv_mlp:       # NCHW norm and 1x1 convs: run them on (B, C, k, 1)
            rows = self.mlp(self.norm(rows.transpose(1, 2).unsqueeze(-1))).squeeze(-1)
            rows = rows.transpose(1, 2)
        else:
            rows = self.mlp(self.norm(rows))
        if self.gamma is not None:
            rows = rows * self.gamma
        rows = self.drop_path(rows) + hierarchical.gather_rows(shortcut, indices)
        # zeros at pruned positions; in the dtype of shortcut + branch (they differ under autocast)
        like = rows.new_empty(()).expand(shortcut.shape)             # the shape, no memory
        out = hierarchical.scatter_rows(rows, indices, like=like)
        return out.permute(0, 3, 1, 2)


def _check(model: ConvNeXt, state) -> None:
    for block in _stages.pruned_blocks(state, model.stages, ConvNeXtBlock):
        if isinstance(block.mlp, GlobalResponseNormMlp):
            raise ValueError("ConvNeXt-V2 blocks (GlobalResponseNorm, a statistic over all "
                             "positions) are not supported by PaPr's per-position pruning")


register_family(Family(
    ConvNeXt, check=_check,
    apply=lambda model, state: _stages.apply(model, state, model.stages, PaPrConvNeXtStage,
                                             PaPrConvNeXtBlock),
    default_z=_stages.DEFAULT_Z, options=_stages.OPTIONS))
