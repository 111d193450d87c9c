"""End to end: timm ViT-B/16-224 unpruned against PaPr (MobileOne-S0 proposal) at several z, and
the hierarchical Swin-T and ConvNeXt-T unpruned against PaPr at z = 0.65 and 0.5.

Images/s with the proposal's cost included, plus analytic GFLOPs per image (FLOPs = 2 x
multiply-adds): the ViT counted from its module shapes at the kept token count (every Linear of the
blocks per token, attention's two n x n x C products, the patch-embedding convolution, the head),
the proposal with torch.utils.flop_counter.FlopCounterMode (its convolutions). Random weights:
speed does not depend on them. Quick mode (CI) uses vit_tiny_patch16_224 at B = 1.

Every pruned model is a `papr_kernels.timm.patch`ed copy (tests/ check each patch against a
hand-written pipeline). The hierarchical models' GFLOPs are counted by FlopCounterMode on the
patched model, which runs the proposal too. On a CPU their speed-up stays well under the FLOP
ratio: the dense parts (norms, window shuffles, depthwise convs) are memory bound and the pruned
part is the MLP alone.

`test_e2e_gpu` (issue 12, at the end of this file) is the bf16 GPU benchmark, side by side with
the bound of any pruner and the proposal alone; `tools/gpu_check.sh e2e` / `e2e-compile` run it.
"""
import concurrent.futures
import contextlib
import copy
import functools
import math
import statistics
import time

import pytest
import torch

import papr_bench as pb
import papr_kernels
from papr_kernels.proposal import Proposal, conv_relu_blocks

timm = pytest.importorskip("timm")

CONFIGS = ("unpruned", "papr-z0.7", "papr-z0.5", "papr-z0.3")


def _batches(device, quick):
    if quick:
        return [1]
    return [64, 256] if device == "cuda" else [8]


# Hierarchical models (issue 8): z = 0.65 is the published evaluation's default for both.
HIERARCHICAL_MODELS = ("swin_tiny_patch4_window7_224", "convnext_tiny")
HIERARCHICAL_CONFIGS = ("unpruned", "papr-z0.65", "papr-z0.5")


def pytest_generate_tests(metafunc):
    name = metafunc.function.__name__
    if name == "test_e2e_gpu":
        return _gpu_generate(metafunc)
    if name not in ("test_e2e", "test_e2e_hierarchical"):
        return
    quick = metafunc.config.getoption("--bench-quick")
    device = metafunc.config.getoption("--bench-device") or pb.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    configs = CONFIGS if name == "test_e2e" else HIERARCHICAL_CONFIGS
    cases = [pytest.param(b, c, id=f"B{b}-{c}") for b in _batches(device, quick) for c in configs
             if not (quick and c not in ("unpruned", "papr-z0.5"))]
    if name == "test_e2e":
        metafunc.parametrize("batch,config", cases)
    else:
        metafunc.parametrize("model_name", HIERARCHICAL_MODELS)
        metafunc.parametrize("batch,config", cases)


@functools.lru_cache(maxsize=None)
def _proposal(device):
    from timm.utils.model import reparameterize_model
    torch.manual_seed(1)
    proposal = timm.create_model("mobileone_s0", pretrained=False, features_only=True,
                                 out_indices=(-1,))
    return reparameterize_model(proposal).eval().to(device)


@functools.lru_cache(maxsize=1)
def _models(device, model_name):
    torch.manual_seed(0)
    return timm.create_model(model_name, pretrained=False).eval().to(device), _proposal(device)


def vit_gflops(vit, num_tokens: int) -> float:
    """Analytic FLOPs of one image through a timm ViT whose blocks see `num_tokens` tokens."""
    macs = 0
    conv = vit.patch_embed.proj
    macs += conv.weight.numel() * vit.patch_embed.num_patches          # patch embedding
    for block in vit.blocks:
        for layer in block.modules():
            if isinstance(layer, torch.nn.Linear):                      # qkv, proj, fc1, fc2
                macs += num_tokens * layer.in_features * layer.out_features
        dim = block.attn.qkv.out_features // 3
        macs += 2 * num_tokens * num_tokens * dim                       # q @ k^T and attn @ v
    if isinstance(vit.head, torch.nn.Linear):
        macs += vit.head.in_features * vit.head.out_features           # head on the class token
    return 2 * macs / 1e9


