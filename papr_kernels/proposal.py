"""Proposal networks: the lightweight ConvNet whose last feature map ranks the patches.

    proposal = papr_kernels.proposal.create("mobileone_s0")   # any timm ConvNet, stride 32
    f = proposal(images)                                      # (B, K, h, w), no grad

`create` builds the timm model with `features_only=True, out_indices=(-1,)` (its last stage) and
its pretrained weights (timm downloads them once into its cache; `pretrained=False` gives random
weights, for tests only: PaPr needs a trained ConvNet), reparameterizes it where timm can
(MobileOne's branches fold into single convolutions, and their ReLUs into those: `ConvReLU`),
puts it in eval mode, freezes it and runs it under `torch.no_grad`. A user `nn.Module` that
returns (B, K, h, w) (or a list/tuple whose last entry is that) is wrapped the same way: note
that this puts that module itself in eval mode and freezes its parameters (in place). Any other
callable is wrapped as is.
"""
import itertools
import numbers
import warnings
import weakref
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import spec

__all__ = ["Proposal", "create", "ConvReLU", "conv_relu_blocks", "fuse_conv_relu"]


class Proposal(nn.Module):
    """A frozen feature extractor: eval mode forever, no gradients, returns one (B, K, h, w) map.

    It follows the images it is given: moved to their device, and run in their floating dtype
    (its parameters cast in place) unless `dtype` fixes one (the images are then cast to it);
    under autocast its parameters stay as they are and autocast picks the compute dtype. A cast
    back to an earlier dtype restores the weights of then bit for bit (unless they were changed
    meanwhile): following bf16 images once does not round an fp32 proposal for good. An image
    network's weights are made channels_last in place and its images follow (cuDNN's and
    oneDNN's fast NHWC kernels: MobileOne-S0 at B = 8 on the 2-core CPU ~1.4x faster than NCHW).

    `compiled=True` (or a dict of `torch.compile` arguments, `{}` included) runs the network
    through `torch.compile` (static shapes), compiled on first use and again when the images'
    device, dtype or shape change; inside a compiled model it is simply traced with the model,
    and under `torch.jit.trace` the plain network runs. The compiled function is not saved with
    the module (pickling drops it; it recompiles on use).

    A fixed `dtype` holds under autocast too (the network then runs with autocast off). A user
    module that its owner puts back in training mode (it stays in the owner's module tree) is
    put back in eval mode by the next call: its BatchNorm statistics stay frozen.

    `image_size` (opt-in; None, the default, gives the network the images as they are): an int
    or (h, w); images of another size are resized to it before the network (video: each frame),
    a cheaper proposal with a coarser map (MobileOne-S0 at 160 px: 5 x 5 instead of 7 x 7); it
    changes which tokens are kept (docs/design.md, "The proposal network").
    """

    _image_size: Optional[Tuple[int, int]] = None   # also for proposals pickled before it

    def __init__(self, network: Union[nn.Module, Callable], dtype: Optional[torch.dtype] = None,
                 compiled: Union[bool, dict] = False,
                 image_size: Union[None, int, Tuple[int, int]] = None):
        super().__init__()
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in spec.DTYPES):
            raise TypeError(f"dtype must be None (follow the images) or a floating torch.dtype "
                            f"({', '.join(str(d) for d in spec.DTYPES)}), got "
                            f"{dtype if isinstance(dtype, torch.dtype) else type(dtype).__name__}")
        if not isinstance(compiled, (bool, dict)):
            raise TypeError(f"compiled must be a bool or a dict of torch.compile arguments, got "
                            f"{type(compiled).__name__}")
        self.image_size = image_size   # checked before the network is changed (below)
        self.network = network if isinstance(network, nn.Module) else _Function(network)
        self.dtype = dtype
        self.compiled = compiled
        self.__dict__["_compiled_network"] = None  # not a submodule: kept out of the state_dict
        self.train(False)
        self.network.requires_grad_(False)
        # NHWC: the fast convolutions of cuDNN and oneDNN, for image networks (4-D weights, none
        # 5-D). In place, like the freezing above. Done here, not on the first call, so that a
        # compiled model and the eager one see the same weights (no recompile between them).
        ranks = {t.dim() for t in _floating(self.network)}
        if 4 in ranks and 5 not in ranks:
            self.network.to(memory_format=torch.channels_last)

    @property
    def image_size(self) -> Optional[Tuple[int, int]]:
        """(h, w) the images are resized to before the network, or None (as they are)."""
        return self._image_size

    @image_size.setter
    def image_size(self, value) -> None:
        self.__dict__["_image_size"] = _check_image_size(value)

    def extra_repr(self) -> str:
        options = {"dtype": self.dtype, "compiled": self.compiled, "image_size": self.image_size}
        defaults = {"dtype": None, "compiled": False, "image_size": None}
        return ", ".join(f"{k}={v!r}" for k, v in options.items() if v != defaults[k])

    def __getstate__(self):
        state = super().__getstate__()
        state["_compiled_network"] = None
        state.pop("_snapshots", None)
        state.pop("_versions", None)    # weak references: not picklable, and about this process
        state.pop("_dtypes_seen", None)  # about this machine's CPU
        return state

    def _apply(self, fn, recurse=True):
        """Module._apply (`to`, `cuda`, `half`, ... and following the images) with exact round
        trips: a cast back to dtypes the weights had before restores their values from then,
        unless the weights were changed meanwhile. Following bf16 images once (or a bf16 model
        sharing the proposal) must not round an fp32 proposal for good.

        The weights a dtype change leaves are kept (no copy: the old tensors themselves) per
        dtypes, on the device of the live weights (they follow device moves; a pure move keeps
        nothing new). Any change of the weights between two `_apply` calls (`load_state_dict`,
        `copy_`, an in-place op: their version counters) drops every snapshot."""
        snapshots = self.__dict__.setdefault("_snapshots", {})   # dtypes -> values; not state
        before_tensors = self._floating_tensors()
        if not self._unchanged_since_last_apply(before_tensors):
            snapshots.clear()
        before = [t.detach() for t in before_tensors]   # the old values: _apply replaces .data
        old_dtypes = tuple(t.dtype for t in before)
        super()._apply(fn, recurse)
        after = self._floating_tensors()
        new_dtypes = tuple(t.dtype for t in after)
        if new_dtypes != old_dtypes and len(after) == len(before):
            snapshots[old_dtypes] = [
                b.clone() if _shares_storage(b, a) else b for b, a in zip(before, after)]
        earlier = snapshots.pop(new_dtypes, None)       # the live weights hold these dtypes now
        if earlier is not None and new_dtypes != old_dtypes and len(earlier) == len(after) and \
                all(e.shape == a.shape for e, a in zip(earlier, after)) and all(
                torch.equal(e.to(b.device, b.dtype), b) for e, b in zip(earlier, before)):
            with torch.no_grad():
                for t, e in zip(after, earlier):
                    t.copy_(e)
        for key, values in snapshots.items():           # where the weights went (a move)
            if len(values) == len(after):
                snapshots[key] = [v if v.device == a.device else v.to(a.device)
                                  for v, a in zip(values, after)]
        self.__dict__["_versions"] = [(weakref.ref(t), _version(t)) for t in after]
        return self

    def _unchanged_since_last_apply(self, tensors) -> bool:
        """Whether `tensors` are the ones the last `_apply` left, with the same versions."""
        versions = self.__dict__.get("_versions")
        if versions is None:
            return True   # no earlier _apply (or unpickled): there are no snapshots either
        return len(versions) == len(tensors) and all(
            ref() is t and _version(t) == version   # None: an inference tensor, unknown
            for (ref, version), t in zip(versions, tensors))

    def _floating_tensors(self):
        return list(_floating(self))

    def train(self, mode: bool = True) -> "Proposal":
        # Stays in eval mode whatever the enclosing model does (BatchNorm statistics are frozen).
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.network.training:       # its owner's .train() reaches a user module: frozen
            self.network.train(False)
        x = self._follow(x)
        network = self._network_for_call()
        with torch.no_grad():
            if self.dtype is not None and torch.is_autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):   # the fixed dtype holds
                    f = network(x)
            else:
                f = network(x)
        if isinstance(f, (list, tuple)):
            if not f:
                raise ValueError(f"proposal network returned no features (an empty "
                                 f"{type(f).__name__}); it must return (B, K, h, w) or "
                                 f"(B, K, t, h, w) features, or a list/tuple ending with them")
            f = f[-1]
        if not isinstance(f, torch.Tensor) or f.dim() not in (4, 5):
            got = type(f).__name__ if not isinstance(f, torch.Tensor) else f"shape {tuple(f.shape)}"
            raise ValueError(f"proposal network must return (B, K, h, w) or (B, K, t, h, w) "
                             f"features, got {got}")
        return f

    def _network_for_call(self) -> Callable:
        if not _compiles(self.compiled) or torch.compiler.is_compiling() or \
                torch.jit.is_tracing():
            return self.network
        if self.__dict__.get("_compiled_network") is None:
            options = {"dynamic": False, **(self.compiled if isinstance(self.compiled, dict) else {})}
            self.__dict__["_compiled_network"] = torch.compile(self.network, **options)
        return self.__dict__["_compiled_network"]

    def _resize(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`images` (B, C, H, W) or video (B, C, T, H, W) at `image_size` (each frame), in
        `dtype` (a floating one; else float32); as they are if already at that size.

        Bilinear with antialiasing (a downscale's triangle filter widened to the scale, as
        torchvision's and PIL's resize: fine texture does not alias into the coarse map),
        align_corners=False (pixel areas, as those resizes). Computed in float32 (float64
        images: float64) and rounded once to `dtype`: CPU's antialiased kernel has no fp16 /
        bf16, and the same arithmetic runs on every device."""
        size = self.image_size
        if size is None or tuple(images.shape[-2:]) == size:
            return images
        if images.dim() not in (4, 5):
            raise ValueError(f"image_size: a proposal resizes (B, C, H, W) images or "
                             f"(B, C, T, H, W) video, got shape {tuple(images.shape)}")
        compute = torch.float64 if images.dtype == torch.float64 else torch.float32
        frames = images.to(compute)
        if images.dim() == 5:            # the frames as channels: the time axis is not resized
            frames = frames.flatten(1, 2)
        out = F.interpolate(frames, size=size, mode="bilinear", antialias=True,
                            align_corners=False)
        if images.dim() == 5:
            out = out.unflatten(1, images.shape[1:3])
        return out.to(dtype) if dtype.is_floating_point else out

    def follow(self, device: torch.device, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
        """Put the network on `device`, in the dtype it runs in for images of `dtype`: the fixed
        `self.dtype` if any, else `dtype` if floating, else its own (in place, once: later calls
        find it there; the weights keep their memory format). Returns that dtype (None for a
        network without floating parameters or buffers, left as it is)."""
        param = next(_floating(self), None)   # a buffer for a network without parameters
        if param is None:
            return None
        floating = dtype is not None and dtype.is_floating_point
        dtype = self.dtype or (dtype if floating else param.dtype)
        if param.device != device or param.dtype != dtype:
            self.to(device=device, dtype=dtype)
        return dtype

    def _follow(self, images: torch.Tensor) -> torch.Tensor:
        """The network follows `images` (under autocast, their device only: autocast picks the
        compute dtype); the images at `image_size`, in the dtype and memory format it runs in."""
        autocast = torch.is_autocast_enabled(images.device.type)
        dtype = self.follow(images.device, None if autocast else images.dtype)
        if self.dtype is None:
            self._warn_if_slow(images.device, torch.get_autocast_dtype(images.device.type)
                               if autocast else dtype, autocast)
        images = self._resize(images, dtype or images.dtype)
        if dtype is None:
            return images
        images = images.to(dtype)
        if images.dim() == 4 and _is_channels_last(self):
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _warn_if_slow(self, device: torch.device, dtype: Optional[torch.dtype],
                      autocast: bool) -> None:
        """Warn (once per proposal, device and dtype) where the network follows the images (or
        autocast) into a dtype this CPU's oneDNN cannot convolve in: torch's slow fallback."""
        if dtype is None or torch.compiler.is_compiling():
            return
        seen = self.__dict__.setdefault("_dtypes_seen", set())
        if (device.type, dtype) in seen:
            return
        seen.add((device.type, dtype))
        if not _slow_on_cpu(device, dtype):
            return
        warnings.warn(
            f"the proposal runs in {dtype} ({'autocast' if autocast else 'the images'} dtype) "
            f"on a CPU whose oneDNN has no {dtype} convolutions (no AVX512-BF16 / AMX / "
            f"AVX512-FP16): torch's fallback convolution is many times slower there than "
            f"float32 (MobileOne-S0 ~18x on a 2-core AMD EPYC); to run it in float32 whatever "
            f"the images, pass papr_kernels.proposal.create(..., dtype=torch.float32)",
            stacklevel=2)


def _slow_on_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's CPU convolutions in `dtype` are its slow fallback (a loop over groups,
    no oneDNN): bf16 / fp16 where oneDNN cannot run them on this CPU."""
    if torch.device(device).type != "cpu" or dtype not in _MKLDNN_SUPPORTED:
        return False
    return not (torch.backends.mkldnn.enabled and _onednn_convolves(dtype))


def _onednn_convolves(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN and it runs convolutions in `dtype` (bf16 / fp16) on this
    CPU; False for a build without the query."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(_MKLDNN_SUPPORTED[dtype]())
    except (AttributeError, RuntimeError):
        return False


def _check_image_size(value) -> Optional[Tuple[int, int]]:
    """None, or an int or (h, w) pair of positive ints as (h, w)."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if not isinstance(pair, (tuple, list, torch.Size)) or len(pair) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"image_size must be None, an int or an (h, w) pair of ints, got "
                        f"{value!r}")
    if min(pair) < 1:
        raise ValueError(f"image_size must be positive, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def _is_channels_last(module: nn.Module) -> bool:
    """Whether the module has a 4-D floating parameter or buffer (a conv's weight, a fixed
    filter) and the first is channels_last."""
    weight = next((t for t in _floating(module) if t.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last)


def _floating(module: nn.Module):
    """The module's floating parameters, then its floating buffers."""
    return (t for t in itertools.chain(module.parameters(), module.buffers())
            if t.is_floating_point())


def _compiles(compiled: Union[bool, dict]) -> bool:
    """True, or any dict of torch.compile arguments (`{}`: the defaults)."""
    return compiled is True or isinstance(compiled, dict)


def _version(t: torch.Tensor) -> Optional[int]:
    """The tensor's version counter (bumped by in-place changes), None for an inference tensor
    (made under torch.inference_mode: it has none)."""
    return None if t.is_inference() else t._version


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "meta" or b.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _from_loading_weights(exc: BaseException) -> bool:
    """Whether `exc` can come from fetching or loading pretrained weights: an OSError (a failed
    download, no network, a missing local file) or anything raised inside timm's
    `load_pretrained` / `load_custom_pretrained` (a corrupt or mismatched checkpoint); not a
    TypeError from a bad keyword or timm's "Unknown model", raised while building."""
    if isinstance(exc, OSError):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("load_pretrained", "load_custom_pretrained"):
            return True
        tb = tb.tb_next
    return False


class _Function(nn.Module):
    """A plain callable as a module (no parameters)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def create(name: Union[str, nn.Module, Callable] = "mobileone_s0", pretrained: bool = True, *,
           dtype: Optional[torch.dtype] = None, compiled: Union[bool, dict] = False,
           image_size: Union[None, int, Tuple[int, int]] = None, **timm_kwargs) -> Proposal:
    """A frozen proposal network: a timm ConvNet by name, or a user module wrapped as is.

    Args:
        name: a timm model name (a ConvNet with `features_only` support), or an `nn.Module`
            (or any callable) returning (B, K, h, w) features of the images, or a `Proposal`
            (returned as is: `dtype`, `compiled`, `image_size` and `timm_kwargs` are then
            refused).
        pretrained: load timm's pretrained weights (default). False gives random weights, for
            tests and demos: the selected tokens are then noise.
        dtype: run the proposal in this dtype whatever the images' and autocast (None: follow
            the images); fp16, bf16, fp32 or fp64.
        compiled: run the network through `torch.compile` (True, or a dict of its arguments,
            e.g. `{"mode": "max-autotune"}`, or `{"mode": "reduce-overhead"}` for CUDA graphs of
            the proposal at fixed shapes): on a GPU the proposal is a large share of a pruned
            model's time, and compiling it is the lever that does not change its output's meaning.
        image_size: None (default: the images as given) or an int / (h, w): resize the images
            to it before the network (bilinear, antialiased). Opt-in: cheaper (MobileOne-S0 at
            160 px on CPU: 0.6x the proposal's time), but a coarser map that keeps other tokens
            (docs/design.md, "The proposal network"); check the accuracy on your data.
        **timm_kwargs: further `timm.create_model` arguments, e.g.
            `pretrained_cfg_overlay=dict(file="/path/to/weights.safetensors")` to load a local
            file offline.
    """
    if isinstance(name, Proposal):
        ignored = ([f"dtype={dtype}"] if dtype is not None else []) + \
            ([f"compiled={compiled!r}"] if compiled is not False else []) + \
            ([f"image_size={image_size!r}"] if image_size is not None else []) + \
            sorted(timm_kwargs)
        if ignored:
            raise ValueError(f"create: {', '.join(ignored)} cannot apply to an existing Proposal "
                             f"(it is returned as is); build it with them instead")
        return name
    if not isinstance(name, str):
        if not callable(name):
            raise TypeError(f"proposal must be a timm model name, an nn.Module or a callable "
                            f"(images -> (B, K, h, w) features), got {type(name).__name__}")
        if timm_kwargs:
            raise ValueError("timm_kwargs apply to a timm model name, not to a module")
        return Proposal(name, dtype, compiled, image_size)
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
        if not pretrained or not _from_loading_weights(exc):
            raise   # a bad name or keyword: timm's own error
        raise RuntimeError(
            f"could not load the pretrained weights of the proposal {name!r} "
            f"({type(exc).__name__}: {exc}). Offline, give timm a local file: "
            f"pretrained_cfg_overlay=dict(file='/path/to/weights') (e.g. "
            f"papr_kernels.proposal.create({name!r}, pretrained_cfg_overlay=...)), or pass "
            f"pretrained=False for random weights (tests only: the kept tokens are then noise)"
        ) from exc
    network.eval()
    network = reparameterize_model(network)  # a no-op for models without reparameterizable blocks
    fuse_conv_relu(network)
    return Proposal(network, dtype, compiled, image_size)


class ConvReLU(nn.Conv2d):
    """A reparameterized block's convolution with the block's ReLU folded in: relu(conv(x)).

    On CPU in bf16 it is one oneDNN convolution with the ReLU as its post-op, where torch's
    separate bf16 ReLU pass cost about as much as the convolutions it follows (MobileOne-S0 at
    B = 8, 1 thread: 1.4x faster, 1.5x with the weight packed; docs/design.md, "The ReLU folded
    into its convolution").
    The values are those of the two ops: the ReLU commutes with rounding the output to bf16,
    and the convolution is oneDNN's either way. Elsewhere (fp32, where fusing measured no gain,
    other devices, autocast, gradients, and anything that records or watches the ops:
    torch.compile fuses it itself, export and ONNX see standard ops) it runs as the two ops.
    Its parameters and state_dict keys are the convolution's; the fused path also keeps its
    weight packed in oneDNN's layout (`_packed_weight`), outside the state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fuses_on_cpu(x, self.weight):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation,
                self.groups, "relu", [], "")
        return F.relu(super().forward(x), inplace=True)   # as the block's ReLU(inplace=True)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight reordered into oneDNN's blocked layout for x's shape, as torch.compile's
        CPU freezing does; passed plain, oneDNN reorders it on every call (MobileOne-S0 bf16:
        1.12x at B = 8, 1.37x at B = 1, the same values). Kept for the last input shape, with the
        weight's storage (held, so that no new weight takes its address), dtype and in-place
        version: built again when any changes, and dropped by `.to()` / `.float()` and
        `load_state_dict`. (An edit through `weight.data` bypasses the version, as it does
        autograd's.) The plain weight where packing fails."""
        weight = self.weight
        key = (tuple(x.shape), weight.dtype, weight.data_ptr(),
               0 if weight.is_inference() else weight._version)
        cached = self.__dict__.get("_papr_packed")
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().to_mkldnn(), list(self.padding), list(self.stride),
                list(self.dilation), self.groups, list(x.shape))
        except (RuntimeError, AttributeError):
            packed = weight
        self.__dict__["_papr_packed"] = (key, packed, weight.detach())
        return packed

    def _apply(self, *args, **kwargs):
        self.__dict__.pop("_papr_packed", None)
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_papr_packed", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        """deepcopy and pickle leave the packed weight behind (built again on first use)."""
        state = self.__dict__.copy()
        state.pop("_papr_packed", None)
        return state


def conv_relu_blocks(network: nn.Module):
    """(name, block) of each reparameterized timm MobileOne / RepVGG block of `network` whose
    output is relu(reparam_conv(x)): a biased, zero-padded Conv2d, no attention (`attn`, or
    `se` where timm names it so) and a ReLU (or, folded already, a ConvReLU and an Identity)."""
    for name, block in network.named_modules():
        conv = getattr(block, "reparam_conv", None)
        attn = getattr(block, "attn", getattr(block, "se", None))
        if type(block).__name__ in ("MobileOneBlock", "RepVggBlock") and \
                isinstance(conv, nn.Conv2d) and conv.bias is not None and \
                conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and \
                isinstance(attn, nn.Identity) and (
                    (type(conv) is nn.Conv2d and isinstance(block.act, nn.ReLU)) or
                    (type(conv) is ConvReLU and isinstance(block.act, nn.Identity))):
            yield name, block


def fuse_conv_relu(network: nn.Module) -> int:
    """Fold the ReLU of each block of `conv_relu_blocks` into its convolution (a `ConvReLU`,
    the same parameters; the block's `act` becomes an Identity), in place. Returns how many
    blocks it folded (again: 0)."""
    count = 0
    for _, block in conv_relu_blocks(network):
        if type(block.reparam_conv) is nn.Conv2d:
            block.reparam_conv.__class__ = ConvReLU
            block.act = nn.Identity()
            count += 1
    return count


def _fuses_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ConvReLU runs as one oneDNN call: a plain bf16 CPU tensor (no subclass: no
    fake or traced tensor) and weight, oneDNN on and able to run bf16 (as torch's own bf16
    convolution requires), no autocast, no gradient, nothing recording or watching the ops
    (torch.compile, export, jit.trace, a dispatch mode such as FlopCounterMode: they see the
    standard convolution and ReLU)."""
    return x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and \
        x.device.type == "cpu" and type(x) is torch.Tensor and x.dim() == 4 and \
        _MKLDNN_BF16 and torch.backends.mkldnn.enabled and \
        not torch.is_autocast_enabled("cpu") and \
        not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and \
        not torch.compiler.is_compiling() and not torch.compiler.is_exporting() and \
        not torch.jit.is_tracing() and _get_current_dispatch_mode() is None


# Whether oneDNN runs convolutions in that dtype on this CPU (else ATen falls back to its slow
# one); looked up when called: a torch build without oneDNN has no such ops.
_MKLDNN_SUPPORTED = {torch.bfloat16: lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                     torch.float16: lambda: torch.ops.mkldnn._is_mkldnn_fp16_supported()}

# oneDNN's convolution with a fused post-op (the op torch.compile's CPU backend emits), and
# the bf16 support torch's own mkldnn convolution checks for.
_MKLDNN_BF16 = _onednn_convolves(torch.bfloat16) and \
    hasattr(torch.ops.mkldnn, "_convolution_pointwise")
