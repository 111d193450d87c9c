"""One-line PaPr for timm models, in the style of ToMe's `tome.patch.timm(model)`.

    import timm, papr_kernels.timm
    model = timm.create_model("vit_base_patch16_224", pretrained=True).eval()
    papr_kernels.timm.patch(model, "mobileone_s0", z=0.5)  # pretrained MobileOne-S0 proposal
    model.papr_z = 0.3                                       # change between calls (checked)
    torch.save(model, "papr_vit.pt")                         # whole model, proposal included
    papr_kernels.timm.unpatch(model)                         # back to the original model

Families (each in its own module, registered with `register_family`):
- `VisionTransformer` and subclasses (DeiT distilled, register tokens, gap): `vit.py`; tokens
  are pruned once before the blocks (options `order`, `merge_r`).
- `Eva` and subclasses (EVA-02, timm's `vit_*_rope_*` and DINOv3 ViTs): `eva.py`; pruned at the
  place of the ViT one, the blocks get each sample's rotary embedding of its kept tokens
  (option `order`; `merge_r` is refused: merging is not defined with rotary embeddings).
- `Beit` (BEiT, BEiT v2): `beit.py`; pruned at the place of the ViT one, the blocks get each
  sample's relative position bias at its kept tokens (option `order`; `merge_r` is refused).
- `VisionTransformerRelPos` (`vit_relpos_*`, `vit_srelpos_*`): `relpos.py`; as Beit, with 0 or
  1 prefix token and the bias per block or shared (`_bias.py` holds what the two share).
- `Cait` (CaiT): `cait.py`; the patch tokens are pruned after their position embedding, before
  `blocks` (no prefix token there); the class attention attends to the kept tokens (option
  `order`; `merge_r` is refused).
- `NaFlexVit` (`naflexvit_*`: SigLIP-2 NaFlex, C-RADIO; ViT / Eva names with `use_naflex=True`):
  `naflexvit.py`; called with NCHW images, pruned after `embeds` (position embedding, prefix
  tokens) and the ROPE table, before timm's patch dropout (which drops among the kept) and the
  blocks, which get each sample's kept ROPE rows (option `order`; `merge_r` is refused). NaFlex
  mode (pre-patchified patches with `patch_coord` / `patch_valid`, a dict) raises at z < 1.
- `Hiera` (image models): `hiera.py`; whole mask units are kept (Hiera's own way to run on a
  subset of them), in spatial order, selected on the unit grid.
- `SwinTransformer`, `SwinTransformerV2` (`swin.py`), `ConvNeXt`, V1 and V2 (`convnext.py`) and
  `MetaFormer` (CAFormer, ConvFormer, PoolFormer: `metaformer.py`):
  the dense grid is kept and each pruned stage runs the per-token part of its blocks on the
  kept positions (option `stages`).

`patch` swaps classes (see `_core`): weights, `state_dict()` and other instances of the class are
untouched. The proposal network lives outside the module tree (not in `parameters()` or
`state_dict()`, always in eval mode) and follows the model (`patch` and `model.to(...)` put it on
the model's device and dtype: `_core.follow_model`) and the images. Pickling a patched
model (`torch.save(model)`, `copy.deepcopy`) keeps the patch and the proposal's weights.
"""
from typing import Callable, Optional, Sequence, Union

try:
    import timm  # noqa: F401  (absolute import: the real timm, not this package)
except ImportError as exc:
    raise ImportError("papr_kernels.timm needs timm: pip install timm (or papr_kernels[timm])"
                      ) from exc
from torch import nn

from .. import spec
from ..proposal import create as create_proposal
# each module registers one family
from . import (beit, cait, convnext, eva, hiera, metaformer, naflexvit, relpos,  # noqa: F401
               swin, vit)
from ._core import (MARKER, Family, PaPrState, check_own_methods, family_of, follow_model,
                    register_family, restore_classes)

__all__ = ["patch", "unpatch", "is_patched", "register_family", "Family"]


def is_patched(model: nn.Module) -> bool:
    """True when `model` was patched by `patch` (any family)."""
    return MARKER in model.__dict__


def patch(model: nn.Module, proposal: Union[str, nn.Module, Callable] = "mobileone_s0",
          z: Optional[float] = None, *, pretrained: bool = True, order: str = "score",
          merge_r: int = 0, stages: Optional[Sequence[int]] = None,
          align_corners: bool = True) -> nn.Module:
    """Make `model` prune its patch tokens with PaPr; returns the same (modified) model.

    Args:
        model: a timm `VisionTransformer`, `Eva`, `Beit`, `VisionTransformerRelPos`, `Cait`,
            `Hiera`, `NaFlexVit`, `SwinTransformer`, `SwinTransformerV2`, `ConvNeXt` or
            `MetaFormer` (or subclass; a subclass, or a stage / block subclass, overriding a
            method the patch replaces is refused).
        proposal: a timm ConvNet name (built by `papr_kernels.proposal.create` with its
            pretrained weights), a `Proposal`, or any `nn.Module` / callable mapping the images
            to (B, K, h, w) features (a module is put in eval mode and frozen, in place).
        z: keep ratio in (0, 1]; None means the family's default (0.5 for ViTs, Eva, Beit,
            ViT RelPos, CaiT, Hiera, NaFlexVit; 0.65 for Swin, ConvNeXt, MetaFormer, as in
            the published evaluation of Swin and ConvNeXt).
            `model.papr_z` changes it later.
        pretrained: for a proposal given by name: load its pretrained weights (default; offline
            the error says how to load a local file). False: random weights, for tests only.
        order: ViTs, Eva, Beit, ViT RelPos, CaiT, NaFlexVit: "score" (the published order, needed by
            merging) or "spatial".
        merge_r: ViTs: tokens merged per block (ToMe bipartite soft matching with proportional
            attention) in the second half of the blocks; 0 disables merging.
        stages: Swin / ConvNeXt / MetaFormer: the stages to prune (default: all four).
        align_corners: of the bicubic resize of the proposal map (True as published).

    Whether it pays is measured per family, dtype and batch size in docs/cpu-families.md and
    docs/gpu.md: e.g. Swin / ConvNeXt / MetaFormer in bf16 on a CPU are slower pruned at one
    image (0.85-0.94x, whatever `stages`) and faster from B = 8.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    family = family_of(model)
    merge_r = spec.check_int("merge_r", merge_r)  # TypeError / ValueError before other options
    _check_options(family, order=order != "score", merge_r=merge_r != 0, stages=stages is not None)
    if merge_r and spec.check_order(order) != "score":
        raise ValueError("merge_r needs order='score' (merging pairs tokens of alternating "
                         f"ranks, as published), got order={order!r}")
    state = PaPrState(proposal=None, z=family.default_z if z is None else z,
                      order=spec.check_order(order), merge_r=merge_r,
                      stages=stages, align_corners=spec.check_flag("align_corners", align_corners))
    check_own_methods(model, family.model_class, family.replaces, "model")
    family.check(model, state)
    state.proposal = create_proposal(proposal, pretrained=pretrained)  # as is if a Proposal
    unpatch(model)
    family.apply(model, state)
    follow_model(model, state)
    return model


def _check_options(family: Family, **given: bool) -> None:
    for option, is_set in given.items():
        if is_set and option not in family.options:
            reason = family.refusals.get(option)
            raise ValueError(f"{option} does not apply to {family.model_class.__name__} models"
                             + (f": {reason}" if reason else "")
                             + f" (options: {', '.join(family.options) or 'none'})")


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch` in place (a no-op on an unpatched model): the original classes again."""
    restore_classes(model)
    return model