def test_e2e(benchmark, device, quick, batch, config):
    from papr_kernels import timm as papr_timm
    model_name = "vit_tiny_patch16_224" if quick else "vit_base_patch16_224"
    vit, proposal = _models(device, model_name)
    img = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    num_tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    if config == "unpruned":
        fn, how, z, prop_gflops = vit, "timm forward", 1.0, 0.0
    else:
        z = float(config.split("z")[1])
        fn, how = papr_timm.patch(copy.deepcopy(vit), proposal, z), "papr_kernels.timm.patch"
        num_tokens = vit.num_prefix_tokens + papr_kernels.keep_count(num_tokens, z, vit.num_prefix_tokens)
        prop_gflops = counted_gflops(proposal, img)
    time_forward(benchmark, device, quick, fn, img,
                 model=model_name, batch=batch, provider=config, z=z, pipeline=how,
                 tokens_in_blocks=num_tokens,
                 gflops_per_image=vit_gflops(vit, num_tokens) + prop_gflops,
                 proposal_gflops_per_image=prop_gflops,
                 backend=None if config == "unpruned" else papr_kernels.backends.resolve(
                     None, device).__name__)


def time_forward(benchmark, device, quick, fn, img, **info):
    """Times fn(img) under inference_mode and records `info` (model, batch, provider, ...)."""
    def run():
        with torch.inference_mode():
            return fn(img)

    timed = pb.Timed(run, device)
    timed()  # warm-up
    pb.sync(device)
    timed.event_times_s.clear()
    benchmark.group = f"e2e {info['model']} B={info['batch']}"
    benchmark.extra_info.update(suite="e2e", proposal="mobileone_s0", device=device, **info)
    benchmark.pedantic(timed, rounds=1 if quick else 3, warmup_rounds=0)
    if timed.event_median_s() is not None:
        benchmark.extra_info["event_median_s"] = timed.event_median_s()


@functools.lru_cache(maxsize=1)
def _hierarchical_model(device, model_name):
    torch.manual_seed(0)
    return timm.create_model(model_name, pretrained=False).eval().to(device)


