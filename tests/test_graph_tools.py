"""PyTorch's graph tooling as a deployment uses it, on CPU: `torch.export` with a dynamic batch
(`torch.export.Dim`) of `prune`, `PaPr` and patched ViT / Eva / Beit / CaiT / ViT RelPos / Swin /
ConvNeXt, run at batch sizes other than the traced one; AOTInductor packages (the extension's
ops run through the proxy executor); `torch.compile(dynamic=True)` and `mark_dynamic` without a
recompile per batch size; a graph break inside a patched model (the per-forward state survives
it); a compiled training step. Everything against eager or the reference. ONNX:
tests/test_onnx.py; jit.trace and jit.script: tests/test_api.py."""
import glob
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import papr_kernels
from papr_kernels import proposal as papr_proposal
from papr_kernels import reference

from conftest import Prune, requires

timm = pytest.importorskip("timm")
from papr_kernels.timm import patch  # noqa: E402
from test_timm_beit import make_beit  # noqa: E402
from test_timm_cait import make_cait  # noqa: E402
from test_timm_eva import make_eva  # noqa: E402
from test_hierarchical import _metaformer as make_metaformer  # noqa: E402
from test_timm_hiera import make_hiera  # noqa: E402
from test_timm_naflexvit import make_model as make_naflexvit  # noqa: E402
from test_timm_relpos import make_relpos  # noqa: E402

BATCH = torch.export.Dim("batch", min=1, max=64)
EXPORT_BACKENDS = [pytest.param("cpp", marks=requires("cpp", "cpu")),
                   pytest.param("torch", marks=requires("torch", "cpu")),
                   pytest.param("triton", marks=requires("triton", "cpu"))]


def tokens_and_features(batch, num_tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, num_tokens, 8, generator=gen),
            torch.randn(batch, 4, 5, 7, generator=gen))


@pytest.mark.parametrize("backend", EXPORT_BACKENDS)
@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("grid,prefix", [(None, 1), ((6, 8), 0)])
def test_export_with_a_dynamic_batch_keeps_the_selection_per_input(backend, order, grid, prefix):
    """One export at batch 2, run at 1 and 5: the kept indices and tokens of the reference."""
    num_tokens = prefix + (196 if grid is None else 48)
    kwargs = dict(num_prefix_tokens=prefix, grid=grid, order=order)
    program = torch.export.export(Prune(0.4, backend=backend, **kwargs),
                                  tokens_and_features(2, num_tokens, 0),
                                  dynamic_shapes=({0: BATCH}, {0: BATCH}))
    exported = program.module()
    for batch in (1, 5):
        x, f = tokens_and_features(batch, num_tokens, batch)
        out, indices = exported(x, f)
        want_out, want_indices = reference.prune(x, f, 0.4, return_indices=True, **kwargs)
        assert torch.equal(indices, want_indices)
        assert torch.equal(out, want_out)


