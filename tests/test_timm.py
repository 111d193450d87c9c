"""papr_kernels.timm / papr_kernels.proposal: patched timm ViTs against hand-written pipelines.

Random weights only (pretrained=False): nothing is downloaded. The reference pipeline below is
written from timm's public pieces (patch_embed, pos_embed, blocks, norm, head) and
`papr_kernels.reference`, not from the patched forward.
"""
import inspect

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed  # noqa: E402

import papr_kernels.timm as papr_timm  # noqa: E402
from papr_kernels import proposal as papr_proposal  # noqa: E402
from papr_kernels import reference  # noqa: E402


class TinyProposal(nn.Module):
    """A cheap stride-32 ConvNet: (B, 3, H, W) -> (B, 8, ceil(H/32), ceil(W/32))."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 8, stride=8)
        self.conv2 = nn.Conv2d(16, 8, 4, stride=4, padding=0)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = nn.functional.pad(x, (0, -w % 32, 0, -h % 32))
        return self.conv2(torch.relu(self.conv1(x)))


def make_proposal(seed=0):
    torch.manual_seed(seed)
    return TinyProposal().eval()


def make_vit(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images_for(model, batch=1, size=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    size = size or model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=gen)


def reference_tokens(model, net, images, z, order="score", align_corners=True):
    """Tokens after pruning, by hand: patch embed, prefix tokens, pos embed, PaPr reference."""
    batch, _, height, width = images.shape
    patch = model.patch_embed.patch_size
    grid = (height // patch[0], width // patch[1])
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)   # (B, N, C)
    x = model.patch_embed.norm(x)
    prefix = [t.expand(batch, -1, -1) for t in (model.cls_token, getattr(model, "dist_token", None),
                                                model.reg_token) if t is not None]
    num_prefix = sum(t.shape[1] for t in prefix)
    pos = model.pos_embed
    if tuple(grid) != tuple(model.patch_embed.grid_size):
        pos = resample_abs_pos_embed(pos, new_size=grid, old_size=model.patch_embed.grid_size,
                                     num_prefix_tokens=0 if model.no_embed_class else num_prefix)
    if model.no_embed_class:
        x = torch.cat(prefix + [x + pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos
    if z < 1:
        scores = reference.significance(net(images), grid, align_corners)
        keep = reference.keep_count(x.shape[1], z, num_prefix)
        x = reference.gather(x, reference.top_k(scores, keep, order), num_prefix)
    return x, num_prefix


def reference_logits(model, net, images, z, order="score", align_corners=True):
    x, num_prefix = reference_tokens(model, net, images, z, order, align_corners)
    for block in model.blocks:
        x = block(x)
    x = model.norm(x)
    if model.global_pool == "token":
        heads = [(model.head, x[:, 0])]
        if getattr(model, "head_dist", None) is not None:
            heads.append((model.head_dist, x[:, 1]))
        return sum(head(model.fc_norm(t)) for head, t in heads) / len(heads)
    assert model.global_pool == "avg"
    return model.head(model.fc_norm(x[:, num_prefix:].mean(dim=1)))


def checkpointing_grads(model, images):
    """The parameter gradients {name: grad} of model(images).square().sum(), computed without
    and then with gradient checkpointing (the blocks recomputed in the backward pass)."""
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        model(images).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()
                      if p.grad is not None})
    return grads


def assert_bf16_and_autocast_match(model, net, images, reference):
    """`model` patched with `net` at z = 0.5, its features in bf16 and (in fp32) under bf16
    autocast, each against `reference(model, net, images)` run the same way (the proposal's bf16
    features choose the tokens). Tolerance: bf16 rounding (8 bits) through a few unit-gain
    blocks; a token or bias gathered wrongly moves features by ~1."""
    papr_timm.patch(model, net, z=0.5)
    with torch.no_grad():
        fp32 = model.forward_features(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model.forward_features(images)
            expected_autocast = reference(model, net, images)
        model.to(torch.bfloat16)
        out = model.forward_features(images.bfloat16())
        expected = reference(model, net.bfloat16(), images.bfloat16())
    assert out.dtype == torch.bfloat16 and not torch.allclose(autocast, fp32, atol=1e-2)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.1)
    torch.testing.assert_close(autocast, expected_autocast, rtol=0.05, atol=0.1)


def assert_spatial_order_in_inference_mode(model, net, reference):
    """patch(model, net, z=0.4, order="spatial") on two images: forward_features under
    inference_mode equals `reference(images, z, order)` (the family's hand-written features) in
    spatial order, which differs from score order's."""
    images = images_for(model, batch=2)
    papr_timm.patch(model, net, z=0.4, order="spatial")
    assert model.papr_order == "spatial"
    with torch.no_grad():
        expected = reference(images, 0.4, "spatial")
        assert not torch.allclose(expected, reference(images, 0.4, "score"),
                                  atol=1e-2)   # the order changes the tokens' rows
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_features(images), expected,
                                   rtol=1e-5, atol=1e-5)