def counted_gflops(fn, img) -> float:
    """GFLOPs of one image through fn, counted by torch (2 per multiply-add). Attention runs in
    SDPA's math form: FlopCounterMode has no formula for the fused CPU kernel (ViT-B/16 counted
    33.70 GFLOPs without the n x n products, 35.13 with them, as `vit_gflops`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        fn(img[:1])
    return counter.get_total_flops() / 1e9


def test_e2e_hierarchical(benchmark, device, quick, model_name, batch, config):
    from papr_kernels import timm as papr_timm
    model = _hierarchical_model(device, model_name)
    proposal = _proposal(device)
    img = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    z = 1.0 if config == "unpruned" else float(config.split("z")[1])
    if z < 1.0:
        model = papr_timm.patch(copy.deepcopy(model), Proposal(proposal), z)
    time_forward(benchmark, device, quick, model, img,
                 model=model_name, batch=batch, provider=config, z=z,
                 pipeline="timm forward" if z == 1.0 else "papr_kernels.timm.patch",
                 gflops_per_image=counted_gflops(model, img),
                 proposal_gflops_per_image=0.0 if z == 1.0 else counted_gflops(proposal, img),
                 backend=None if z == 1.0 else papr_kernels.backends.resolve(
                     None, device, papr_kernels.backends.ROW_OPS).__name__)


# ------------------------------------------------------------------------------------------------
# Issue 12, part 3: the GPU end-to-end benchmark. bf16 models (`model.to("cuda", torch.bfloat16)`;
# Swin-T and ConvNeXt-T in fp32 too, issue 17) under torch.inference_mode, eager and torch.compile (the `compile` cases are a separate, slower
# selection: `-k "test_e2e_gpu and compile"`), one provider per case, every ratio of two medians
# of one process:
#   unpruned      the timm model as is
#   unpruned-again  the same, timed last: its time over the first one's is the drift over the
#                 group (METHOD.md: time the same version twice; a smaller difference is noise)
#   bound-z<z>    ViTs only: the same model keeping the first k patch tokens at zero cost (a
#                 view, no proposal, no selection): the best any pruner can do at that z
#   papr-z<z>     `papr_kernels.timm.patch(copy, proposal, z)`, the proposal's cost included
#   proposal      the proposal network alone, as the patched model runs it (its share of PaPr)
#   papr-z0.5-cp, proposal-cp   (ViT-B, eager) the same with `Proposal(compiled=True)`: the
#                 proposal through torch.compile, the rest of the model eager (issue 12's lever)
#   proposal-<lever>  (ViT-B bf16 eager; the quick ViT on CPU) the proposal alone, timed like
#                 `proposal`, right after it (inside the drift check), no torch.compile:
#                 fp32-nchw  fp32 weights and images, NCHW: the patch before issue 12
#                 nchw       the model's dtype, NCHW (is channels_last the better layout?)
#                 160, 128   `Proposal(image_size=S)`: the images resized to S x S first (the
#                            opt-in lower resolution: a coarser map that keeps other tokens)
#                 graph      `proposal` captured in a CUDA graph at the fixed batch (CUDA only)
#                 cudnn-benchmark  `proposal` with torch.backends.cudnn.benchmark on, in a
#                            thread of its own (cuDNN's chosen plans are kept per thread: the
#                            plans it finds do not reach the later cases)
#                 conv-relu  each reparameterized (biased conv, ReLU) pair as one
#                            torch.cudnn_convolution_relu call (CUDA only), checked once against
#                            `proposal`'s output before timing
#   unpruned-graph, papr-z0.5-graph  (ViT-B bf16 eager at the small batches SMALL_BATCHES, after
#                 every other case) `unpruned` and `papr-z0.5` captured in a CUDA graph at that
#                 batch and replayed (CUDA only): at small batches the host's launches dominate
#                 eager time, and a CUDA graph is how latency-bound serving runs a model. The
#                 group: unpruned, papr-z0.5, the two graphs, unpruned-again
# report.py tables images/s, the speed-ups over unpruned, PaPr / bound and the proposal's share,
# the levers' times over `proposal`'s, and the small batches eager and graphed with the smallest
# batch at which PaPr is faster than unpruned (the crossover).
# On CPU only quick mode runs it: tiny models (a ViT of depth 2, a ConvNeXt of one block per
# stage) at B = 1 (the ViT's small-batch group also at B = 2), fp32, eager; `make bench` on CPU
# keeps the ViT-B B = 8 fp32 rows above.

GPU_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
              "swin_tiny_patch4_window7_224", "convnext_tiny")
# Quick mode: timm names with reduced depths (name -> create_model overrides).
QUICK_MODELS = {"vit_tiny_patch16_224": dict(depth=2), "convnext_atto": dict(depths=(1, 1, 1, 1))}
GPU_Z = (0.7, 0.5, 0.3)
# Swin-T / ConvNeXt-T (issue 17): the published z = 0.65 and 0.5, in bf16 and fp32.
HIERARCHICAL_GPU_Z = (0.65, 0.5)
# `--bench-families` (`tools/gpu_check.sh e2e-families`): instead of the models above, one of each
# family added since (bf16 eager, B = 64 and 256; no bound: BoundViT is timm's ViT forward):
# Hiera and NaFlexVit prune every block, attention included (z = 0.5); MetaFormer its MLPs
# (z = 0.65 and 0.5). Quick mode: small ones (MetaFormer names fix their depths: full size).
FAMILY_MODELS = {"hiera_base_224": (0.5,), "naflexvit_base_patch16_gap": (0.5,),
                 "caformer_s18": HIERARCHICAL_GPU_Z}
QUICK_FAMILY_MODELS = {"hiera_tiny_224": dict(stages=(1, 1, 1, 1)),
                       "naflexvit_base_patch16_gap": dict(depth=1), "caformer_s18": {}}
GPU_MODES = ("eager", "compile")
GPU_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
COMPILED_PROPOSAL_MODEL = "vit_base_patch16_224"
UNPRUNED_AGAIN = "unpruned-again"
# Issue 12, "measure each lever and keep what pays": the proposal alone, each way (the comment
# above). The cuDNN ones last: their first calls may search or build kernels.
PROPOSAL_LEVERS = ("proposal-fp32-nchw", "proposal-nchw", "proposal-160", "proposal-128",
                   "proposal-graph", "proposal-cudnn-benchmark", "proposal-conv-relu")
# The levers that change the proposal's output (opt-in, never the default): its images resized
RESIZED_LEVERS = {"proposal-160": 160, "proposal-128": 128}
CUDA_ONLY_LEVERS = {"proposal-graph": "a CUDA graph",
                    "proposal-conv-relu": "torch.cudnn_convolution_relu has no CPU kernel"}
# Issue 12, "small batches": ViT-B bf16 eager at batches where the host's launch overhead
# dominates, each model also replayed from a CUDA graph captured at that batch (how latency-bound
# serving runs one); the report's "Small batches" table and its crossover. Quick mode: the tiny
# ViT at B = 1 (its regular group times B = 1 already: that group is not timed twice) and 2.
SMALL_BATCHES = (1, 8, 32)
QUICK_SMALL_BATCHES = (1, 2)
GRAPHED_PROVIDERS = {"unpruned-graph": "unpruned", "papr-z0.5-graph": "papr-z0.5"}  # -> captured
SMALL_BATCH_PROVIDERS = ("unpruned", "papr-z0.5", *GRAPHED_PROVIDERS, UNPRUNED_AGAIN)
CUDA_ONLY_PROVIDERS = {**CUDA_ONLY_LEVERS, **dict.fromkeys(GRAPHED_PROVIDERS, "a CUDA graph")}


def _quick_kwargs(name):
    """The create_model overrides of a quick-mode model."""
    return QUICK_MODELS[name] if name in QUICK_MODELS else QUICK_FAMILY_MODELS[name]


def _quick_id(name):
    return name + "".join(f"-{k}{''.join(map(str, v)) if isinstance(v, tuple) else v}"
                          for k, v in _quick_kwargs(name).items())


def _is_vit(name):
    return name.startswith(("vit_", "deit_"))


def gpu_cases(device, quick, families=False):
    """[(model, dtype, mode, batch, provider)] in run order (model and dtype outermost: one model
    set up at a time). ViTs in bf16; Swin-T / ConvNeXt-T in bf16 and fp32 at z = 0.65 and 0.5;
    then ViT-B's small-batch group. `families`: the FAMILY_MODELS cases instead."""
    if families:
        return family_cases(device, quick)
    if quick:
        models, modes, batches = tuple(QUICK_MODELS), ("eager",), (1,)
    elif device == "cuda":
        models, modes, batches = GPU_MODELS, GPU_MODES, (64, 256)
    else:
        return []
    cases = []
    for model in models:
        vit = _is_vit(model)
        zs = (0.5,) if quick else GPU_Z if vit else HIERARCHICAL_GPU_Z
        dtypes = ("fp32",) if device != "cuda" else ("bf16",) if vit else ("bf16", "fp32")
        # PaPr before its bound at each z: a run stopped by its timeout keeps the pairs it timed
        provs = ["unpruned"] + [p for z in zs for p in (f"papr-z{z}", f"bound-z{z}")
                                if vit or p.startswith("papr")] + ["proposal"]
        # the proposal levers right after `proposal`, before the baseline's second timing
        lever_model = model == COMPILED_PROPOSAL_MODEL or (quick and vit)
        for dtype in dtypes:
            for mode in modes:
                levers = list(PROPOSAL_LEVERS) if lever_model and mode == "eager" else []
                cases += [(model, dtype, mode, b, p) for b in batches
                          for p in provs + levers + [UNPRUNED_AGAIN]]
        if model == COMPILED_PROPOSAL_MODEL and "eager" in modes:
            cases += [(model, "bf16", "eager", b, p) for b in batches
                      for p in ("papr-z0.5-cp", "proposal-cp")]
    # last: a run stopped by its timeout loses them before any row of the targets (B = 256)
    return cases + small_batch_cases(device, quick, batches)


