"""One-line PaPr for timm models, in the style of ToMe's `tome.patch.timm(model)`.

    import timm, papr_kernels.timm
    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    papr_kernels.timm.patch(model, "mobileone_s0", z=0.5)     # prune to half the patches
    model.papr_z = 0.3                                          # change between calls
    papr_kernels.timm.unpatch(model)                            # back to the original model

`patch` swaps the instance's class for a subclass that overrides the family's forward (weights,
parameters, state_dict and the other instances of the class are untouched). The proposal network
is kept outside the module tree (not in `parameters()` or `state_dict()`, unaffected by
`model.train()`); it moves to the input's device on first use.

Model families register themselves with `register_family(base_class, patch_fn)`; dispatch takes
the most specific registered base class of the model's type. ViT (`VisionTransformer` and its
subclasses: DeiT distilled, register-token, gap models) lives in `papr_kernels._timm_vit`; other
families (Swin, ConvNeXt) add their own modules the same way.
"""
from typing import Callable, Dict, Optional, Sequence, Union

import timm  # noqa: F401  (absolute import: the real timm, not this module)
import torch
from torch import nn

from . import validation
from .proposal import Proposal, create as create_proposal

__all__ = ["patch", "unpatch", "is_patched", "register_family"]

_FAMILIES: Dict[type, Callable[[nn.Module], type]] = {}
_PATCHED_CLASSES: Dict[type, type] = {}


def register_family(base_class: type, make_class: Callable[[type], type]) -> None:
    """Register a model family: `make_class(original_class)` returns the patched subclass."""
    _FAMILIES[base_class] = make_class


def _load_families() -> None:
    from . import _timm_vit  # noqa: F401  (registers VisionTransformer)


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _load_families()
        for base in cls.__mro__:  # most specific registered base first
            if base in _FAMILIES:
                _PATCHED_CLASSES[cls] = _FAMILIES[base](cls)
                break
        else:
            supported = ", ".join(sorted(b.__name__ for b in _FAMILIES))
            raise TypeError(f"papr_kernels.timm.patch supports {supported} (and subclasses), "
                            f"got {cls.__name__}")
    return _PATCHED_CLASSES[cls]


def is_patched(model: nn.Module) -> bool:
    return "_papr_original_class" in model.__dict__


def patch(model: nn.Module, proposal: Union[str, nn.Module] = "mobileone_s0",
          z: Optional[float] = None, order: str = "score", merge_r: int = 0,
          stages: Optional[Sequence[int]] = None) -> nn.Module:
    """Make `model` prune its patch tokens with PaPr; returns the same (modified) model.

    Args:
        model: a timm model of a registered family (`VisionTransformer` and subclasses).
        proposal: a timm ConvNet name for `papr_kernels.proposal.create` (random weights unless
            you pass a created `pretrained=True` proposal), or any `nn.Module` returning
            (B, K, h, w) features of the same input image.
        z: keep ratio in (0, 1]; None means the family's default (0.5 for ViTs; 0.65 for Swin
            and ConvNeXt, as in the published evaluation). For ViTs it is stored as
            `model.papr_z` and may be changed between calls.
        order: "score" (the published order, needed by merging) or "spatial".
        merge_r: tokens merged per block (ToMe bipartite soft matching with proportional
            attention) in the second half of the blocks; 0 disables merging (ViTs only).
        stages: the stages to prune of a Swin or ConvNeXt (default: all four); see
            `papr_kernels.timm_hierarchical`.
    """
    if _is_hierarchical(model):
        return _patch_hierarchical(model, proposal, z, order, merge_r, stages)
    if stages is not None:
        raise ValueError("stages applies to hierarchical models (Swin, ConvNeXt) only")
    z = 0.5 if z is None else z
    validation.check_z(z)
    if order not in validation.ORDERS:
        raise ValueError(f"order must be one of {validation.ORDERS}, got {order!r}")
    if isinstance(merge_r, bool) or not isinstance(merge_r, int) or merge_r < 0:
        raise ValueError(f"merge_r must be a non-negative int, got {merge_r!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(proposal, Proposal):
        proposal = create_proposal(proposal)

    original = model.__dict__.get("_papr_original_class", type(model))
    patched = _patched_class(original)
    if merge_r and hasattr(patched, "_papr_check_merge"):
        patched._papr_check_merge(model)
    # Plain attributes, outside the module tree (a Module value would be registered otherwise).
    model.__dict__["_papr_original_class"] = original
    model.__dict__["_papr_proposal"] = proposal
    model.papr_z = z
    model.papr_order = order
    model.papr_merge_r = merge_r
    model.__class__ = patched
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: the original class again, PaPr's attributes removed."""
    if _is_hierarchical(model):
        from . import timm_hierarchical
        return timm_hierarchical.unpatch_hierarchical(model)
    if not is_patched(model):
        return model
    model.__class__ = model.__dict__.pop("_papr_original_class")
    for name in ("_papr_proposal", "papr_z", "papr_order", "papr_merge_r"):
        model.__dict__.pop(name, None)
    return model


def run_proposal(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The proposal features of `images`, the proposal moved to their device on first use."""
    proposal: Proposal = model.__dict__["_papr_proposal"]
    param = next(proposal.parameters(), None)
    if param is not None:
        if param.device != images.device:
            proposal.to(images.device)
        images = images.to(param.dtype)
    return proposal(images)



def _is_hierarchical(model) -> bool:
    from . import timm_hierarchical
    return timm_hierarchical.is_hierarchical(model)


def _patch_hierarchical(model, proposal, z, order, merge_r, stages):
    from . import timm_hierarchical
    if merge_r:
        raise ValueError("merge_r applies to ViTs only: Swin and ConvNeXt keep the dense grid")
    if order != "score":
        raise ValueError("order applies to ViTs only: Swin and ConvNeXt keep the dense grid")
    if not isinstance(proposal, Proposal):
        proposal = create_proposal(proposal)
    z = timm_hierarchical.DEFAULT_Z if z is None else z
    stages = timm_hierarchical.DEFAULT_STAGES if stages is None else stages
    return timm_hierarchical.patch_hierarchical(model, proposal, z, stages)
