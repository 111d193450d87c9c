"""PaPr for timm `ConvNeXt` and ConvNeXt-V2 (`conv_mlp` True or False): the depthwise conv and
the shortcut run dense; the pointwise part (norm, mlp, layer scale gamma, drop_path) runs on the
kept positions only; the block output is shortcut + branch at kept positions and zero at pruned
ones (residual zeroed too), as in the published method.

ConvNeXt-V2's GlobalResponseNorm (in the mlp) takes an L2 norm over positions: it spans the kept
positions, i.e. the dense block with the mlp's hidden activations zeroed at pruned positions
(zeros add nothing to the norm). The rows reach the mlp with a spatial shape, (B, k, 1, C) or
(B, C, 1, k), so timm's own module computes exactly that.

A pruned stage runs channels-last (memory format): the depthwise conv's output and the shortcut
seen as (B, H, W, C) are then contiguous, so the fused gather + norm reads whole rows instead of
one channel every H*W elements, and the block output (`hierarchical.masked_residual`: shortcut +
gamma * branch at the kept rows, zeros elsewhere, one pass) is channels-last too."""
import torch
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage

from .. import hierarchical
from . import _stages
from ._core import Family, Patched, register_family
from ._stages import PrunedStage


class PaPrConvNeXtStage(PrunedStage):
    def _papr_grid(self, x):
        return int(x.shape[2]), int(x.shape[3])       # (B, C, H, W)

    def _papr_layout(self, x):
        return x.contiguous(memory_format=torch.channels_last)


class PaPrConvNeXtBlock(Patched):
    def _papr_forward(self, x, indices, row_of):
        shortcut = self.shortcut(x).permute(0, 2, 3, 1)              # dense, viewed (B, H, W, C)
        y = self.conv_dw(x).permute(0, 2, 3, 1)                      # channels-last: contiguous
        rows = _stages.gather_norm(self.norm, y, indices, channels_first=self.use_conv_mlp)
        if self.use_conv_mlp:       # 1x1 convs
            rows = _stages.on_rows_as_map(self.mlp, rows)
        else:       # (B, k, 1, C): a GlobalResponseNorm's norm over dims (1, 2) spans the k rows
            rows = self.mlp(rows.unsqueeze(2)).squeeze(2)
        gamma = self.gamma
        if self.training:           # drop_path acts (eval: identity): scale here, as timm does
            rows, gamma = self.drop_path(rows if gamma is None else rows * gamma), None
        out = hierarchical.masked_residual(shortcut, indices, rows, gamma, row_of=row_of)
        return out.permute(0, 3, 1, 2)


def _check(model: ConvNeXt, state) -> None:
    list(_stages.pruned_blocks(state, model.stages, ConvNeXtStage, ConvNeXtBlock))  # checks each


register_family(Family(
    ConvNeXt, check=_check,
    apply=lambda model, state: _stages.apply(model, state, model.stages, PaPrConvNeXtStage,
                                             PaPrConvNeXtBlock),
    default_z=_stages.DEFAULT_Z, options=_stages.OPTIONS))