def family_cases(device, quick):
    """The cases of `--bench-families`: each of FAMILY_MODELS (quick: QUICK_FAMILY_MODELS at
    z = 0.5, B = 1, fp32) unpruned, PaPr at its z, the proposal alone and unpruned again, bf16
    eager at B = 64 and 256."""
    if quick:
        models, dtype, batches = dict.fromkeys(QUICK_FAMILY_MODELS, (0.5,)), "fp32", (1,)
    elif device == "cuda":
        models, dtype, batches = FAMILY_MODELS, "bf16", (64, 256)
    else:
        return []
    return [(model, dtype, "eager", b, p) for model, zs in models.items() for b in batches
            for p in ("unpruned", *(f"papr-z{z}" for z in zs), "proposal", UNPRUNED_AGAIN)]


def small_batch_cases(device, quick, regular_batches):
    """The small-batch group of ViT-B bf16 eager (quick: the tiny ViT) at each batch of
    SMALL_BATCHES (QUICK_SMALL_BATCHES) that its regular group does not time."""
    model = next(filter(_is_vit, QUICK_MODELS)) if quick else COMPILED_PROPOSAL_MODEL
    dtype = "bf16" if device == "cuda" else "fp32"
    return [(model, dtype, "eager", b, p)
            for b in (QUICK_SMALL_BATCHES if quick else SMALL_BATCHES)
            if b not in regular_batches for p in SMALL_BATCH_PROVIDERS]


