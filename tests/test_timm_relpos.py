"""papr_kernels.timm on timm's `VisionTransformerRelPos` (`vit_relpos_*`, `vit_srelpos_*`)
against a hand-written pipeline (saving, deepcopy, torch.compile(fullgraph=True), threads,
tracing: tests/test_timm_usage.py).

Random weights only (pretrained=False), 2 blocks. The reference embeds the images with timm's
public pieces, keeps the tokens at `papr_kernels.reference`'s indices, takes each sample's bias
from the full (heads, n, n) one (timm's `get_bias()` of the unpatched model) by plain advanced
indexing at [0..P-1] + (P + kept), and runs the attention by hand (logits + bias, softmax) with
the block's layers; not through the patched forward or timm's attention. timm initializes the
bias MLPs' outputs and tables near zero and the class token at 1e-6, so `make_relpos` redraws
them and the block weights: a wrong bias gather would pass otherwise.
"""
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.vision_transformer_relpos import ResPostRelPosBlock  # noqa: E402

import papr_kernels.timm as papr_timm  # noqa: E402
from papr_kernels import reference  # noqa: E402

from test_timm import (assert_bf16_and_autocast_match,  # noqa: E402
                       assert_spatial_order_in_inference_mode, checkpointing_grads,
                       count_block_tokens, make_proposal)

TINY = dict(img_size=96, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def make_relpos(name="vit_relpos_medium_patch16_cls_224", seed=0, **kwargs):
    """A tiny VisionTransformerRelPos (timm's `name` with TINY sizes) whose bias tables, bias
    MLPs, class token, layer scales / post-norm scales and block weights are redrawn."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **dict(TINY, **kwargs)).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("relative_position_bias_table") or key == "cls_token":
                nn.init.normal_(param)
            elif key.endswith(("ls1.gamma", "ls2.gamma")):
                nn.init.uniform_(param, 0.5, 1.5)
            elif key.startswith(("blocks", "shared_rel_pos")) and param.dim() == 2:
                nn.init.normal_(param, std=param.shape[1] ** -0.5)
            elif key.startswith(("blocks", "shared_rel_pos")) and key.endswith("bias"):
                nn.init.normal_(param, std=0.1)
        for block in model.blocks:
            if isinstance(block, ResPostRelPosBlock):   # norm weights start at init_values
                for norm in (block.norm1, block.norm2):
                    nn.init.normal_(norm.weight, 1.0, 0.3)
    return model


def images_for(model, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen)


def full_biases(model):
    """The (heads, n, n) bias of each block (its own or the shared one; None without), from
    timm's `get_bias()` of the unpatched model: computed before patching."""
    shared = model.shared_rel_pos
    return [(block.attn.rel_pos or shared).get_bias()[0].detach() for block in model.blocks]


def reference_attention(attn, x, bias):
    """timm's RelPosAttention by hand: qkv, q / k norms, scaled logits + the (B, heads, L, L)
    bias, softmax."""
    batch, length, channels = x.shape
    q, k, v = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (attn.q_norm(q) @ attn.k_norm(k).transpose(-2, -1)) * attn.scale + bias
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, channels)
    return attn.proj(out)


def reference_block(block, x, bias):
    if isinstance(block, ResPostRelPosBlock):
        x = x + block.norm1(reference_attention(block.attn, x, bias))
        return x + block.norm2(block.mlp(x))
    x = x + block.ls1(reference_attention(block.attn, block.norm1(x), bias))
    return x + block.ls2(block.mlp(block.norm2(x)))


def reference_kept(model, net, images, z, order="score"):
    scores = reference.significance(net(images), tuple(model.patch_embed.grid_size), True)
    n = model.num_prefix_tokens + model.patch_embed.num_patches
    return reference.top_k(scores, reference.keep_count(n, z, model.num_prefix_tokens), order)


def reference_features(model, biases, net, images, z, order="score", broken=None):
    """`forward_features` by hand. `broken` gathers the bias wrongly, to show that the test sees
    it: 'same' (sample 0's tokens for every sample), 'no_offset' (kept patch i read as token i,
    with a class token), 'unpruned_bias' (the bias of the first L tokens)."""
    batch, prefix = images.shape[0], model.num_prefix_tokens
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)     # (B, N, C)
    x = model.patch_embed.norm(x)
    if model.cls_token is not None:
        x = torch.cat((model.cls_token.expand(batch, -1, -1), x), dim=1)
    n = x.shape[1]
    tokens = torch.arange(n).expand(batch, n)           # the token each row of x is
    if z < 1:
        kept = reference_kept(model, net, images, z, order)
        x = reference.gather(x, kept, prefix)
        offset = 0 if broken == "no_offset" else prefix
        tokens = torch.cat((torch.arange(prefix).expand(batch, prefix), kept + offset), dim=1)
        if broken == "same":
            tokens = tokens[:1].expand(batch, -1)
        if broken == "unpruned_bias":
            tokens = torch.arange(tokens.shape[1]).expand(batch, -1)
    for block, bias in zip(model.blocks, biases):
        per_sample = torch.stack([bias[:, t][:, :, t] for t in tokens])   # (B, heads, L, L)
        x = reference_block(block, x, per_sample)
    return model.norm(x)


