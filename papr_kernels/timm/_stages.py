"""What the hierarchical families (Swin, ConvNeXt, MetaFormer) share: the model and stage mixins.

Per forward pass the proposal runs once on the images (without gradient) and its features are
reduced once to their float64 channel mean (`hierarchical.proposal_map`), kept for the forward;
each pruned stage, after its downsampling, selects the top int(H*W*z) positions of its own
(H, W) grid from that map (`hierarchical.select`: SPEC's scores and total order, the same
positions as from the features) once, in ascending order (the branch is per position, so the
order does not change the output, and neighbouring kept rows are neighbouring positions), maps
each position to its kept row once (`hierarchical.kept_row_map`, for the ops that write every
position), and all its blocks use both through their `_papr_forward(x, indices, row_of)`.
With z = 1 every position is kept and the original forward runs: the output is the unpatched model's.
"""
import functools
import numbers
from typing import Tuple

import torch
from timm.layers import LayerNorm, LayerNorm2d
from torch.utils.checkpoint import checkpoint

from torch import nn

from .. import hierarchical, spec
from ._core import MARKER, Patched, PatchedModel, check_own_methods, swap_class

DEFAULT_Z = 0.65                 # the published evaluation scripts' keep ratio for both families
OPTIONS = ("stages",)


class HierarchicalModel(PatchedModel):
    """The model: the proposal map (`hierarchical.proposal_map` of the proposal's features) is
    set (for this thread) while a forward runs."""

    def forward_features(self, x):
        return self._papr_run(super().forward_features, x)

    def forward_intermediates(self, x, *args, **kwargs):
        return self._papr_run(super().forward_intermediates, x, *args, **kwargs)

    def _papr_run(self, forward, images, *args, **kwargs):
        state = self._papr
        if state.features is not None:   # nested call (forward_intermediates -> forward_features)
            return forward(images, *args, **kwargs)
        state.features = hierarchical.proposal_map(state.proposal_features(images))
        try:
            return forward(images, *args, **kwargs)
        finally:
            state.features = None


class PrunedStage(Patched):
    """A stage: downsample, select once, then its blocks on the kept positions."""

    def _papr_grid(self, x) -> Tuple[int, int]:
        raise NotImplementedError

    def _papr_layout(self, x):
        """x in the memory layout the blocks' row ops read best (as is by default)."""
        return x

    def _papr_reads_row_map(self) -> bool:
        """Whether the blocks' ops read `row_of` (built once per stage only then)."""
        return True

    def forward(self, x):
        x = self.downsample(x)
        return self._papr_blocks(x, self._papr_grid(x))

    def _papr_blocks(self, x, grid: Tuple[int, int]):
        """The blocks on x (the stage's input after its downsampling) of this grid."""
        indices = self._papr_indices(grid)                  # once for all blocks
        if indices is not None:
            x = self._papr_layout(x)
            row_of = hierarchical.kept_row_map(indices, grid) if self._papr_reads_row_map() \
                else None
        for block in self.blocks:
            run = block if indices is None else functools.partial(
                block._papr_forward, indices=indices, row_of=row_of)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(run, x, use_reentrant=False)
            else:
                x = run(x)
        return x

    def _papr_indices(self, grid: Tuple[int, int]):
        """The kept positions (B, k) of this stage's grid, or None when nothing is pruned."""
        state = self._papr
        if spec.keep_count(grid[0] * grid[1], state.z, 0) == grid[0] * grid[1]:
            return None
        if state.features is None:
            raise RuntimeError(
                f"a pruned {self.__dict__[MARKER].__name__} ran outside its model's "
                f"forward_features / forward_intermediates, where the proposal sees the images "
                f"(e.g. the stages of a patched model flattened into timm's FeatureListNet, or "
                f"called one by one), and would have run unpruned; use the patched model's "
                f"forward_intermediates (timm's FeatureGetterNet calls it), set "
                f"model.papr_z = 1 or unpatch")
        return hierarchical.select(state.features, grid, state.z, state.align_corners,
                                   order="spatial")


class AddBackStage(PrunedStage):
    """A stage whose blocks add their branch back with `add_back` (Swin, MetaFormer)."""

    def _papr_reads_row_map(self) -> bool:
        # Without grad the blocks add back in place (no map read); the out-of-place add of a
        # recorded forward reads it.
        return torch.is_grad_enabled()


def gather_norm(norm: nn.Module, x: torch.Tensor, indices: torch.Tensor,
                channels_first: bool = False) -> torch.Tensor:
    """norm of x's rows at `indices`, (B, k, C): one fused gather + LayerNorm when norm is a plain
    LayerNorm over the channels (torch's or timm's LayerNorm / LayerNorm2d: per position, the
    same statistics), else the gathered rows through the module (`channels_first`: a norm of
    (B, C, H, W) maps, run on the rows as a map: `on_rows_as_map`)."""
    if _is_channel_layer_norm(norm, x.shape[-1]):
        return hierarchical.gather_layer_norm(x, indices, norm.weight, norm.bias, norm.eps)
    rows = hierarchical.gather_rows(x, indices)
    return on_rows_as_map(norm, rows) if channels_first else norm(rows)


