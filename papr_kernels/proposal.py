"""Proposal networks: the lightweight ConvNet whose last feature map ranks the patches.

    proposal = papr_kernels.proposal.create("mobileone_s0")   # any timm ConvNet, stride 32
    f = proposal(images)                                      # (B, K, h, w), no grad

`create` builds the timm model with `features_only=True, out_indices=(-1,)` (its last stage)
and its pretrained weights (timm downloads them once into its cache; `pretrained=False` gives
random weights, for tests only: PaPr needs a trained ConvNet), reparameterizes it where timm can
(MobileOne's branches fold into single convolutions), puts it in eval mode, freezes it and runs
it under `torch.no_grad`. A user `nn.Module` that returns (B, K, h, w) (or a list/tuple whose
last entry is that) is wrapped the same way: note that this puts that module itself in eval mode
and freezes its parameters (in place). Any other callable is wrapped as is.
"""
from typing import Callable, Optional, Union

import torch
from torch import nn

__all__ = ["Proposal", "create"]


class Proposal(nn.Module):
    """A frozen feature extractor: eval mode forever, no gradients, returns one (B, K, h, w) map.

    It follows the images it is given: moved to their device, and run in their floating dtype
    (its parameters cast in place) unless `dtype` fixes one (the images are then cast to it);
    under autocast its parameters stay as they are and autocast picks the compute dtype. A cast
    back to an earlier dtype restores the weights of then bit for bit (unless they were changed
    meanwhile): following bf16 images once does not round an fp32 proposal for good. An image
    network's weights are made channels_last in place and its images follow (cuDNN's and
    oneDNN's fast NHWC kernels: MobileOne-S0 at B = 8 on the 2-core CPU ~1.4x faster than NCHW).

    `compiled=True` (or a dict of `torch.compile` arguments) runs the network through
    `torch.compile` (static shapes), compiled on first use and again when the images' device,
    dtype or shape change; inside a compiled model it is simply traced with the model. The
    compiled function is not saved with the module (pickling drops it; it recompiles on use).
    """

    def __init__(self, network: Union[nn.Module, Callable], dtype: Optional[torch.dtype] = None,
                 compiled: Union[bool, dict] = False):
        super().__init__()
        self.network = network if isinstance(network, nn.Module) else _Function(network)
        self.dtype = dtype
        if not isinstance(compiled, (bool, dict)):
            raise TypeError(f"compiled must be a bool or a dict of torch.compile arguments, got "
                            f"{type(compiled).__name__}")
        self.compiled = compiled
        self.__dict__["_compiled_network"] = None  # not a submodule: kept out of the state_dict
        self.train(False)
        self.network.requires_grad_(False)
        # NHWC: the fast convolutions of cuDNN and oneDNN, for image networks (4-D weights, none
        # 5-D). In place, like the freezing above. Done here, not on the first call, so that a
        # compiled model and the eager one see the same weights (no recompile between them).
        ranks = {p.dim() for p in self.network.parameters()}
        if 4 in ranks and 5 not in ranks:
            self.network.to(memory_format=torch.channels_last)

    def __getstate__(self):
        state = super().__getstate__()
        state["_compiled_network"] = None
        state.pop("_snapshots", None)
        return state

    def _apply(self, fn, recurse=True):
        """Module._apply (`to`, `cuda`, `half`, ... and following the images) with exact round
        trips: a cast back to dtypes the weights had before restores their values from then,
        unless the weights were changed meanwhile. Following bf16 images once (or a bf16 model
        sharing the proposal) must not round an fp32 proposal for good."""
        before = [t.detach().clone() for t in self._floating_tensors()]
        old_dtypes = tuple(t.dtype for t in before)
        snapshots = self.__dict__.setdefault("_snapshots", {})   # dtypes -> values; not state
        snapshots[old_dtypes] = before
        super()._apply(fn, recurse)
        after = self._floating_tensors()
        earlier = snapshots.get(tuple(t.dtype for t in after))
        if earlier is not None and earlier is not before and all(
                torch.equal(e.to(b.device, b.dtype), b) for e, b in zip(earlier, before)):
            with torch.no_grad():
                for t, e in zip(after, earlier):
                    t.copy_(e)
        return self

    def _floating_tensors(self):
        return [t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()]

    def train(self, mode: bool = True) -> "Proposal":
        # Stays in eval mode whatever the enclosing model does (BatchNorm statistics are frozen).
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._follow(x)
        with torch.no_grad():
            f = self._network_for_call()(x)
        if isinstance(f, (list, tuple)):
            f = f[-1]
        if not isinstance(f, torch.Tensor) or f.dim() not in (4, 5):
            got = type(f).__name__ if not isinstance(f, torch.Tensor) else f"shape {tuple(f.shape)}"
            raise ValueError(f"proposal network must return (B, K, h, w) or (B, K, t, h, w) "
                             f"features, got {got}")
        return f

    def _network_for_call(self) -> Callable:
        if not self.compiled or torch.compiler.is_compiling():
            return self.network
        if self.__dict__.get("_compiled_network") is None:
            options = {"dynamic": False, **(self.compiled if isinstance(self.compiled, dict) else {})}
            self.__dict__["_compiled_network"] = torch.compile(self.network, **options)
        return self.__dict__["_compiled_network"]

    def follow(self, device: torch.device, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
        """Put the network on `device`, in the dtype it runs in for images of `dtype`: the fixed
        `self.dtype` if any, else `dtype` if floating, else its own (in place, once: later calls
        find it there; the weights keep their memory format). Returns that dtype (None for a
        network without parameters, left as it is)."""
        param = next(self.parameters(), None)
        if param is None:
            return None
        floating = dtype is not None and dtype.is_floating_point
        dtype = self.dtype or (dtype if floating else param.dtype)
        if param.device != device or param.dtype != dtype:
            self.to(device=device, dtype=dtype)
        return dtype

    def _follow(self, images: torch.Tensor) -> torch.Tensor:
        """The network follows `images` (under autocast, their device only: autocast picks the
        compute dtype); the images in the dtype and memory format it runs in."""
        autocast = torch.is_autocast_enabled(images.device.type)
        dtype = self.follow(images.device, None if autocast else images.dtype)
        if dtype is None:
            return images
        images = images.to(dtype)
        if images.dim() == 4 and _is_channels_last(self):
            return images.contiguous(memory_format=torch.channels_last)
        return images


def _is_channels_last(module: nn.Module) -> bool:
    """Whether the module has a 4-D parameter (a conv's weight) and the first is channels_last."""
    weight = next((p for p in module.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last)


class _Function(nn.Module):
    """A plain callable as a module (no parameters)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def create(name: Union[str, nn.Module, Callable] = "mobileone_s0", pretrained: bool = True, *,
           dtype: Optional[torch.dtype] = None, compiled: Union[bool, dict] = False,
           **timm_kwargs) -> Proposal:
    """A frozen proposal network: a timm ConvNet by name, or a user module wrapped as is.

    Args:
        name: a timm model name (a ConvNet with `features_only` support), or an `nn.Module`
            (or any callable) returning (B, K, h, w) features of the images.
        pretrained: load timm's pretrained weights (default). False gives random weights, for
            tests and demos: the selected tokens are then noise.
        dtype: run the proposal in this dtype whatever the images' (None: follow the images).
        compiled: run the network through `torch.compile` (True, or a dict of its arguments,
            e.g. `{"mode": "max-autotune"}`, or `{"mode": "reduce-overhead"}` for CUDA graphs of
            the proposal at fixed shapes): on a GPU the proposal is a large share of a pruned
            model's time, and compiling it is the lever that does not change its output's meaning.
        **timm_kwargs: further `timm.create_model` arguments, e.g.
            `pretrained_cfg_overlay=dict(file="/path/to/weights.safetensors")` to load a local
            file offline.
    """
    if isinstance(name, Proposal):
        return name
    if not isinstance(name, str):
        if not callable(name):
            raise TypeError(f"proposal must be a timm model name, an nn.Module or a callable "
                            f"(images -> (B, K, h, w) features), got {type(name).__name__}")
        if timm_kwargs:
            raise ValueError("timm_kwargs apply to a timm model name, not to a module")
        return Proposal(name, dtype, compiled)
    try:
        import timm
        from timm.utils.model import reparameterize_model
    except ImportError as exc:
        raise ImportError(f"a proposal named {name!r} is a timm model: pip install timm (or "
                          f"papr_kernels[timm]), or pass an nn.Module") from exc

    kwargs = {"features_only": True, "out_indices": (-1,)}
    kwargs.update(timm_kwargs)
    try:
        network = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if not pretrained or isinstance(exc, RuntimeError) and "Unknown model" in str(exc):
            raise
        raise RuntimeError(
            f"could not load the pretrained weights of the proposal {name!r} "
            f"({type(exc).__name__}: {exc}). Offline, give timm a local file: "
            f"pretrained_cfg_overlay=dict(file='/path/to/weights') (e.g. "
            f"papr_kernels.proposal.create({name!r}, pretrained_cfg_overlay=...)), or pass "
            f"pretrained=False for random weights (tests only: the kept tokens are then noise)"
        ) from exc
    network.eval()
    network = reparameterize_model(network)  # a no-op for models without reparameterizable blocks
    return Proposal(network, dtype, compiled)
