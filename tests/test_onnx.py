"""Deployment: `torch.onnx.export(..., dynamo=True)` of `prune` and of a patched timm ViT or Eva
gives a graph of standard ONNX ops only, which ONNX Runtime (CPU) runs with PyTorch's results on
inputs other than the export example (the selection, and an Eva's ROPE rows, are computed in the
graph, not baked in); and `torch.export` of a patched ViT keeps working. The exports have a
dynamic batch (`torch.export.Dim`) and run at other batch sizes than the example's."""
import warnings

import pytest
import torch
from torch import nn

import papr_kernels
from papr_kernels import reference

from conftest import Prune

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter needs it

timm = pytest.importorskip("timm")
from papr_kernels.timm import patch  # noqa: E402
from test_timm_beit import make_beit  # noqa: E402
from test_timm_eva import make_eva  # noqa: E402


BATCH = torch.export.Dim("batch", min=1, max=64)


def export_onnx(module, args, path, dynamic_batch=False):
    """torch.onnx.export (dynamo) of `module` to `path`; the checked ONNX model."""
    dynamic_shapes = tuple({0: BATCH} for _ in args) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=True, verbose=False,
                          dynamic_shapes=dynamic_shapes)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, model.opset_import
    assert not model.functions, [f.name for f in model.functions]
    nodes = list(model.graph.node)
    for node in nodes:
        assert node.domain in ("", "ai.onnx"), (node.domain, node.op_type)
        assert onnx.defs.has(node.op_type), node.op_type
    return model


def op_types(model):
    return {node.op_type for node in model.graph.node}


def assert_float64_scores(model, model_resizes=False):
    """The selection: float64 channel mean and resize (Cast to double, ReduceMean, Gather/Mul/
    Add taps), one Cast to float32, TopK; no Resize (ONNX Runtime has no float64 Resize), unless
    the model resizes something itself (NaFlexVit: its float32 position embedding)."""
    ops = op_types(model)
    assert {"ReduceMean", "TopK", "Gather"} <= ops, ops
    assert model_resizes or "Resize" not in ops
    casts = [next(a.i for a in n.attribute if a.name == "to")
             for n in model.graph.node if n.op_type == "Cast"]
    assert onnx.TensorProto.DOUBLE in casts and onnx.TensorProto.FLOAT in casts, casts


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_session(sess, *inputs):
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def feature_maps(generator, shape):
    """Random, integer-valued (exact ties), constant, and special values (NaN, inf, -0.0)."""
    plain = torch.randn(shape, generator=generator)
    special = plain.clone()
    special[:, :, 0, 0] = float("nan")
    special[:, :, -1, 1] = float("inf")
    special[:, :, 2:4, 2:4] = -0.0
    special[:, :, 4:6, 4:6] = 0.0
    return {"random": plain, "integer": plain.mul(2).round(), "constant": torch.ones(shape),
            "special": special}