def on_rows_as_map(modules, rows: torch.Tensor) -> torch.Tensor:
    """`modules` (one, or a sequence applied in order) of NCHW maps (1x1 convs, per-channel
    scales, LayerNorm2d, GRN) run on the rows (B, k, C) seen as a (B, C, 1, k) map, channels-last
    in memory without a copy, and the output returned as rows (B, k, C'). Width k, not height:
    torch reads a (B, C, k, 1) view as NCHW and oneDNN then reorders every 1x1 convolution's
    input and output (8x slower in bf16 here)."""
    x = rows.transpose(1, 2).unsqueeze(2)
    for module in modules if isinstance(modules, (tuple, list)) else (modules,):
        x = _run_channels_last(module, x)
    return x.squeeze(2).transpose(1, 2)


def _run_channels_last(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a channels-last (B, C, 1, k) x. Under torch.compile its 1x1 convolutions'
    weights are passed as channels-last views of themselves (the same memory): Inductor gives the
    size-1 dim of x stride 0, which ATen no longer reads as channels-last, and only the weight
    then keeps the convolution channels-last (else its output is NCHW: a transposing copy per
    convolution, CAFormer-S18 bf16 B = 8 on CPU: 27 of 198 ms). Effective from torch 2.14
    (2.11's Inductor re-strides the views too: no effect, no harm). Not under export (standard
    views only there)."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return module(x)
    weights = {f"{name}.weight": _channels_last_view(conv.weight)
               for name, conv in module.named_modules()
               if isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1)}
    return torch.func.functional_call(module, weights, (x,)) if weights else module(x)


def _channels_last_view(weight: torch.Tensor) -> torch.Tensor:
    """A (O, I, 1, 1) weight as channels-last strides (I, 1, I, I): the same elements in the same
    memory, which ATen's memory-format heuristic reads as channels-last; as it is when its
    elements are not laid out (O, I) row-major."""
    channels = weight.shape[1]
    if weight.stride(1) != 1 or weight.stride(0) != channels:
        return weight
    return weight.as_strided(weight.shape, (channels, 1, channels, channels))


def add_back(x: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor, row_of=None):
    """x plus `delta` (B, k, C) at the kept positions (in place where no gradient is
    recorded): the residual add of a branch run on the kept rows."""
    if delta.dtype != x.dtype:        # autocast: promote as the dense `x + delta` would
        dtype = torch.promote_types(x.dtype, delta.dtype)
        x, delta = x.to(dtype), delta.to(dtype)
    return hierarchical.scatter_back(x, indices, delta, inplace=_can_write_inplace(x, delta),
                                     row_of=row_of)


def _can_write_inplace(*tensors) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _is_channel_layer_norm(norm: nn.Module, channels: int) -> bool:
    return type(norm) in (nn.LayerNorm, LayerNorm, LayerNorm2d) and \
        tuple(norm.normalized_shape) == (channels,) and not getattr(norm, "_fast_norm", False)


def check_stages(stages, num_stages: int) -> Tuple[int, ...]:
    """`stages` as a tuple of distinct stage numbers in [0, num_stages); None means all."""
    if stages is None:
        return tuple(range(num_stages))
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
    return tuple(int(s) for s in stages)


def pruned_blocks(state, stage_list, stage_class: type, block_class: type):
    """Normalize `state.stages` and yield the blocks of the pruned stages, each stage checked to
    be a `stage_class` and each block a `block_class` (what the family's mixins are written
    for), neither overriding the `forward` that the mixins replace."""
    state.stages = check_stages(state.stages, len(stage_list))
    for s in state.stages:
        stage = stage_list[s]
        _check_module(stage, stage_class, f"model stage {s}")
        for i, block in enumerate(stage.blocks):
            _check_module(block, block_class, f"model stage {s} block {i}")
            yield block


def _check_module(module: nn.Module, timm_class: type, what: str) -> None:
    if not isinstance(module, timm_class):
        raise TypeError(f"{what} is a {type(module).__name__}; only timm's "
                        f"{timm_class.__name__} is supported")
    check_own_methods(module, timm_class, ("forward",), what)


def apply(model, state, stage_list, stage_mixin, block_mixin) -> None:
    """Swap the classes of the model, of the pruned stages and of their blocks."""
    swap_class(model, HierarchicalModel, state)
    for s in state.stages:
        swap_class(stage_list[s], stage_mixin, state)
        for block in stage_list[s].blocks:
            swap_class(block, block_mixin, state)
