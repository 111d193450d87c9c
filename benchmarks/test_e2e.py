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
"""
import copy
import functools

import pytest
import torch

import papr_bench as pb
import papr_kernels
from papr_kernels.proposal import Proposal

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
    """GFLOPs of one image through fn, counted by torch (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
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