def _gpu_generate(metafunc):
    quick = metafunc.config.getoption("--bench-quick")
    device = metafunc.config.getoption("--bench-device") or pb.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    families = metafunc.config.getoption("--bench-families")
    cases = [pytest.param(m, dt, mode, b, p,
                          id=f"{_quick_id(m) if quick else m}-{dt}-{mode}-B{b}-{p}")
             for m, dt, mode, b, p in gpu_cases(device, quick, families)]
    if not cases:
        cases = [pytest.param(None, None, None, None, None, id="cpu", marks=pytest.mark.skip(
            reason="the bf16 end-to-end benchmark runs on CUDA (on CPU only its tiny "
                   "--bench-quick version; `make bench` keeps the ViT-B B=8 fp32 rows)"))]
    metafunc.parametrize("model_name,dtype_name,mode,batch,provider", cases)


class BoundViT(torch.nn.Module):
    """The bound of a pruner for a timm ViT: its forward with the first `keep` patch tokens kept
    by a view (no proposal, no selection, no copy) in place of the proposal and `prune`."""

    def __init__(self, vit, z):
        super().__init__()
        self.vit = vit
        n = vit.patch_embed.num_patches
        self.keep = vit.num_prefix_tokens + papr_kernels.keep_count(
            n + vit.num_prefix_tokens, z, vit.num_prefix_tokens)

    def forward(self, images):
        v = self.vit
        x = v._pos_embed(v.patch_embed(images))
        x = x[:, :self.keep]
        x = v.norm(v.blocks(v.norm_pre(v.patch_drop(x))))
        return v.forward_head(x)