@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_prune_exports_and_matches(tmp_path, prefix, order):
    gen = torch.Generator().manual_seed(prefix)
    grid, channels = (6, 8), 5
    x = torch.randn(2, prefix + 48, channels, generator=gen)
    f = torch.randn(2, 3, 4, 5, generator=gen)
    module = papr_kernels.PaPr(0.4, num_prefix_tokens=prefix, grid=grid, order=order,
                               return_indices=True)
    model = export_onnx(module, (x, f), tmp_path / "prune.onnx", dynamic_batch=True)
    assert_float64_scores(model)
    sess = session(tmp_path / "prune.onnx")
    for name, f2 in feature_maps(gen, (3, 3, 4, 5)).items():     # batch 3, exported at 2
        x2 = torch.randn(3, prefix + 48, channels, generator=gen)
        out, indices = run_session(sess, x2, f2)
        want_out, want_indices = reference.prune(x2, f2, 0.4, num_prefix_tokens=prefix,
                                                 grid=grid, order=order, return_indices=True)
        assert torch.equal(indices, want_indices), name
        assert torch.equal(out, want_out), name
    # Exporting leaves eager dispatch alone: the auto backend (the extension's op) runs again.
    assert not torch.onnx.is_in_onnx_export()
    got = papr_kernels.prune(x, f, 0.4, num_prefix_tokens=prefix, grid=grid, order=order,
                             return_indices=True)
    want = reference.prune(x, f, 0.4, num_prefix_tokens=prefix, grid=grid, order=order,
                           return_indices=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_prune_exports_video(tmp_path):
    """5-D f: the trilinear resize as float64 taps too."""
    gen = torch.Generator().manual_seed(5)
    x, f = torch.randn(1, 1 + 2 * 4 * 4, 3, generator=gen), torch.randn(1, 2, 3, 3, 3, generator=gen)
    module = Prune(0.5, grid=(2, 4, 4))
    export_onnx(module, (x, f), tmp_path / "video.onnx")
    sess = session(tmp_path / "video.onnx")
    for f2 in (torch.randn(1, 2, 3, 3, 3, generator=gen), torch.ones(1, 2, 3, 3, 3)):
        x2 = torch.randn(1, 33, 3, generator=gen)
        out, indices = run_session(sess, x2, f2)
        want_out, want_indices = reference.prune(x2, f2, 0.5, grid=(2, 4, 4),
                                                 return_indices=True)
        assert torch.equal(indices, want_indices)
        assert torch.equal(out, want_out)


VIT_PREFIX = {  # prefix count -> timm VisionTransformer options
    0: dict(class_token=False, global_pool="avg"),
    1: dict(),
    4: dict(class_token=True, reg_tokens=3),
}


EVA = {  # Eva (ROPE) models on the same 14 x 14 grid, weights as tests/test_timm_eva.py draws them
    "eva02": ("eva02_tiny_patch14_224", dict(patch_size=16)),     # ROPE table (N, dim)
    "eva-mixed": ("vit_small_patch16_rope_mixed_224",              # (depth, heads, N, dim)
                  dict(embed_dim=64, num_heads=2, init_values=None)),
}


def patched_vit(prefix, order, family="vit"):
    torch.manual_seed(0)
    if family == "vit":
        vit = timm.models.vision_transformer.VisionTransformer(
            img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10,
            **VIT_PREFIX[prefix]).eval()
    elif family == "beit":   # per-block and shared bias (drawn), absolute position embedding
        vit = make_beit(img_size=224, use_abs_pos_emb=True, use_rel_pos_bias=True,
                        use_shared_rel_pos_bias=True)
        for block in vit.blocks:   # torch 2.14's ONNX export fails on timm's SDPA path with a
            block.attn.fused_attn = False   # bias mask, the unpatched Beit too: the explicit one
    elif family.startswith("naflexvit"):   # NaFlexVit on images: registers / axial ROPE
        from test_timm_naflexvit import make_model
        vit = make_model(family.split("-", 1)[1])
    else:
        name, kwargs = EVA[family]
        vit = make_eva(name, **kwargs)
    assert vit.num_prefix_tokens == prefix
    return patch(vit, nn.Conv2d(3, 8, 32, stride=32), z=0.5, order=order)


def kept(model, images):
    """The patch indices the patched ViT keeps for `images` (14 x 14 grid)."""
    with torch.no_grad():
        f = model.papr_proposal(images)
    return reference.top_k(reference.significance(f, (14, 14)), 98, model.papr_order)


@pytest.mark.parametrize("family,prefix,order", [
    ("vit", 0, "score"), ("vit", 1, "score"), ("vit", 1, "spatial"), ("vit", 4, "spatial"),
    ("eva02", 1, "score"), ("eva-mixed", 1, "spatial"),    # the ROPE rows gathered in the graph
    ("beit", 1, "score"),                       # each sample's relative position bias gathered
    ("naflexvit-gap_reg4", 4, "score"), ("naflexvit-rope_axial", 1, "spatial"),
])
def test_patched_vit_onnx_runtime(tmp_path, family, prefix, order):
    model = patched_vit(prefix, order, family)
    gen = torch.Generator().manual_seed(1)
    example = torch.randn(2, 3, 224, 224, generator=gen)
    onnx_model = export_onnx(model, (example,), tmp_path / "vit.onnx", dynamic_batch=True)
    assert_float64_scores(onnx_model, model_resizes=family.startswith("naflexvit"))
    sess = session(tmp_path / "vit.onnx")
    for images in (torch.randn(2, 3, 224, 224, generator=gen),
                   torch.rand(3, 3, 224, 224, generator=gen) * 4 - 2,
                   torch.randn(1, 3, 224, 224, generator=gen)):
        assert not torch.equal(kept(model, images)[0], kept(model, example)[0])  # not baked in
        with torch.no_grad():
            want = model(images)
        (got,) = run_session(sess, images)
        assert got.shape == want.shape == (images.shape[0], 10)
        # relative: timm's head init leaves an Eva's logits ~1e-3, where a wrong ROPE row moves
        # them by 1e-4
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_patched_vit_torch_export():
    """torch.export keeps the package's op (auto backend): its module gives the eager output,
    for inputs other than the example too."""
    model = patched_vit(1, "score")
    gen = torch.Generator().manual_seed(2)
    example = torch.randn(2, 3, 224, 224, generator=gen)
    program = torch.export.export(model, (example,))
    exported = program.module()
    for images in (example, torch.randn(2, 3, 224, 224, generator=gen)):
        with torch.no_grad():
            assert torch.allclose(exported(images), model(images), rtol=0, atol=1e-5)


def patched_hierarchical(name):
    torch.manual_seed(0)
    if name == "swin":
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                                  depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
    elif name == "swinv2":
        model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=224,
                                  window_size=7, depths=(1, 1, 1, 1), embed_dim=32,
                                  num_heads=(1, 2, 4, 8))
    elif name == "caformer":
        from test_hierarchical import _metaformer
        model = _metaformer("caformer_s18")
    else:
        model = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1))
    return patch(model.eval(), nn.Conv2d(3, 8, 32, stride=32), z=0.5)


@pytest.mark.parametrize("name", ["swin", "swinv2", "convnext", "caformer"])
def test_patched_hierarchical_onnx_runtime(tmp_path, name):
    """Swin / ConvNeXt / MetaFormer: each stage's select and the row ops export as standard ops
    too. (Hiera is left out: timm's own Hiera does not convert, torch 2.14: its mask-unit
    attention calls SDPA on 5-D tensors, which the ONNX exporter refuses.)"""
    model = patched_hierarchical(name)
    gen = torch.Generator().manual_seed(3)
    example = torch.randn(1, 3, 224, 224, generator=gen)
    onnx_model = export_onnx(model, (example,), tmp_path / f"{name}.onnx")
    assert_float64_scores(onnx_model)
    sess = session(tmp_path / f"{name}.onnx")
    images = torch.randn(1, 3, 224, 224, generator=gen)
    with torch.no_grad():
        f = model.papr_proposal(images)
        f_example = model.papr_proposal(example)
        want = model(images)
    assert not torch.equal(reference.top_k(reference.significance(f, (56, 56)), 1568),
                           reference.top_k(reference.significance(f_example, (56, 56)), 1568))
    (got,) = run_session(sess, images)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-3