CONFIGS = {
    # the timm names' own settings (bias MLP / table, class token, pooling, block kind)
    "relpos_base_mlp_avg": ("vit_relpos_base_patch16_224", {}),
    "relpos_medium_cls_mlp": ("vit_relpos_medium_patch16_cls_224", {}),
    "srelpos_shared_mlp": ("vit_srelpos_small_patch16_224", {}),
    "cls_bias_table": ("vit_relpos_base_patch16_cls_224", dict(rel_pos_type="bias")),
    "shared_bias_table_cls": ("vit_srelpos_medium_patch16_224",
                              dict(rel_pos_type="bias", class_token=True, global_pool="token")),
    "res_post_swin_mlp": ("vit_relpos_small_patch16_rpn_224", dict(rel_pos_type="mlp_swin")),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_relpos_matches_hand_written_pipeline(config):
    name, kwargs = CONFIGS[config]
    model = make_relpos(name, **kwargs)
    biases = full_biases(model)
    net = make_proposal()
    images = images_for(model)
    original_class = type(model)
    with torch.no_grad():
        unpatched = model(images)
        torch.testing.assert_close(
            model.forward_head(reference_features(model, biases, net, images, 1.0)),
            unpatched, rtol=1e-5, atol=1e-5)
        assert papr_timm.patch(model, net, z=0.5) is model
        assert isinstance(model, original_class) and papr_timm.is_patched(model)
        counts = count_block_tokens(model)
        prefix = model.num_prefix_tokens
        for z in (0.5, 0.3, 0.1):
            model.papr_z = z
            kept = reference_kept(model, net, images, z)
            assert set(kept[0].tolist()) != set(kept[1].tolist())   # each sample its own
            counts.clear()
            tokens = model.forward_features(images)
            assert counts == [prefix + kept.shape[1]] * 2
            expected = reference_features(model, biases, net, images, z)
            torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(images), model.forward_head(expected),
                                       rtol=1e-5, atol=1e-5)
            # The gather matters. Without the class offset, two kept patches read the bias of
            # their left neighbours: the same relative position unless one is in column 0 (or
            # is patch 0), as z = 0.5 keeps here.
            wrongs = ("same", "unpruned_bias") + (("no_offset",) if prefix else ())
            for broken in wrongs if z == 0.5 else ():
                wrong = reference_features(model, biases, net, images, z, broken=broken)
                assert not torch.allclose(tokens, wrong, atol=1e-2), broken

        model.papr_z = 1.0   # keeps every token: bit for bit the unpatched model
        assert torch.equal(model(images), unpatched)
        papr_timm.unpatch(model)
        assert type(model) is original_class and not papr_timm.is_patched(model)
        assert all(type(b.attn.rel_pos).__name__ in ("RelPosMlp", "RelPosBias", "NoneType")
                   for b in model.blocks)
        assert torch.equal(model(images), unpatched)


def test_spatial_order_and_inference_mode():
    model = make_relpos()
    biases = full_biases(model)
    net = make_proposal()
    assert_spatial_order_in_inference_mode(
        model, net, lambda images, z, order: reference_features(model, biases, net, images, z,
                                                                order=order))


@pytest.mark.parametrize("name,kwargs", [("vit_relpos_medium_patch16_cls_224", {}),
                                         ("vit_srelpos_small_patch16_224", dict(class_token=True))])
def test_unfused_attention(name, kwargs):
    """timm's other attention path (fused_attn False: `rel_pos(logits)` or logits + shared)."""
    model = make_relpos(name, **kwargs)
    for block in model.blocks:
        block.attn.fused_attn = False
    biases = full_biases(model)
    net = make_proposal()
    images = images_for(model)
    papr_timm.patch(model, net, z=0.3)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images),
                                   reference_features(model, biases, net, images, 0.3),
                                   rtol=1e-5, atol=1e-5)


def test_bf16_model_and_autocast():
    model = make_relpos()
    biases = full_biases(model)
    assert_bf16_and_autocast_match(model, make_proposal(), images_for(model), lambda m, net, x:
                                   reference_features(m, [b.to(x.dtype) for b in biases], net,
                                                      x, 0.5))


@pytest.mark.parametrize("name", ["vit_relpos_medium_patch16_cls_224",
                                  "vit_srelpos_small_patch16_224"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    """The blocks are recomputed in the backward pass, outside the forward: each recomputation
    must see its sample's bias again."""
    model = make_relpos(name)
    papr_timm.patch(model, make_proposal(), z=0.5).train()
    for module in model.modules():   # the bias MLPs' dropout (0.125): the two runs would differ
        if isinstance(module, nn.Dropout):
            module.eval()
    grads = checkpointing_grads(model, images_for(model))
    assert grads[0].keys() == grads[1].keys()
    key = next(k for k in grads[0] if "rel_pos.mlp.fc2.weight" in k)
    assert grads[0][key].abs().sum() > 0
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


def test_merging_other_grids_and_other_attentions_are_refused():
    model = make_relpos()
    with pytest.raises(ValueError, match="merge_r does not apply to VisionTransformerRelPos "
                                         "models: ToMe merging is not defined with a relative "
                                         "position bias"):
        papr_timm.patch(model, make_proposal(), merge_r=2)
    model.blocks[1].attn.rel_pos.window_size = (5, 5)
    with pytest.raises(ValueError, match=r"model.blocks\[1\].attn.rel_pos is a bias over a "
                                         r"\(5, 5\) window and 1 prefix tokens; .* \(6, 6\) patch "
                                         r"grid and 1 prefix tokens"):
        papr_timm.patch(model, make_proposal())
    assert not papr_timm.is_patched(model)
    model.blocks[1].attn.rel_pos = nn.Identity()
    with pytest.raises(TypeError, match=r"model.blocks\[1\].attn.rel_pos \(Identity\) is not "
                                        r"timm's RelPosMlp or RelPosBias"):
        papr_timm.patch(model, make_proposal())
    model.blocks[1] = nn.Identity()
    with pytest.raises(TypeError, match=r"model.blocks\[1\].attn \(NoneType\) is not timm's "
                                        r"RelPosAttention"):
        papr_timm.patch(model, make_proposal())
    assert not papr_timm.is_patched(model)