@functools.lru_cache(maxsize=1)   # cases come model by model: one model on the device at a time
def _gpu_models(device, model_name, quick, dtype):
    """(unpruned, patched copy) of one model in `dtype`, random weights."""
    from papr_kernels import timm as papr_timm
    torch.manual_seed(0)
    kwargs = _quick_kwargs(model_name) if quick else {}
    model = timm.create_model(model_name, pretrained=False, **kwargs).eval().to(device, dtype)
    torch.manual_seed(1)
    proposal = papr_kernels.proposal.create("mobileone_s0", pretrained=False)
    patched = papr_timm.patch(copy.deepcopy(model), proposal, 0.5)
    with torch.inference_mode():   # the proposal follows the images' device and dtype: once here
        patched(torch.zeros(1, 3, 224, 224, device=device, dtype=dtype))
    return model, patched


@functools.lru_cache(maxsize=1)   # consecutive cases share it (B = 256: ~0.3 s of randn on a CPU)
def gpu_images(batch, device, dtype):
    """Random (batch, 3, 224, 224) images in `dtype` on `device`, the same for every provider."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 224, 224, generator=gen).to(device, dtype)


def _proposal_runner(patched):
    """The proposal as the patched model runs it (device/dtype handling included)."""
    state = patched._papr
    run = getattr(state, "proposal_features", None)
    return run if run is not None else patched.papr_proposal


# --------------------------------------------------------------------------- proposal levers
# Benchmark code, not the package's: each builds the proposal another way from the patched
# model's own network (reparameterized MobileOne-S0), left as it is.

class ProposalVariant(torch.nn.Module):
    """The proposal network in `dtype` and `memory_format` (weights and images, in place), run
    as the patched model's proposal runs it, without `Proposal` (which makes it channels_last)."""

    def __init__(self, network, dtype, memory_format):
        super().__init__()
        self.network = network.to(dtype=dtype, memory_format=memory_format)
        self.dtype, self.memory_format = dtype, memory_format

    def forward(self, images):
        f = self.network(images.to(self.dtype).contiguous(memory_format=self.memory_format))
        return f[-1] if isinstance(f, (list, tuple)) else f


