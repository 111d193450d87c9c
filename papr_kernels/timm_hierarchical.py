"""PaPr for timm's hierarchical models: `SwinTransformer` and `ConvNeXt`.

    patch_swin(model, proposal, z=0.65, stages=(0, 1, 2, 3))
    patch_convnext(model, proposal, z=0.65, stages=(0, 1, 2, 3))
    patch_hierarchical(model, proposal, z, stages)     # either, by the model's type
    unpatch_hierarchical(model)                         # back to the original classes

The patch swaps the classes of the model, of the pruned stages and of their blocks for
subclasses (the ToMe way); no weight, buffer or submodule is added, so `state_dict()` is
unchanged. `proposal` is any callable mapping the model's input images (B, 3, H, W) to features
(B, K, h, w) (a list or tuple of maps is accepted: its last one is used); it is not a submodule
of the model, so move it to the model's device yourself.

Per forward pass: the proposal runs once on the images (without gradient); each pruned stage,
after its downsampling, selects the top int(H*W*z) positions of its own (H, W) grid
(`hierarchical.select`: SPEC's scores and total order) once, and all its blocks use them:
- Swin: window attention runs on all tokens; the MLP branch (norm2, mlp, drop_path2) runs on the
  kept tokens only and is added back in place; pruned tokens keep their residual unchanged.
- ConvNeXt: the depthwise conv (and the shortcut) run dense; the pointwise part (norm, mlp,
  layer scale gamma, drop_path) runs on the kept positions only; the block output is
  shortcut + branch at kept positions and zero at pruned ones (residual zeroed too).
With z = 1 every position is kept and the original forward runs: the output is the unpatched one.
"""
import functools
import numbers
from typing import Callable, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from . import hierarchical, validation

__all__ = ["patch_swin", "patch_convnext", "patch_hierarchical", "unpatch_hierarchical",
           "is_hierarchical", "DEFAULT_Z", "DEFAULT_STAGES"]

DEFAULT_Z = 0.65                 # the published evaluation scripts' keep ratio for both families
DEFAULT_STAGES = (0, 1, 2, 3)


class _State:
    """What the patched modules share. A plain object: nothing is registered on the model."""

    def __init__(self, proposal, z, align_corners):
        self.proposal = proposal
        self.z = z
        self.align_corners = align_corners
        self.f = None            # proposal features of the forward pass in progress

    def indices_for(self, grid: Tuple[int, int]):
        """The kept positions (B, k) for a stage's grid, or None when nothing is pruned."""
        if self.f is None or hierarchical.keep_count(grid, self.z) == grid[0] * grid[1]:
            return None
        return hierarchical.select(self.f, grid, self.z, self.align_corners)

    def run(self, forward, x, *args, **kwargs):
        """Run the model's `forward` on images x with the proposal features of x set."""
        if self.f is not None:   # nested call (forward_intermediates -> forward_features)
            return forward(x, *args, **kwargs)
        with torch.no_grad():
            f = self.proposal(x)
        if isinstance(f, (list, tuple)):
            f = f[-1]
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or not f.is_floating_point():
            raise ValueError(f"proposal must return floating features (B, K, h, w), got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        if f.shape[0] != x.shape[0]:
            raise ValueError(f"proposal must return features with the batch size of the images "
                             f"({x.shape[0]}), got {f.shape[0]}")
        if f.device != x.device:
            raise ValueError(f"proposal must return features on the device of the images "
                             f"({x.device}), got {f.device}")
        self.f = f
        try:
            return forward(x, *args, **kwargs)
        finally:
            self.f = None


# ---------------------------------------------------------------------------------------------
# Mixins: the patched classes are `type("PaPr" + cls.__name__, (Mixin, cls), {})`.


class _ModelMixin:
    def forward_features(self, x):
        return self._papr_state.run(super().forward_features, x)

    def forward_intermediates(self, x, *args, **kwargs):
        return self._papr_state.run(super().forward_intermediates, x, *args, **kwargs)


class _StageMixin:
    def _papr_grid(self, x) -> Tuple[int, int]:
        raise NotImplementedError

    def forward(self, x):
        x = self.downsample(x)
        indices = self._papr_state.indices_for(self._papr_grid(x))   # once for all blocks
        for block in self.blocks:
            run = block if indices is None else functools.partial(block._papr_forward,
                                                                  indices=indices)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(run, x, use_reentrant=False)
            else:
                x = run(x)
        return x


class _SwinStageMixin(_StageMixin):
    def _papr_grid(self, x):
        return int(x.shape[1]), int(x.shape[2])       # (B, H, W, C)


class _ConvNeXtStageMixin(_StageMixin):
    def _papr_grid(self, x):
        return int(x.shape[2]), int(x.shape[3])       # (B, C, H, W)


def _can_write_inplace(*tensors) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class _SwinBlockMixin:
    def _papr_forward(self, x, indices):
        x = x + self.drop_path1(self._attn(self.norm1(x)))           # dense: (B, H, W, C)
        rows = hierarchical.gather_rows(x, indices)                   # (B, k, C)
        delta = self.drop_path2(self.mlp(self.norm2(rows)))
        return hierarchical.scatter_back(x, indices, delta, inplace=_can_write_inplace(x, delta))


class _ConvNeXtBlockMixin:
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
        out = hierarchical.scatter_rows(rows, indices, like=shortcut)  # zeros at pruned positions
        return out.permute(0, 3, 1, 2)


_CLASS_CACHE = {}


def _swap(module, mixin, state) -> None:
    cls = module.__class__
    key = (mixin, cls)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type("PaPr" + cls.__name__, (mixin, cls), {})
    module._papr_orig_class = cls
    module._papr_state = state
    module.__class__ = _CLASS_CACHE[key]


# ---------------------------------------------------------------------------------------------
# Public API


def _check_args(model, proposal, z, stages, align_corners, num_stages):
    if not callable(proposal):
        raise TypeError(f"proposal must be callable (images -> (B, K, h, w) features), "
                        f"got {type(proposal).__name__}")
    z = validation.check_z(z)
    validation._check_flag("align_corners", align_corners)
    try:
        stages = tuple(stages)
    except TypeError:
        raise TypeError(f"stages must be a sequence of stage numbers, got "
                        f"{type(stages).__name__}") from None
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in stages):
        raise TypeError(f"stages must hold ints, got {stages}")
    if len(set(stages)) != len(stages) or not all(0 <= s < num_stages for s in stages):
        raise ValueError(f"stages must be distinct stage numbers in [0, {num_stages}), "
                         f"got {stages}")
    return z, tuple(int(s) for s in stages)


