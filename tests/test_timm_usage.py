"""What users do with a patched timm model beyond one forward: pretrained proposals, saving and
reloading, compiling while z changes, training settings, tracing, the command line.

Every family (ViT, Eva, Beit, CaiT, ViT RelPos, Swin, Swin V2, ConvNeXt) goes through
`papr_kernels.timm.patch`; random weights only.
"""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import papr_kernels  # noqa: E402
import papr_kernels.timm as pt  # noqa: E402
from papr_kernels import proposal as papr_proposal  # noqa: E402
from papr_kernels import reference  # noqa: E402
from papr_kernels.__main__ import main  # noqa: E402

from conftest import requires, run_in_threads  # noqa: E402


class TinyProposal(nn.Module):
    """(B, 3, H, W) -> (B, 8, H/32, W/32), cheap."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 32, stride=32)

    def forward(self, x):
        return self.conv(x)


def _vit(**kwargs):
    torch.manual_seed(0)
    args = dict(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    args.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


def _swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1),
                             embed_dim=32, num_heads=(1, 2, 4, 8)).eval()


def _swinv2():
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=224,
                              window_size=7, depths=(1, 1, 1, 1), embed_dim=32,
                              num_heads=(1, 2, 4, 8)).eval()
    with torch.no_grad():   # timm zero-initializes the residual post-norms: no branch would act
        for norm in (m for n, m in model.named_modules() if n.endswith(("norm1", "norm2"))):
            norm.weight.normal_(1.0, 0.3)
    return model


def _convnext():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1)).eval()


def _convnextv2():
    """GlobalResponseNorm in the mlp (linear, as convnextv2_tiny and larger), its zero-initialized
    weight and bias drawn."""
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_tiny", pretrained=False, depths=(1, 1, 1, 1),
                              dims=(16, 32, 64, 64)).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".grn." in key:
                param.normal_()
    return model


def _hiera():
    """Every parameter drawn (timm's position embeddings start at zero, its head small)."""
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", pretrained=False, embed_dim=16, num_heads=1,
                              stages=(1, 1, 1, 1), num_classes=10).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
    return model


def _caformer():
    """CAFormer's mixers and norms (test_hierarchical.METAFORMERS: timm's caformer_* fix their
    sizes), small; residual and StarReLU scales drawn."""
    from timm.models import metaformer as mf
    from test_hierarchical import METAFORMERS
    torch.manual_seed(0)
    model = mf.MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), num_classes=10,
                          **METAFORMERS["caformer_s18"](mf)).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(".scale"):
                param.uniform_(0.5, 1.5)
    return model


def _eva():
    torch.manual_seed(0)
    return timm.models.eva.Eva(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                               num_classes=10, use_rot_pos_emb=True).eval()


def _naflexvit():
    """A NaFlexVit with axial ROPE and a class token (timm's ViT name built with use_naflex)."""
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_rope_224", pretrained=False, use_naflex=True,
                             embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()


def _beit():
    """Both biases (per block and shared), their tables drawn (timm's are zero)."""
    torch.manual_seed(0)
    model = timm.models.beit.Beit(img_size=224, patch_size=16, embed_dim=64, depth=2,
                                  num_heads=2, num_classes=10, use_rel_pos_bias=True,
                                  use_shared_rel_pos_bias=True).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("relative_position_bias_table"):
                param.normal_()
    return model