class ConvReLUOp(torch.nn.Module):
    """relu(conv(x)) of a biased Conv2d as one call of
    `op(x, weight, bias, stride, padding, dilation, groups)` (torch.cudnn_convolution_relu)."""

    def __init__(self, conv, op):
        super().__init__()
        self.conv, self.op = conv, op

    def forward(self, x):
        c = self.conv
        return self.op(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def fuse_conv_relu(network, op):
    """(a deep copy of `network` with each reparameterized MobileOne block
    (`papr_kernels.proposal.conv_relu_blocks`) replaced by a ConvReLUOp of its convolution and
    `op`, the number of blocks replaced)."""
    fused = copy.deepcopy(network)
    blocks = [name for name, _ in conv_relu_blocks(fused)]
    for name in blocks:
        parent, _, child = name.rpartition(".")
        setattr(fused.get_submodule(parent), child,
                ConvReLUOp(fused.get_submodule(name).reparam_conv, op))
    return fused, len(blocks)


# Relative L2 error of the conv-relu proposal's features against the plain one's: bf16 rounds
# each of ~40 layers once either way (the fused op rounds after bias and ReLU, in fp32 before);
# a wrong stride, padding, group count or bias is off by O(1).
CONV_RELU_TOLERANCE = 0.05


def relative_error(out, ref):
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def conv_relu_proposal(network, images, reference, op):
    """(fn, pipeline) of the proposal with each (conv, ReLU) pair as one `op` call, in the
    images' dtype, or in fp16 where `op` refuses it (bf16 in an older cuDNN). Checked once
    against `reference` (the plain proposal, in that dtype) before timing: pytest.skip names
    what failed where `op` cannot run or the features differ by over CONV_RELU_TOLERANCE."""
    fused, count = fuse_conv_relu(network, op)
    fell_back = ""
    with torch.inference_mode():
        try:
            fn = ProposalVariant(fused, images.dtype, torch.channels_last)
            out = fn(images)
        except RuntimeError as exc:
            if images.dtype == torch.float16:
                pytest.skip(f"cudnn_convolution_relu refused {images.dtype}: {exc}")
            fell_back = f"; fp16: {images.dtype} refused ({str(exc).splitlines()[0][:120]})"
            fn = ProposalVariant(fused, torch.float16, torch.channels_last)
            try:
                out = fn(images)
            except RuntimeError as exc16:
                pytest.skip(f"cudnn_convolution_relu refused {images.dtype} ({exc}) and "
                            f"fp16 ({exc16})")
            reference = ProposalVariant(copy.deepcopy(network), torch.float16,
                                        torch.channels_last)
        error = relative_error(out, reference(images))
    if not error <= CONV_RELU_TOLERANCE:
        pytest.skip(f"proposal-conv-relu: features differ from the plain proposal's by "
                    f"{error:.3g} (relative L2, over {CONV_RELU_TOLERANCE}): not timed")
    return fn, (f"proposal alone, {count} (conv, ReLU) pairs as cudnn_convolution_relu"
                f"{fell_back}; relative error {error:.2g}")


def graphed(fn, images):
    """fn(images) captured in a CUDA graph at these images (warmed up on a side stream first,
    as benchmarks/per_call_gpu.py does); returns a callable that replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            fn(images)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = fn(images)

    def replay(_images):
        graph.replay()
        return out
    return replay


@contextlib.contextmanager
def cudnn_benchmark():
    """torch.backends.cudnn.benchmark on inside the block; as it was after (also on error)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class InOwnThread:
    """Calls `timed` in a thread of its own (its CUDA events and timings as they are). torch
    keeps cuDNN's chosen plans per thread (cuDNN v8 API: thread-local caches): cudnn.benchmark
    searches the plans of this thread afresh, and what it finds does not reach later cases."""

    def __init__(self, timed):
        self.timed, self.event_times_s = timed, timed.event_times_s
        self.pool = concurrent.futures.ThreadPoolExecutor(1)

    def __call__(self):
        return self.pool.submit(self.timed).result()

    def event_median_s(self):
        return self.timed.event_median_s()

    def close(self):
        self.pool.shutdown()


def proposal_lever(provider, patched, images):
    """(fn, pipeline) of a proposal lever (PROPOSAL_LEVERS): fn(images) -> features."""
    runner, network = _proposal_runner(patched), patched.papr_proposal.network
    if provider == "proposal-fp32-nchw":
        return ProposalVariant(copy.deepcopy(network), torch.float32, torch.contiguous_format), \
            "proposal alone, fp32 weights and images, NCHW (the patch before issue 12)"
    if provider == "proposal-nchw":
        return ProposalVariant(copy.deepcopy(network), images.dtype, torch.contiguous_format), \
            f"proposal alone, {images.dtype} NCHW weights and images"
    if provider in RESIZED_LEVERS:
        size = RESIZED_LEVERS[provider]
        return Proposal(network, image_size=size), \
            f"proposal alone, images resized to {size} x {size} (Proposal(image_size={size}))"
    if provider == "proposal-cudnn-benchmark":
        return runner, "proposal alone, torch.backends.cudnn.benchmark (its own thread)"
    if provider == "proposal-graph":
        return graphed(runner, images), "proposal alone, CUDA graph replay"
    if provider == "proposal-conv-relu":
        return conv_relu_proposal(network, images, runner, torch.cudnn_convolution_relu)
    raise ValueError(f"provider: not a proposal lever: {provider!r}")


def test_e2e_gpu(benchmark, device, quick, model_name, dtype_name, mode, batch, provider):
    if provider in CUDA_ONLY_PROVIDERS and device != "cuda":
        pytest.skip(f"{provider}: CUDA only ({CUDA_ONLY_PROVIDERS[provider]})")
    dtype = GPU_DTYPES[dtype_name]
    unpruned, patched = _gpu_models(device, model_name, quick, dtype)
    img = gpu_images(batch, device, dtype)
    compiled_proposal = provider.endswith("-cp")
    captured = GRAPHED_PROVIDERS.get(provider)
    provider_base = captured or (provider[:-len("-cp")] if compiled_proposal else provider)
    lever = provider in PROPOSAL_LEVERS
    z = None if provider_base == "proposal" or lever else 1.0 if provider.startswith(
        "unpruned") else float(provider_base.split("z")[1])
    patched.papr_proposal.compiled = compiled_proposal
    backend = None
    if provider.startswith("unpruned"):
        again = ", again (last)" if provider == UNPRUNED_AGAIN else ""
        fn, pipeline = unpruned, "timm forward" + again
    elif provider.startswith("bound"):
        fn, pipeline = BoundViT(unpruned, z), "first k patch tokens (a view)"
    elif provider_base == "proposal":
        fn, pipeline = _proposal_runner(patched), "proposal network alone"
    elif lever:
        fn, pipeline = proposal_lever(provider, patched, img)
    else:
        from papr_kernels.timm._stages import HierarchicalModel   # needs timm, as _gpu_models
        patched.papr_z = z
        fn, pipeline = patched, "papr_kernels.timm.patch"
        backend = papr_kernels.backends.resolve(   # the row ops where a dense grid is kept
            None, device, papr_kernels.backends.ROW_OPS if isinstance(patched, HierarchicalModel)
            else ()).__name__
    if compiled_proposal:
        pipeline += ", proposal torch.compile'd (Proposal(compiled=True))"
    if captured:
        fn, pipeline = graphed(fn, img), pipeline + ", CUDA graph replay (captured at this batch)"
    warmup = 3 if compiled_proposal else 1
    if mode == "compile":
        pb.allow_recompiles()
        fn, warmup = torch.compile(fn, dynamic=False), 3

    def run():
        with torch.inference_mode():
            return fn(img)

    timed = pb.Timed(run, device)
    with contextlib.ExitStack() as stack:   # warm-up and timing alike
        if provider == "proposal-cudnn-benchmark":
            stack.enter_context(cudnn_benchmark())
            timed = InOwnThread(timed)
            stack.callback(timed.close)
        rounds = warm_up(timed, warmup, quick)
        pb.sync(device)
        timed.event_times_s.clear()
        benchmark.group = f"e2e-gpu {model_name} {mode} B={batch}"
        benchmark.extra_info.update(
            suite="e2e-gpu", model=model_name if not quick else _quick_id(model_name),
            shape=model_name if not quick else _quick_id(model_name), batch=batch,
            provider=provider, z=z, mode=mode, dtype=dtype_name,
            device=device, proposal="mobileone_s0", pipeline=pipeline, backend=backend)
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0)
    if timed.event_median_s() is not None:
        benchmark.extra_info["event_median_s"] = timed.event_median_s()


