"""What every patched timm family shares: the state, the class swap, the proposal, pickling.

A patch swaps the `__class__` of the model (and, for hierarchical models, of some stages and
blocks) for a cached subclass `type("PaPr" + cls.__name__, (mixin, cls), {})`, the ToMe way.
Every swapped module carries two plain attributes (outside the module tree, so `state_dict()`
and `parameters()` are the model's own):

    _papr_original_class   the class to restore (the one marker `is_patched` looks for)
    _papr                  the `PaPrState` shared by the model and its swapped submodules
"""
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet
from torch import nn

from .. import spec
from ..api import prune, refuse_script
from ..proposal import Proposal

MARKER = "_papr_original_class"
STATE = "_papr"


class PerThread(threading.local):
    """One plain object per thread, `factory()`, as `.slot`, made in each thread's first use
    (threading.local runs __init__ there, so what torch.compile guards on, the slot's presence,
    is the same before and after the first forward). Stores go into the slot's attributes:
    torch.compile replays those when it resumes after a graph break, where a store into an
    attribute of the threading.local itself is lost (torch 2.14: a patched Swin / ConvNeXt
    then ran unpruned, a merging ViT pooled unweighted)."""

    def __init__(self, factory: Callable[[], object]):
        self.slot = factory()


class _Features:
    """The proposal features of the forward in progress; None outside a forward."""

    def __init__(self):
        self.features: Optional[torch.Tensor] = None


class PaPrState:
    """The settings of one patched model and the proposal features of the forward in progress
    (for Swin / ConvNeXt their float64 channel mean, `hierarchical.proposal_map`).

    The features are per thread (two threads may run one patched model at once) and exist only
    during a forward. Pickling keeps the settings and the proposal (with its weights).
    """

    def __init__(self, proposal: Optional[Proposal], z: float, order: str = "score",
                 merge_r: int = 0, stages: Optional[Sequence[int]] = None,
                 align_corners: bool = True):
        self.proposal = proposal
        self.z = z
        self.order = order
        self.merge_r = merge_r
        self.stages = stages
        self.align_corners = align_corners
        self._local = PerThread(_Features)

    @property
    def z(self) -> float:
        # Stored as text: torch.compile guards a string by value, so a new z recompiles once
        # with the constant, where a float attribute would turn symbolic after one change.
        return float(self._z)

    @z.setter
    def z(self, value) -> None:
        self._z = repr(spec.check_z(value))

    @property
    def features(self) -> Optional[torch.Tensor]:
        return self._local.slot.features

    @features.setter
    def features(self, value: Optional[torch.Tensor]) -> None:
        self._local.slot.features = value

    def proposal_features(self, images: torch.Tensor) -> torch.Tensor:
        """The proposal's features of `images` (the proposal follows their device and dtype:
        `Proposal`), checked against them."""
        f = self.proposal(images)   # a tensor: Proposal checks the type and unwraps lists
        if f.dim() != images.dim():
            want = "(B, K, h, w)" if images.dim() == 4 else "(B, K, t, h, w)"
            raise ValueError(f"proposal must return {want} features for "
                             f"{images.dim()}-D images, got shape {tuple(f.shape)}")
        if f.shape[0] != images.shape[0]:
            raise ValueError(f"proposal must return features with the batch size of the images "
                             f"({images.shape[0]}), got {f.shape[0]}")
        if f.device != images.device:
            raise ValueError(f"proposal must return features on the device of the images "
                             f"({images.device}), got {f.device}")
        return f

    def prune_tokens(self, x: torch.Tensor, images: torch.Tensor, grid: Tuple[int, int],
                     num_prefix_tokens: int, return_indices: bool = False):
        """`prune` of the tokens x (B, P + N, C) by the proposal's features of `images`, with
        this model's settings (z, order, align_corners); with `return_indices`, also the kept
        patch indices (B, k)."""
        return prune(x, self.proposal_features(images), self.z,
                     num_prefix_tokens=num_prefix_tokens, grid=grid,
                     align_corners=self.align_corners, order=self.order,
                     return_indices=return_indices)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = PerThread(_Features)


# ---------------------------------------------------------------------------------------------
# Class swapping


class Patched:
    """Base of every patched class: pickles as the original class plus the patch, so that
    torch.save / copy.deepcopy / multiprocessing of a patched model work (the patched classes
    are made at run time and cannot be found by name)."""

    def __reduce_ex__(self, protocol):
        mixin = type(self).__bases__[0]        # patched_class(mixin, original)
        return _rebuild, (mixin, self.__dict__[MARKER]), self.__getstate__()

    def __prepare_scriptable__(self):
        refuse_script(f"a patched {self.__dict__[MARKER].__name__}")


def _rebuild(mixin: type, original: type):
    module = original.__new__(original)
    module.__class__ = patched_class(mixin, original)
    return module


_CLASSES: Dict[Tuple[type, type], type] = {}


def patched_class(mixin: type, cls: type) -> type:
    assert issubclass(mixin, Patched), mixin
    if (mixin, cls) not in _CLASSES:
        _CLASSES[(mixin, cls)] = type("PaPr" + cls.__name__, (mixin, cls), {})
    return _CLASSES[(mixin, cls)]