def count_block_tokens(model):
    """A list that a forward fills with the token count entering each block's MLP."""
    counts = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda mod, inp, out: counts.append(inp[0].shape[1]))
    return counts


MODELS = [
    # name, expected prefix tokens, input size
    ("vit_base_patch16_224", 1),
    ("vit_base_patch16_gap_224", 0),
    ("vit_base_patch16_reg4_gap_256", 4),
    ("vit_small_patch16_384", 1),
    ("deit_tiny_distilled_patch16_224", 2),
]


@pytest.mark.parametrize("name,num_prefix", MODELS, ids=[m[0] for m in MODELS])
def test_patched_vit_matches_hand_written_pipeline(name, num_prefix):
    # The model's own configuration (prefix tokens, pooling, image size, width) with 3 blocks:
    # the patch touches only what comes before the blocks, and CI time is short.
    model = make_vit(name, depth=3)
    net = make_proposal()
    images = images_for(model)
    original_class = type(model)
    with torch.no_grad():
        unpatched = model(images)
        assert papr_timm.patch(model, net, z=0.5) is model
        assert isinstance(model, original_class) and type(model) is not original_class
        counts = count_block_tokens(model)
        out = model(images)
        expected = reference_logits(model, net, images, 0.5)
        n = model.patch_embed.num_patches + num_prefix
        assert counts[0] == num_prefix + reference.keep_count(n, 0.5, num_prefix)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, unpatched, atol=1e-3)  # pruning changed something

        model.papr_z = 0.3  # changeable between calls
        torch.testing.assert_close(model(images), reference_logits(model, net, images, 0.3),
                                   rtol=1e-5, atol=1e-5)

        model.papr_z = 1.0  # keeps every token: bit-identical to the unpatched model
        assert torch.equal(model(images), unpatched)

        papr_timm.unpatch(model)
        assert type(model) is original_class
        assert not papr_timm.is_patched(model) and not hasattr(model, "papr_z")
        assert torch.equal(model(images), unpatched)