def _cait():
    """Layer scales around 1 (timm's are 1e-5: the blocks would hardly act)."""
    torch.manual_seed(0)
    model = timm.models.cait.Cait(img_size=224, patch_size=16, embed_dim=64, depth=2,
                                  num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(("gamma_1", "gamma_2")):
                param.uniform_(0.5, 1.5)
    return model


def _relpos():
    """A class token and a bias MLP per block, its output layer drawn (timm's is near zero)."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer_relpos.VisionTransformerRelPos(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10,
        class_token=True, global_pool="token").eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("rel_pos.mlp.fc2.weight"):
                param.normal_(std=0.1)
    return model


FAMILIES = {"vit": _vit, "eva": _eva, "beit": _beit, "cait": _cait, "relpos": _relpos,
            "naflexvit": _naflexvit, "swin": _swin, "swinv2": _swinv2, "convnext": _convnext,
            "convnextv2": _convnextv2, "hiera": _hiera, "caformer": _caformer}


def _patched(family, z=0.5):
    torch.manual_seed(1)
    return pt.patch(FAMILIES[family](), TinyProposal(), z=z)


def _images(batch=2, seed=2):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# 1. A proposal given by name is the pretrained network


def test_a_proposal_name_loads_pretrained_weights_and_says_how_to_work_offline():
    code = ("import timm, papr_kernels.timm as pt\n"
            "m = timm.create_model('vit_small_patch16_224', depth=1)\n"
            "try:\n"
            "    pt.patch(m, 'mobileone_s0')\n"
            "except RuntimeError as e:\n"
            "    print('ERROR', e)\n"
            "print('patched', pt.is_patched(m))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")     # this machine, like CI, cannot reach the Hub
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300).stdout
    assert "ERROR could not load the pretrained weights of the proposal 'mobileone_s0'" in out
    assert "pretrained_cfg_overlay=dict(file=" in out and "pretrained=False" in out
    assert "patched False" in out                   # nothing changed on failure


def test_pretrained_false_is_random_and_asked_for():
    model = _vit()
    pt.patch(model, "mobileone_s0", pretrained=False)
    network = model.papr_proposal.network
    assert type(network).__name__ == "FeatureListNet"   # timm's features_only MobileOne-S0
    assert not any(p.requires_grad for p in network.parameters())


# ---------------------------------------------------------------------------------------------
# 2. Saving and reloading a patched model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_save_and_load_keep_the_patch_and_the_proposal(family):
    model, images = _patched(family), _images()
    with torch.no_grad():
        expected = model(images)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert pt.is_patched(loaded) and type(loaded) is type(model)
        assert loaded.papr_z == 0.5
        assert torch.equal(loaded(images), expected)
        # the proposal's weights travelled too
        for a, b in zip(loaded.papr_proposal.parameters(), model.papr_proposal.parameters()):
            assert torch.equal(a, b)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(images), expected)
        pt.unpatch(loaded)
        assert not pt.is_patched(loaded) and not type(loaded).__name__.startswith("PaPr")
        assert pt.is_patched(model)


def test_state_dict_round_trip_with_a_repatch():
    """The documented alternative: the model's state_dict (the proposal is not in it) and the
    same proposal passed to `patch` again."""
    model, images = _patched("vit"), _images()
    state = model.state_dict()
    assert not any(k.startswith("_papr") or "proposal" in k for k in state)
    fresh = _vit(depth=2)
    fresh.load_state_dict(state)
    pt.patch(fresh, model.papr_proposal, z=0.5)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


# ---------------------------------------------------------------------------------------------
# 3. torch.compile(fullgraph=True) while z changes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_model_follows_z_with_one_compile_per_distinct_z(family):
    model, images = _patched(family), _images()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    with torch.no_grad():
        for z in (0.5, 0.25, 0.3, 0.5, 0.25, 1.0):
            model.papr_z = z
            torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert len(compiles) == 4          # 0.5, 0.25, 0.3, 1.0: revisiting a z reuses its graph


def test_compiled_prune_with_dynamic_true():
    x, f = torch.randn(2, 197, 8), torch.randn(2, 4, 7, 7)
    torch._dynamo.reset()
    compiled = torch.compile(papr_kernels.prune, fullgraph=True, dynamic=True, backend="aot_eager")
    for z in (0.5, 0.3):
        assert torch.equal(compiled(x, f, z), reference.prune(x, f, z))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# 4, 5. Training settings and silent settings


def test_patch_dropout_in_training_drops_among_the_kept_tokens():
    model = pt.patch(_vit(patch_drop_rate=0.25), TinyProposal(), z=0.5).train()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    out = model(_images(batch=1))
    kept = reference.keep_count(197, 0.5, 1)              # 98 patches kept by PaPr
    assert seen == [1 + int(kept * (1 - 0.25))]           # then PatchDropout keeps 75 % of them
    assert out.shape == (1, 10)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bad", [1.5, float("nan"), 0.0, -1.0, float("inf")])
def test_papr_z_is_checked_on_every_family(family, bad):
    model = _patched(family)
    with pytest.raises(ValueError, match="z must be a keep ratio in"):
        model.papr_z = bad
    assert model.papr_z == 0.5


@pytest.mark.parametrize("family", ["swin", "convnext", "caformer"])
def test_papr_z_changes_a_hierarchical_model(family):
    model, images = _patched(family, z=0.65), _images(batch=1)
    with torch.no_grad():
        at_065 = model(images)
        model.papr_z = 0.3
        at_03 = model(images)
        model.papr_z = 1.0
        dense = model(images)
        pt.unpatch(model)
        assert torch.equal(dense, model(images))
    assert (at_065 - at_03).abs().max() > 1e-4


def test_merging_with_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = pt.patch(_vit(depth=4), TinyProposal(), z=0.5, merge_r=4).train()
        model.set_grad_checkpointing(checkpointing)
        model(_images(batch=1)).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_patching_freezes_a_user_module_in_place_as_documented():
    net = TinyProposal().train()
    pt.patch(_vit(), net)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("family", ["swin", "convnext", "caformer"])
def test_stages_run_outside_the_model_forward_are_refused_not_run_dense(family):
    """timm's FeatureListNet(flatten_sequential=True), what features_only builds, runs a patched
    model's stages one by one: the proposal never sees the images (they ran unpruned). Refused
    at z < 1, run at z = 1; FeatureGetterNet (forward_intermediates) is pruned."""
    from timm.models._features import FeatureGetterNet, FeatureListNet
    model, images = _patched(family), _images(batch=1)
    flat = FeatureListNet(model, out_indices=(0, 1), flatten_sequential=True)
    getter = FeatureGetterNet(copy.deepcopy(model), out_indices=(0, 1))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="ran outside its model's forward_features / "
                                               "forward_intermediates"):
            flat(images)
        pruned = getter(images)
        model.papr_z = 1.0
        at_z1 = flat(images)
        pt.unpatch(model)
        dense = flat(images)
        dense_maps = model.forward_intermediates(images, indices=(0, 1), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(at_z1, dense))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(pruned, dense_maps))


# ---------------------------------------------------------------------------------------------
# 6. Tracing, threads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_jit_trace_of_a_patched_model(family):
    model, images = _patched(family), _images()
    with torch.no_grad():
        traced = torch.jit.trace(model, images, check_trace=False)
        assert torch.equal(traced(images), model(images))


@pytest.mark.parametrize("family", ["swin", "convnext", "caformer", "hiera", "beit", "cait", "relpos"])
def test_threads_sharing_a_patched_model_use_their_own_state(family):
    """Swin / ConvNeXt: the proposal map; Beit, ViT RelPos: the kept tokens' bias positions;
    CaiT: the pruned tokens through the class attention."""
    model = _patched(family)
    inputs = [_images(batch=1, seed=s) for s in range(6)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results = run_in_threads(torch.no_grad()(model), inputs, repeats=3)   # no_grad per thread
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# 7. Messages


def test_patch_of_an_unsupported_model_names_every_family():
    with pytest.raises(TypeError, match="Beit, Cait, ConvNeXt, Eva, Hiera, MetaFormer, NaFlexVit, "
                                        "SwinTransformer, SwinTransformerV2, VisionTransformer, "
                                        "VisionTransformerRelPos"):
        pt.patch(nn.Linear(2, 2), TinyProposal())


@pytest.mark.parametrize("name,wrapper", [("convnext_atto", "FeatureListNet"),
                                          ("vit_tiny_patch16_224", "FeatureGetterNet")])
def test_a_features_only_model_is_refused_with_the_way_to_its_feature_maps(name, wrapper):
    features = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, 1),
                                 **({"depths": (1, 1, 1, 1)} if "convnext" in name else
                                    {"depth": 2}))
    with pytest.raises(TypeError, match=rf"got {wrapper} \(a timm features_only model\): "
                                        r"patch the full model .* forward_intermediates"):
        pt.patch(features, TinyProposal())


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "dp"])
def test_a_wrapped_model_is_refused_with_what_to_patch(wrap):
    with pytest.raises(TypeError, match=r"\(a wrapper\): patch the model it wraps, then wrap "
                                        r"the patched model"):
        pt.patch(wrap(_vit()), TinyProposal())


@pytest.mark.parametrize("model_name", ["swin_tiny_patch4_window7_224", "convnext_atto"])
def test_cli_demo_runs_hierarchical_models(capsys, model_name):
    assert main(["demo", "--model", model_name, "--batch", "1", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["none", "0.7", "0.5", "0.3"]
    # rows entering the first pruned MLP: all 56 * 56 positions, then int(3136 z)
    assert [int(row[1]) for row in rows] == [3136, 2195, 1568, 940]


def test_cli_rejects_unknown_models_and_nonpositive_repeats(capsys):
    with pytest.raises(SystemExit, match="--model 'no_such_model'"):
        main(["demo", "--model", "no_such_model"])
    with pytest.raises(SystemExit, match="--model 'resnet18': papr_kernels.timm.patch supports"):
        main(["demo", "--model", "resnet18"])   # a timm model of a family patch does not support
    with pytest.raises(SystemExit):
        main(["demo", "--repeats", "0"])
    assert "expected a positive int, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 8. Gradients at the edges


@pytest.mark.parametrize("backend", [pytest.param(b, marks=requires(b, "cpu"), id=b)
                                     for b in ("torch", "cpp")])
def test_empty_batch_keeps_the_graph(backend):
    x = torch.randn(0, 197, 8, requires_grad=True)
    out = papr_kernels.prune(x, torch.randn(0, 4, 7, 7), 0.5, backend=backend)
    assert out.shape == (0, 99, 8) and out.grad_fn is not None
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", [pytest.param(b, marks=requires(b, "cpu"), id=b)
                                     for b in ("torch", "cpp")])
def test_only_f_requiring_grad_gives_an_output_without_grad(backend, recwarn):
    x, f = torch.randn(2, 197, 8), torch.randn(2, 4, 7, 7, requires_grad=True)
    out = papr_kernels.prune(x, f, 0.5, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
    assert not [w for w in recwarn if "autograd kernel was not registered" in str(w.message)]


# ---------------------------------------------------------------------------------------------
# The proposal follows the model's inputs: dtype, autocast


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_bf16_model_gets_a_bf16_proposal(family):
    model = _patched(family).to(torch.bfloat16)
    images = _images(batch=1).to(torch.bfloat16)
    with torch.no_grad():
        out = model(images)
        assert model.papr_proposal.network.conv.weight.dtype == torch.bfloat16
        model.papr_z = 1.0
        pt.unpatch(model)
        dense = model(images)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert out.shape == dense.shape


@pytest.mark.parametrize("family", list(FAMILIES))
def test_autocast_leaves_the_proposal_to_autocast(family):
    """Under autocast the proposal follows the images' device only: a proposal that followed
    bf16 images stays bf16 for fp32 images (autocast picks the compute dtype), and its features
    are autocast's; without autocast the fp32 images bring back the fp32 weights, exactly."""
    model, images = _patched(family), _images(batch=1)
    proposal = model.papr_proposal
    weight = proposal.network.conv.weight
    original = weight.detach().clone()
    with torch.no_grad():
        proposal(images.bfloat16())                    # e.g. a bf16 model sharing it
        assert weight.dtype == torch.bfloat16
        seen = []
        hook = proposal.network.register_forward_hook(lambda m, a, out: seen.append(
            (a[0].dtype, out.dtype)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        hook.remove()
        assert weight.dtype == torch.bfloat16          # left as autocast leaves it
        assert seen == [(torch.bfloat16, torch.bfloat16)]  # the images in the weights' dtype
        assert torch.isfinite(out.float()).all()
        model(images)
    assert weight.dtype == torch.float32 and torch.equal(weight, original)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_proposal_follows_model_to_and_patch_outside_any_forward(family):
    """model.to / .float() and patch itself move the proposal (outside the module tree), so a
    compiled bf16 model traces no cast of it (fullgraph=True compiles on the first call)."""
    model = _patched(family)
    weight = model.papr_proposal.network.conv.weight
    model.to(torch.bfloat16)
    assert weight.dtype == torch.bfloat16
    model.float()
    assert weight.dtype == torch.float32
    model.to("meta")                      # the proposal's weights stay (nothing restores them)
    assert weight.device.type == "cpu"
    bf16_model = pt.patch(FAMILIES[family]().to(torch.bfloat16), TinyProposal(), z=0.5)
    assert bf16_model.papr_proposal.network.conv.weight.dtype == torch.bfloat16
    images = _images(batch=1).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(bf16_model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(images), bf16_model(images))
    torch._dynamo.reset()


def test_round_trips_through_another_dtype_keep_the_proposal_exact():
    """Following bf16 images (or a bf16 model sharing it) and then fp32 ones gives the fp32
    weights back bit for bit; weights changed in between are kept, not restored."""
    proposal = papr_proposal.create(TinyProposal())
    weight = proposal.network.conv.weight
    original = weight.detach().clone()
    fp32_model = pt.patch(_vit(), proposal, z=0.5)
    bf16_model = pt.patch(_vit().to(torch.bfloat16), proposal, z=0.5)
    assert weight.dtype == torch.bfloat16
    images = _images(batch=1)
    with torch.no_grad():
        fp32_model(images)
        assert torch.equal(weight, original)
        bf16_model(images.bfloat16())
        proposal(images)
        assert torch.equal(weight, original)
        proposal(images.bfloat16())
        weight.mul_(2)                       # a change while in bf16 stays
        proposal(images)
    assert torch.equal(weight, (original.bfloat16() * 2).float())


def test_a_proposal_dtype_can_be_fixed_explicitly():
    proposal = papr_proposal.create(TinyProposal(), dtype=torch.float32)
    model = pt.patch(_vit().to(torch.bfloat16), proposal, z=0.5)
    with torch.no_grad():
        out = model(_images(batch=1).to(torch.bfloat16))
    assert proposal.network.conv.weight.dtype == torch.float32 and out.dtype == torch.bfloat16


@pytest.mark.parametrize("family", list(FAMILIES))
def test_is_patched_on_every_family(family):
    model = FAMILIES[family]()
    assert not pt.is_patched(model)
    pt.patch(model, TinyProposal())
    assert pt.is_patched(model)
    pt.unpatch(model)
    assert not pt.is_patched(model)


# ---------------------------------------------------------------------------------------------
# The proposal's settings inside a patched model; what it returns


def test_jit_trace_of_a_patched_model_with_a_compiled_proposal():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    torch.manual_seed(1)
    model = pt.patch(_vit(), papr_proposal.create(TinyProposal(), compiled={"backend": counter}),
                     z=0.5)
    images, other = _images(), _images(seed=5)
    with torch.no_grad():
        traced = torch.jit.trace(model, images, check_trace=False)
        assert torch.equal(traced(other), model(other))
    assert counter.frame_count == 1                   # the eager call only, not the trace
    torch._dynamo.reset()


def test_a_fixed_float32_proposal_in_a_patched_model_under_autocast():
    proposal = papr_proposal.create(TinyProposal(), dtype=torch.float32)
    model = pt.patch(_vit(), proposal, z=0.5)
    seen = []
    proposal.network.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(_images(batch=1))
    assert seen == [torch.float32]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("output,message", [
    (lambda x: [], "proposal network returned no features"),
    (lambda x: x[:, :, None, ::32, ::32], r"proposal must return \(B, K, h, w\) features for "
                                          r"4-D images, got shape \(2, 3, 1, 7, 7\)"),
    (lambda x: x[:1, :, ::32, ::32],
     r"proposal must return features with the batch size of the images \(2\), got 1"),
    (lambda x: torch.empty(x.shape[0], 3, 7, 7, device="meta"),
     r"proposal must return features on the device of the images \(cpu\), got meta"),
], ids=["empty-list", "5-D", "batch", "device"])
def test_a_proposal_returning_the_wrong_thing_is_named(family, output, message):
    model = pt.patch(FAMILIES[family](), output, z=0.5)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(_images(batch=2))


def test_cli_demo_checks_the_backend_before_it_prints_or_times(monkeypatch, capsys):
    monkeypatch.setenv("PAPR_KERNELS_BACKEND", "nonsense")
    with pytest.raises(SystemExit, match="python -m papr_kernels demo: the environment variable "
                                         "PAPR_KERNELS_BACKEND must be one of .* 'nonsense'"):
        main(["demo", "--model", "vit_tiny_patch16_224", "--batch", "1", "--repeats", "1"])
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# Subclasses: an override of a method the patch replaces would be bypassed, silently


def _half_forward(cls, name="forward"):
    """A subclass of cls whose `name` halves the output of timm's."""
    def method(self, *args, **kwargs):
        return 0.5 * getattr(super(sub, self), name)(*args, **kwargs)
    sub = type("Half" + cls.__name__, (cls,), {name: method})
    return sub


def _override_forward_features(model):
    model.__class__ = _half_forward(type(model), "forward_features")
    return "model is a Half", "forward_features"


def _override_last_block(model):
    stages = model.stages if hasattr(model, "stages") else model.layers
    block = stages[-1].blocks[0]
    block.__class__ = _half_forward(type(block))
    return f"model stage {len(stages) - 1} block 0 is a Half", "forward"


def _override_first_stage(model):
    stages = model.stages if hasattr(model, "stages") else model.layers
    stages[0].__class__ = _half_forward(type(stages[0]))
    return "model stage 0 is a Half", "forward"


SUBCLASS_CASES = [(family, _override_forward_features) for family in
                  ("vit", "eva", "beit", "cait", "relpos", "hiera", "naflexvit")] + \
                 [(family, override) for family in ("swin", "swinv2", "convnext", "caformer")
                  for override in (_override_last_block, _override_first_stage)]


@pytest.mark.parametrize("family,override", SUBCLASS_CASES)
def test_subclass_overriding_a_replaced_method_is_refused(family, override):
    """Before the refusal a patched ScaledViT ran timm's forward_features (its own bypassed),
    a ConvNeXt / Swin with a block subclass ran `_papr_forward` instead of its forward."""
    model = FAMILIES[family]()
    what, method = override(model)
    with torch.no_grad():
        before = model(_images())
    with pytest.raises(TypeError, match=f"{what}.*whose {method} .*bypassed"):
        pt.patch(model, TinyProposal(), z=0.5)
    assert not pt.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(_images()), before)


def test_subclass_overrides_the_patch_calls_or_leaves_are_kept():
    """A ViT subclass with its own `_pos_embed` (as DeiT distilled) and `pool` (not merging)
    patches, and at z = 1 gives its unpatched output; with merge_r its `pool` is refused."""
    def pos_embed(self, x):
        return super(sub, self)._pos_embed(x) + 1.0

    def pool(self, x, pool_type=None):
        return x[:, 1:].amax(dim=1)

    base = timm.models.vision_transformer.VisionTransformer
    sub = type("ShiftedViT", (base,), {"_pos_embed": pos_embed, "pool": pool})
    model = _vit()
    model.__class__ = sub
    images = _images()
    with torch.no_grad():
        dense = model(images)
        pt.patch(model, TinyProposal(), z=1.0)
        assert torch.equal(model(images), dense)
    with pytest.raises(TypeError, match="ShiftedViT, whose pool .*bypassed"):
        pt.patch(model, TinyProposal(), z=0.5, merge_r=2)