# Warm-up and rounds of a GPU case: each model's first case (unpruned) follows seconds of model
# set-up on the host, with the GPU idle and its clocks down; a few ms of warm-up would time it
# partly at idle clocks and inflate every speed-up over it.
# Calls of 0.25 ms and up are timed for GPU_TIMED_S: a CUDA graph replay of ViT-B at B = 1
# (~0.7 ms) gets ~350 rounds (at most 50 were 35 ms of it).
GPU_WARMUP_S = 0.1
GPU_TIMED_S = 0.25
GPU_ROUNDS = (10, 1000)


def warm_up(timed, calls, quick):
    """Runs `timed` `calls` times (compiles, loads kernels), then (not in quick mode) until
    GPU_WARMUP_S more have passed; returns the rounds to time: 2 in quick mode, else enough for
    GPU_TIMED_S within GPU_ROUNDS."""
    for _ in range(calls):
        timed()
    if quick:
        return 2
    first, start, loops = len(timed.event_times_s), time.perf_counter(), 0
    while time.perf_counter() - start < GPU_WARMUP_S:
        timed()
        loops += 1
    recent = timed.event_times_s[first:]   # CUDA events; wall time elsewhere
    per_call = statistics.median(recent) if recent else (time.perf_counter() - start) / loops
    return min(GPU_ROUNDS[1], max(GPU_ROUNDS[0], math.ceil(GPU_TIMED_S / per_call)))