def swap_class(module: nn.Module, mixin: type, state: PaPrState) -> None:
    """Make `module` an instance of mixin + its class, sharing `state`."""
    original = module.__dict__.get(MARKER, type(module))
    module.__dict__[MARKER] = original
    module.__dict__[STATE] = state
    module.__class__ = patched_class(mixin, original)


def restore_classes(model: nn.Module) -> None:
    """Undo every `swap_class` in the module tree of `model`."""
    for module in model.modules():
        original = module.__dict__.pop(MARKER, None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop(STATE, None)


def follow_model(model: nn.Module, state: PaPrState) -> None:
    """Put a `Proposal` where the model's images will be: on the device of the model's first
    floating parameter, in its dtype (`Proposal.follow`: a fixed dtype stays). Done by `patch`
    and by every `model.to(...)` / `.cuda()` / `.half()`, outside any forward, so that a
    compiled model never traces a cast of the proposal. Not to the meta device (it would drop
    the proposal's weights, which no state_dict brings back)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if isinstance(state.proposal, Proposal) and param is not None and param.device.type != "meta":
        state.proposal.follow(param.device, param.dtype)


class PatchedModel(Patched):
    """What a patched model shows its user: its settings, `papr_z` writable (checked)."""

    def _apply(self, fn, recurse=True):
        # to / cuda / half / ...: the proposal lives outside the module tree, so follow here.
        super()._apply(fn, recurse)
        follow_model(self, self._papr)
        return self

    @property
    def papr_z(self) -> float:
        return self._papr.z

    @papr_z.setter
    def papr_z(self, value) -> None:
        self._papr.z = value

    @property
    def papr_order(self) -> str:
        return self._papr.order

    @property
    def papr_merge_r(self) -> int:
        return self._papr.merge_r

    @property
    def papr_proposal(self) -> Proposal:
        return self._papr.proposal


# ---------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class Family:
    """A timm model family `patch` supports.

    `check(model, state)` raises on a model or setting the family cannot patch (and normalizes
    `state.stages`) before anything changes; `apply(model, state)` then swaps the classes of the
    model and of the submodules it changes (with `swap_class`); `options` names the `patch`
    options that apply to the family, `refusals` says why some other option does not;
    `replaces` names the methods of `model_class` the patched class reimplements (a subclass
    overriding one is refused by `patch`: `check_own_methods`).
    """

    model_class: type
    check: Callable[[nn.Module, PaPrState], None]
    apply: Callable[[nn.Module, PaPrState], None]
    default_z: float
    options: Tuple[str, ...]
    refusals: Mapping[str, str] = field(default_factory=dict)
    replaces: Tuple[str, ...] = ()


def check_own_methods(module: nn.Module, base: type, names: Sequence[str], what: str) -> None:
    """Refuse a `module` whose class overrides a method of `base` in `names`: methods the patch
    replaces (its mixin comes first in the MRO), so the override would be bypassed, silently.
    Overrides of the methods a patched one calls (e.g. a ViT's `_pos_embed`) are kept."""
    cls = module.__dict__.get(MARKER, type(module))
    for name in names:
        if getattr(cls, name) is not getattr(base, name):
            owner = next(c for c in cls.__mro__ if name in vars(c))
            raise TypeError(f"{what} is a {cls.__name__}, whose {name} (from {owner.__name__}) "
                            f"overrides timm's {base.__name__}.{name}; the patch replaces that "
                            f"method, so the override would be bypassed: not supported")


FAMILIES: Dict[type, Family] = {}


def register_family(family: Family) -> None:
    FAMILIES[family.model_class] = family


def family_of(model: nn.Module) -> Family:
    original = model.__dict__.get(MARKER, type(model))
    for base in original.__mro__:      # the most specific registered base first
        if base in FAMILIES:
            return FAMILIES[base]
    supported = ", ".join(sorted(c.__name__ for c in FAMILIES))
    raise TypeError(f"papr_kernels.timm.patch supports timm's {supported} (and subclasses), "
                    f"got {original.__name__}{_wrapper_hint(model)}")


def _wrapper_hint(model: nn.Module) -> str:
    """What to patch instead, for the wrappers users hold: timm's `features_only` models,
    torch.compile's and the data-parallel ones."""
    if isinstance(model, (FeatureDictNet, FeatureGetterNet, FeatureHookNet)):
        return (" (a timm features_only model): patch the full model (create_model without "
                "features_only) and take its feature maps from forward_intermediates(images, "
                "indices=..., intermediates_only=True) or from timm's FeatureGetterNet(model, "
                "out_indices) made after patch (pruned for Swin / ConvNeXt; dense for the "
                "ViT-like families, as documented)")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or \
            hasattr(model, "_orig_mod"):   # torch.compile's OptimizedModule
        return (" (a wrapper): patch the model it wraps, then wrap the patched model "
                "(torch.compile, DataParallel, DistributedDataParallel)")
    return ""