def test_export_of_the_module_with_a_dynamic_batch():
    module = papr_kernels.PaPr(0.5, return_indices=True, order="spatial")
    program = torch.export.export(module, tokens_and_features(2, 197, 0),
                                  dynamic_shapes=({0: BATCH}, {0: BATCH}))
    for batch in (1, 3):
        x, f = tokens_and_features(batch, 197, batch)
        got = program.module()(x, f)
        want = reference.prune(x, f, 0.5, order="spatial", return_indices=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", EXPORT_BACKENDS)
def test_compile_of_the_module_with_mark_dynamic_does_not_recompile(backend):
    """mark_dynamic on the batch of x and f (tests/test_cpp.py has dynamic=True of prune)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(papr_kernels.PaPr(0.5, return_indices=True, backend=backend),
                             backend=counter, fullgraph=True)
    for batch in (2, 3, 5):
        x, f = tokens_and_features(batch, 197, batch)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(f, 0)
        got = compiled(x, f)
        want = reference.prune(x, f, 0.5, return_indices=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def tiny(family, **kwargs):
    torch.manual_seed(0)
    if family == "vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                 **dict(dict(depth=2), **kwargs)).eval()
    if family == "eva":   # EVA-02 (class token, absolute position embedding, ROPE), 2 blocks
        return make_eva("eva02_tiny_patch14_224", **dict(dict(num_classes=1000), **kwargs))
    if family == "beit":  # per-block and shared relative position bias, tables drawn
        return make_beit("beit_base_patch16_224", **dict(dict(
            img_size=224, num_classes=1000, use_shared_rel_pos_bias=True), **kwargs))
    if family == "cait":  # layer scales around 1
        return make_cait(**dict(dict(img_size=224, num_classes=1000), **kwargs))
    if family == "relpos":  # class token, a bias MLP per block, drawn
        return make_relpos(**dict(dict(img_size=224, num_classes=1000), **kwargs))
    if family == "swin":
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                                 depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8),
                                 **kwargs).eval()
    if family == "swinv2":
        return timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=224,
                                 window_size=7, depths=(1, 1, 1, 1), embed_dim=32,
                                 num_heads=(1, 2, 4, 8), **kwargs).eval()
    if family == "hiera":   # mask units; every parameter drawn
        return make_hiera(**dict(dict(num_classes=1000), **kwargs))
    if family == "caformer":   # separable-conv then attention stages
        return make_metaformer("caformer_s18", **kwargs)
    if family == "naflexvit":   # 4 registers, avg pooling
        return make_naflexvit("gap_reg4", **dict(dict(num_classes=1000), **kwargs))
    return timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1),
                             **kwargs).eval()


def patched(family, proposal=None, **kwargs):
    model = tiny(family)
    torch.manual_seed(1)
    return patch(model, proposal or nn.Conv2d(3, 8, 32, stride=32), z=0.5, **kwargs)


def images(batch, seed=0):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["vit", "eva", "beit", "cait", "relpos", "convnext",
                                    "hiera", "caformer", "naflexvit",
                                    pytest.param("swin", marks=pytest.mark.slow),     # 14 s
                                    pytest.param("swinv2", marks=pytest.mark.slow)])
def test_export_of_a_patched_model_with_a_dynamic_batch(family):
    """The MobileOne-S0 proposal (random weights) as `patch` would build it."""
    model = patched(family, papr_proposal.create("mobileone_s0", pretrained=False))
    program = torch.export.export(model, (images(2),), dynamic_shapes=({0: BATCH},))
    for batch in (1, 3):
        with torch.no_grad():
            got, want = program.module()(images(batch, batch)), model(images(batch, batch))
        assert got.shape == (batch, 1000)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,modes", [("vit", (True, None)), ("eva", (True, None)),
                                          ("beit", (True, None)), ("relpos", (True, None)),
                                          ("convnext", (True, None)),
                                          pytest.param("swin", (True,), marks=pytest.mark.slow)])
def test_compile_dynamic_batch_of_patched_models_does_not_recompile(family, modes):
    """dynamic=True (fullgraph) and mark_dynamic (None): one graph for batches 2, 3 and 5.
    Swin and ConvNeXt broke the graph under dynamic=True (math.isfinite of a symbolic
    LayerNorm eps), and then ran unpruned (the graph break below)."""
    model = patched(family)
    for dynamic in modes:
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, dynamic=dynamic, fullgraph=True)
        for batch in (2, 3, 5):
            x = images(batch, batch)
            if dynamic is None:
                torch._dynamo.mark_dynamic(x, 0)
            with torch.no_grad():
                got, want = compiled(x), model(x)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert counter.frame_count == 1, (family, dynamic)
    torch._dynamo.reset()


def _graph_break(module, args, output):
    torch._dynamo.graph_break()


@pytest.mark.parametrize("family,where,kwargs", [
    ("convnext", "stages.1.blocks.0.mlp", {}),   # Swin shares the mechanism (22 s: by hand)
    ("vit", "norm", dict(merge_r=8)),          # between the merged tokens and the pooling
    ("eva", "blocks.1", {}),                   # between blocks reading the gathered ROPE rows
    ("beit", "blocks.1.norm1", {}),            # in a block, before its attention reads the bias
    ("relpos", "blocks.1.norm1", {}),          # the same, through rel_pos.get_bias
])
def test_a_graph_break_inside_a_patched_model_keeps_its_pruning(family, where, kwargs):
    """A graph break (here a user's hook; dynamic=True made one too) resumed with the proposal
    map / token sizes of the forward lost: Swin and ConvNeXt ran unpruned (1.17 off on
    ConvNeXt), a merging 'avg' ViT pooled unweighted (0.27 off)."""
    torch.manual_seed(0)
    if family == "vit":
        model = patch(tiny("vit", global_pool="avg", class_token=False, depth=4),
                      nn.Conv2d(3, 8, 32, stride=32), z=0.5, **kwargs)
    else:
        model = patched(family)
    model.get_submodule(where).register_forward_hook(_graph_break)
    torch._dynamo.reset()
    x = images(2)
    with torch.no_grad():
        got, want = torch.compile(model, backend="eager")(x), model(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_compiled_training_step_gives_the_eager_gradients():
    """Forward and backward through prune on a patched ViT in training mode: the loss and every
    parameter's gradient equal eager's (aot_eager: the same AOT autograd graphs inductor gets)."""
    model = patched("vit").train()

    def step(images, labels):
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        return loss

    x, labels = images(2), torch.tensor([1, 7])
    want_loss = step(x, labels)
    want = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    got_loss = torch.compile(step, backend="aot_eager")(x, labels)
    torch._dynamo.reset()
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys() and len(got) > 20
    for name in want:
        assert torch.equal(got[name], want[name]), name


RUN_PACKAGE = """if True:
    import sys, torch
    torch.ops.load_library(sys.argv[2])    # the extension's ops, without papr_kernels
    model = torch._inductor.aoti_load_package(sys.argv[1])
    for batch in (1, 3):
        x = torch.load(sys.argv[1] + f".{batch}.in")
        torch.save(model(*x), sys.argv[1] + f".{batch}.out")
"""


@pytest.mark.slow   # about 30 s per AOTInductor compile on 2 CPU cores
@requires("cpp", "cpu")
def test_aoti_package_runs_the_extension_ops_through_the_proxy_executor(tmp_path):
    """aoti_compile_and_package of `PaPr` and of a patched ViT, with a dynamic batch: the
    extension's ops (stable-ABI custom ops) run in the package. Loaded here, and in a process
    that never imports papr_kernels but loads its library (what a C++ deployment does)."""
    vit = patched("vit")
    cases = {"papr": (papr_kernels.PaPr(0.5, return_indices=True),
                      lambda b: tokens_and_features(b, 197, b),
                      lambda x, f: reference.prune(x, f, 0.5, return_indices=True)),
             "vit": (vit, lambda b: (images(b, b),), vit)}
    library = glob.glob(os.path.join(os.path.dirname(papr_kernels.__file__), "_C.*so"))[0]
    env = dict(os.environ, TMPDIR=str(tmp_path))   # the package is unpacked there
    for name, (module, inputs, eager) in cases.items():
        dims = tuple({0: BATCH} for _ in inputs(2))
        program = torch.export.export(module, inputs(2), dynamic_shapes=dims)
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path / f"{name}.pt2"))
        loaded = torch._inductor.aoti_load_package(path)
        for batch in (1, 3):
            torch.save(inputs(batch), f"{path}.{batch}.in")
        subprocess.run([sys.executable, "-c", RUN_PACKAGE, path, library], env=env, check=True,
                       timeout=300)
        for batch in (1, 3):
            with torch.no_grad():
                want = eager(*inputs(batch))
            for got in (loaded(*inputs(batch)), torch.load(f"{path}.{batch}.out")):
                if name == "papr":
                    assert all(torch.equal(a, b) for a, b in zip(got, want))
                else:
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