def _patch(model, proposal, z, stages, align_corners, stage_list, stage_mixin, block_mixin,
           check_block):
    z, stages = _check_args(model, proposal, z, stages, align_corners, len(stage_list))
    for s in stages:
        for block in stage_list[s].blocks:
            check_block(block)
    unpatch_hierarchical(model)
    state = _State(proposal, z, align_corners)
    _swap(model, _ModelMixin, state)
    model._papr_stages = stages
    for s in stages:
        _swap(stage_list[s], stage_mixin, state)
        for block in stage_list[s].blocks:
            _swap(block, block_mixin, state)
    return model


def patch_swin(model, proposal: Callable, z: float = DEFAULT_Z,
               stages: Sequence[int] = DEFAULT_STAGES, align_corners: bool = True):
    """Apply PaPr to a timm `SwinTransformer` in place (see the module docstring); returns it."""
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

    if not isinstance(model, SwinTransformer):
        raise TypeError(f"model must be a timm SwinTransformer, got {type(model).__name__}")

    def check_block(block):
        if not isinstance(block, SwinTransformerBlock):
            raise TypeError(f"model has a {type(block).__name__} block; only timm's "
                            f"SwinTransformerBlock is supported")

    return _patch(model, proposal, z, stages, align_corners, model.layers, _SwinStageMixin,
                  _SwinBlockMixin, check_block)


def patch_convnext(model, proposal: Callable, z: float = DEFAULT_Z,
                   stages: Sequence[int] = DEFAULT_STAGES, align_corners: bool = True):
    """Apply PaPr to a timm `ConvNeXt` in place (see the module docstring); returns it."""
    from timm.layers import GlobalResponseNormMlp
    from timm.models.convnext import ConvNeXt, ConvNeXtBlock

    if not isinstance(model, ConvNeXt):
        raise TypeError(f"model must be a timm ConvNeXt, got {type(model).__name__}")

    def check_block(block):
        if not isinstance(block, ConvNeXtBlock):
            raise TypeError(f"model has a {type(block).__name__} block; only timm's "
                            f"ConvNeXtBlock is supported")
        if isinstance(block.mlp, GlobalResponseNormMlp):
            raise ValueError("ConvNeXt-V2 blocks (GlobalResponseNorm, a statistic over all "
                             "positions) are not supported by PaPr's per-position pruning")

    return _patch(model, proposal, z, stages, align_corners, model.stages, _ConvNeXtStageMixin,
                  _ConvNeXtBlockMixin, check_block)


def is_hierarchical(model) -> bool:
    """True for the model families this module patches (timm SwinTransformer, ConvNeXt)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, (SwinTransformer, ConvNeXt))


def patch_hierarchical(model, proposal: Callable, z: float = DEFAULT_Z,
                       stages: Sequence[int] = DEFAULT_STAGES, align_corners: bool = True):
    """`patch_swin` or `patch_convnext`, by the model's type."""
    from timm.models.swin_transformer import SwinTransformer

    patch = patch_swin if isinstance(model, SwinTransformer) else patch_convnext
    return patch(model, proposal, z, stages, align_corners)


def unpatch_hierarchical(model):
    """Undo `patch_*` in place (a no-op on an unpatched model); returns the model."""
    for module in model.modules():
        cls = module.__dict__.pop("_papr_orig_class", None)
        if cls is not None:
            module.__class__ = cls
            module.__dict__.pop("_papr_state", None)
    model.__dict__.pop("_papr_stages", None)
    return model