def tiny_vit(**kwargs):
    """A 2-block, 64-wide ViT: the same VisionTransformer class, cheap to run and to compile."""
    torch.manual_seed(0)
    args = dict(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    args.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


@pytest.mark.parametrize("kind", ["dynamic_img_size", "non_square_model"])
def test_non_square_and_dynamic_image_sizes(kind):
    net = make_proposal()
    if kind == "dynamic_img_size":
        model = tiny_vit(dynamic_img_size=True)
        sizes = [(160, 224), (224, 224), (288, 192)]  # grids 10x14, 14x14, 18x12
    else:
        model = tiny_vit(img_size=(160, 256))          # static 10x16 grid
        sizes = [(160, 256)]
    papr_timm.patch(model, net, z=0.4)
    counts = count_block_tokens(model)
    with torch.no_grad():
        for size in sizes:
            images = images_for(model, batch=2, size=size)
            counts.clear()
            out = model(images)
            n = 1 + (size[0] // 16) * (size[1] // 16)
            assert counts[0] == 1 + reference.keep_count(n, 0.4, 1)
            torch.testing.assert_close(out, reference_logits(model, net, images, 0.4),
                                       rtol=1e-5, atol=1e-5)


def test_spatial_order_and_patch_keeps_module_tree():
    model = tiny_vit(global_pool="avg", class_token=False, reg_tokens=2)
    net = make_proposal()
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    papr_timm.patch(model, net, z=0.5, order="spatial")
    # The proposal is outside the module tree: parameters and state_dict are the model's alone.
    assert list(model.state_dict()) == list(params_before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in params_before.items())
    model.train()
    assert not net.training  # the proposal stays in eval mode
    model.eval()
    images = images_for(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(images),
                                   reference_logits(model, net, images, 0.5, order="spatial"),
                                   rtol=1e-5, atol=1e-5)
    # Re-patching updates the settings, unpatch restores the class in one step.
    papr_timm.patch(model, net, z=0.7)
    assert model.papr_z == 0.7 and model.papr_order == "score"
    papr_timm.unpatch(model)
    assert type(model) is timm.models.vision_transformer.VisionTransformer


def test_align_corners_reaches_the_vit_selection():
    model = tiny_vit()
    net = make_proposal()
    images = images_for(model, batch=2)
    papr_timm.patch(model, net, z=0.5, align_corners=False)
    with torch.no_grad():
        out = model(images)
        want = reference_logits(model, net, images, 0.5, align_corners=False)
        other = reference_logits(model, net, images, 0.5, align_corners=True)
    assert not torch.allclose(want, other, atol=1e-4)   # the setting changes the kept tokens
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_patch_rejects_bad_arguments():
    model = tiny_vit()
    with pytest.raises(ValueError, match="z"):
        papr_timm.patch(model, make_proposal(), z=0.0)
    with pytest.raises(ValueError, match="order"):
        papr_timm.patch(model, make_proposal(), order="random")
    with pytest.raises(ValueError, match="merge_r"):
        papr_timm.patch(model, make_proposal(), merge_r=-1)
    with pytest.raises(ValueError, match="merge_r needs order='score'"):
        papr_timm.patch(model, make_proposal(), order="spatial", merge_r=2)
    with pytest.raises(TypeError, match="VisionTransformer"):
        papr_timm.patch(nn.Linear(2, 2), make_proposal())
    assert not papr_timm.is_patched(model)


def test_proposal_create_mobileone_is_frozen_reparameterized_stride_32():
    proposal = papr_proposal.create("mobileone_s0", pretrained=False)
    assert not proposal.training and not proposal.network.training
    assert all(not p.requires_grad for p in proposal.parameters())
    # MobileOne's training-time branches are folded into single convolutions.
    names = [n for n, _ in proposal.named_modules()]
    assert not any("rbr" in n for n in names) and any("reparam_conv" in n for n in names)
    images = torch.randn(1, 3, 224, 160, requires_grad=True)
    f = proposal(images)
    assert f.shape == (1, 1024, 7, 5) and not f.requires_grad
    proposal.train()
    assert not proposal.network.training
    # The same network unfused computes the same features (reparameterization is exact).
    torch.manual_seed(0)
    unfused = timm.create_model("mobileone_s0", pretrained=False, features_only=True,
                                out_indices=(-1,)).eval()
    torch.manual_seed(0)
    fused = papr_proposal.create("mobileone_s0", pretrained=False)
    with torch.no_grad():
        a, b = fused(images), unfused(images)[-1]
    scale = b.abs().max()  # random weights: activations grow large, compare relative to them
    torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-5)


def test_proposal_wraps_user_module():
    net = make_proposal()
    wrapped = papr_proposal.create(net)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(wrapped(images), net(images))
    assert papr_proposal.create(wrapped) is wrapped
    with pytest.raises(ValueError, match="proposal network must return"):
        papr_proposal.create(nn.Flatten())(images)


def test_compile_and_inference_mode():
    model = tiny_vit()
    net = make_proposal()
    papr_timm.patch(model, net, z=0.5)
    images = images_for(model, batch=2)
    with torch.inference_mode():
        expected = reference_logits(model, net, images, 0.5)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), expected, rtol=1e-4, atol=1e-4)
        model.papr_z = 0.3  # a guard on papr_z: recompiles, follows the new ratio
        torch.testing.assert_close(compiled(images), reference_logits(model, net, images, 0.3),
                                   rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_cli_demo_with_timm_model(capsys):
    from papr_kernels.__main__ import main

    assert main(["demo", "--model", "vit_tiny_patch16_224", "--batch", "1", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    # z, tokens entering the first block (1 + int(197 z) when pruned), images/s, speed-up
    assert [(row[0], int(row[1])) for row in rows] == [("none", 197), ("0.7", 138), ("0.5", 99),
                                                       ("0.3", 60)]
    assert all(float(row[2]) > 0 for row in rows)


def test_full_vit_base_with_mobileone_proposal():
    """The published setting end to end: all 12 blocks of ViT-B/16, MobileOne-S0 proposal."""
    model = make_vit("vit_base_patch16_224")
    torch.manual_seed(0)
    proposal = papr_proposal.create("mobileone_s0", pretrained=False)
    images = images_for(model, batch=1)
    papr_timm.patch(model, proposal, z=0.5)
    counts = count_block_tokens(model)
    with torch.no_grad():
        out = model(images)
        assert counts == [99] * 12  # class token + int(197 * 0.5) patches in every block
        last_stage = lambda x: proposal.network(x)[-1]  # noqa: E731  (features_only: a list)
        want = reference_logits(model, last_stage, images, 0.5)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_forward_intermediates_stays_dense_on_a_patched_vit():
    """Documented: pruned tokens have no NCHW layout, so forward_intermediates is the unpatched
    model's (and the patched forward still prunes afterwards)."""
    model = make_vit("vit_base_patch16_224", depth=3)
    images = images_for(model, batch=2)
    with torch.no_grad():
        dense_final, dense_maps = model.forward_intermediates(images, indices=2)
        dense_logits = model(images)
        papr_timm.patch(model, make_proposal(), z=0.5)
        final, maps = model.forward_intermediates(images, indices=2)
        pruned_logits = model(images)
    assert torch.equal(final, dense_final)
    assert len(maps) == 2 and all(torch.equal(a, b) for a, b in zip(maps, dense_maps))
    assert maps[0].shape == (2, 768, 14, 14)
    assert (pruned_logits - dense_logits).abs().max() > 1e-3


def test_attention_masks_are_refused_only_while_pruning():
    """timm's attn_mask / is_causal are per token of the full sequence: a pruned ViT refuses
    them (named), z = 1 passes them to timm's blocks as the unpatched model does."""
    model = tiny_vit()
    images = images_for(model, batch=2)
    tokens = 1 + model.patch_embed.num_patches
    mask = torch.ones(2, 1, tokens, tokens, dtype=torch.bool).tril()
    if "attn_mask" not in inspect.signature(model.forward_features).parameters:
        pytest.skip(f"timm {timm.__version__}: forward_features takes no attn_mask")
    causal = "is_causal" in inspect.signature(model.forward_features).parameters  # timm > 1.0.20
    with torch.no_grad():
        expected = model.forward_features(images, attn_mask=mask)
        expected_causal = model.forward_features(images, is_causal=True) if causal else None
        papr_timm.patch(model, make_proposal(), z=0.5)
        with pytest.raises(ValueError, match="attn_mask / is_causal are not supported"):
            model.forward_features(images, attn_mask=mask)
        with pytest.raises(ValueError, match="attn_mask / is_causal are not supported"):
            model.forward_features(images, is_causal=True)
        model.papr_z = 1.0
        assert torch.equal(model.forward_features(images, attn_mask=mask), expected)
        if causal:
            assert torch.equal(model.forward_features(images, is_causal=True), expected_causal)
