"""PaPr for timm `MetaFormer` (PoolFormer v1 / v2, ConvFormer, CAFormer): the token mixer
(pooling, separable convolution or attention) runs on the whole grid; the MLP branch (norm2, mlp,
drop_path2, layer_scale2) runs on the kept positions only and is added to `res_scale2(x)` there;
pruned positions keep their (scaled) residual, as Swin's do.

norm2 is a per-position LayerNorm (ConvFormer, CAFormer: fused with the gather of the kept
rows where `_stages.gather_norm` can) or, in PoolFormer, a GroupNorm with one group, whose
statistics span the whole map: that one runs on the dense map before the gather, so the kept
rows see the statistics of the unpruned block. Convolutional stages (NCHW) run channels-last in
memory, as ConvNeXt's, so the gathers read whole rows; CAFormer's attention stages hold (B, N, C)
tokens.
"""
import torch
from timm.models.metaformer import MetaFormer, MetaFormerBlock, MetaFormerStage
from torch import nn

from .. import hierarchical
from . import _stages
from ._core import Family, Patched, register_family


class PaPrMetaFormerStage(_stages.AddBackStage):
    def forward(self, x):
        x = self.downsample(x)
        shape = x.shape
        grid = int(shape[2]), int(shape[3])          # plain ints (torch.jit.trace: tensors)
        if self.use_nchw:
            return self._papr_blocks(x, grid)
        x = self._papr_blocks(x.flatten(2).transpose(1, 2), grid)   # attention: (B, N, C)
        return x.transpose(1, 2).reshape(shape)

    def _papr_layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class PaPrMetaFormerBlock(Patched):
    def _papr_forward(self, x, indices, row_of):
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))
        nchw = x.dim() == 4
        rows = self._papr_norm2_rows(x, indices, nchw)                # (B, k, C)
        branch = (self.mlp, self.drop_path2, self.layer_scale2)
        if nchw:           # 1x1 convs and (C, 1, 1) scales
            rows = _stages.on_rows_as_map(branch, rows)
        else:
            for module in branch:
                rows = module(rows)
        base = self.res_scale2(x)
        base = base.permute(0, 2, 3, 1) if nchw else base            # (B, H, W, C) / (B, N, C)
        out = _stages.add_back(base, indices, rows, row_of)
        return out.permute(0, 3, 1, 2) if nchw else out

    def _papr_norm2_rows(self, x, indices, nchw):
        """norm2 of the kept rows (B, k, C): gathered then normed for a per-position LayerNorm,
        normed on the whole map then gathered for PoolFormer's GroupNorm (one group)."""
        if isinstance(self.norm2, nn.LayerNorm):          # timm's LayerNorm2d included
            view = x.permute(0, 2, 3, 1) if nchw else x
            return _stages.gather_norm(self.norm2, view, indices, channels_first=nchw)
        normed = self.norm2(x)
        return hierarchical.gather_rows(normed.permute(0, 2, 3, 1) if nchw else normed, indices)


def _check(model: MetaFormer, state) -> None:
    list(_stages.pruned_blocks(state, model.stages, MetaFormerStage, MetaFormerBlock))


register_family(Family(
    MetaFormer, check=_check,
    apply=lambda model, state: _stages.apply(model, state, model.stages, PaPrMetaFormerStage,
                                             PaPrMetaFormerBlock),
    default_z=_stages.DEFAULT_Z, options=_stages.OPTIONS))
