"""Small batches on a GPU (issue 12, part 4): a patched model can be captured in a CUDA graph and
runs under `torch.compile(mode="reduce-overhead")`, giving the eager outputs.

A patched tiny ViT (timm `VisionTransformer`, 64 wide, 2 blocks) and a patched tiny ConvNeXt,
each with a tiny frozen conv proposal, are
- captured with `torch.cuda.CUDAGraph` on a static input (warm-up on a side stream first, as the
  PyTorch docs say) and replayed on new data copied into that input: the selection is recomputed
  on the device at each replay (the kept tokens change with the images), and every replay equals
  the eager forward of the same images;
- compiled with `torch.compile(mode="reduce-overhead")` (CUDA graph trees) and run until the
  graph is recorded and replayed, against eager.
These need CUDA and are skipped without it. On CPU (CI) `torch.compile(mode="reduce-overhead")`
of a patched ViT runs on CPU tensors (inductor skips the CUDA graphs there), or is skipped with
the reason where this torch does not allow it.
"""
import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from papr_kernels import timm as papr_timm  # noqa: E402

from conftest import requires  # noqa: E402

IMG = 64
# CUDA graphs need a CUDA device: "torch on cuda" is the backend that needs nothing more (the
# patched models pick the fastest backend there themselves).
needs_cuda = requires("torch", "cuda")


def tiny_proposal(seed=3):
    """A frozen 'ConvNet' with stride 32: (B, 3, 64, 64) -> (B, 8, 2, 2)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), nn.GELU(),
                         nn.Conv2d(6, 8, 8, stride=8)).eval().requires_grad_(False)


def tiny_vit():
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()


def tiny_convnext():
    torch.manual_seed(2)
    # ls_init_value=1: layer scales of order one, so the pruned branch matters numerically
    return timm.create_model("convnext_tiny", pretrained=False, depths=(1, 1, 1, 1),
                             dims=(8, 16, 32, 32), ls_init_value=1.0, num_classes=10).eval()


MODELS = {"vit": (tiny_vit, 0.5), "convnext": (tiny_convnext, 0.5)}


def patched(name, device):
    make, z = MODELS[name]
    return papr_timm.patch(make().to(device), tiny_proposal(), z)


def images(batch, seed, device):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG, generator=gen).to(device)


def capture(model, static_x, warmup=3):
    """(graph, static output) of model(static_x), warmed up on a side stream (PyTorch docs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = model(static_x)
    return graph, static_out


@needs_cuda
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_graph_capture_and_replay(name, batch):
    model = patched(name, "cuda")
    static_x = images(batch, 0, "cuda")
    graph, static_out = capture(model, static_x)
    for seed in (1, 2, 3):
        x = images(batch, seed, "cuda")
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(static_out, want, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_reduce_overhead_cuda(name):
    model = patched(name, "cuda")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    for seed in range(4):   # cudagraph trees: warm-up, record, then replays
        x = images(2, seed, "cuda")
        with torch.no_grad():
            got = compiled(x).clone()
            want = eager(x)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_compile_reduce_overhead_cpu():
    """CPU tensors: inductor skips the CUDA graphs (they need CUDA inputs) and runs the compiled
    code; a torch that refuses the mode on CPU makes this a skip, with its message."""
    model = patched("vit", "cpu")
    eager = copy.deepcopy(model)
    try:
        compiled = torch.compile(model, mode="reduce-overhead")
        with torch.no_grad():
            got = compiled(images(2, 0, "cpu")).clone()
    except Exception as exc:  # noqa: BLE001 - only a refusal of the mode itself is a skip
        text = f"{type(exc).__name__}: {exc}"
        if any(w in text.lower() for w in ("cuda", "cudagraph", "reduce-overhead", "triton")):
            pytest.skip(f"torch {torch.__version__} does not run mode='reduce-overhead' on "
                        f"CPU tensors: {text.splitlines()[0][:200]}")
        raise
    with torch.no_grad():
        torch.testing.assert_close(got, eager(images(2, 0, "cpu")), rtol=1e-4, atol=1e-4)
        x = images(2, 1, "cpu")   # another batch of the same shape: no recompile needed
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
