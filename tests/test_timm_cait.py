"""papr_kernels.timm on timm's `Cait` (CaiT) against a hand-written pipeline (saving, deepcopy,
torch.compile(fullgraph=True), threads, tracing: tests/test_timm_usage.py).

Random weights only (pretrained=False), 2 blocks. The reference embeds the images with timm's
public pieces, keeps the patch tokens at `papr_kernels.reference`'s indices (no prefix token:
the class token joins after `blocks`), and runs the talking-heads attention and the class
attention by hand (head mixing as an einsum over the heads) with the blocks' layers; not through
the patched forward or timm's block / attention forwards. timm initializes the layer scales at
`init_values` (1e-5 for the timm names: every branch would vanish) and the position embedding
small, so `make_cait` redraws them: a wrong gather would pass otherwise.
"""
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.cait import Cait  # noqa: E402

import papr_kernels.timm as papr_timm  # noqa: E402
from papr_kernels import reference  # noqa: E402

from test_timm import (assert_bf16_and_autocast_match,  # noqa: E402
                       assert_spatial_order_in_inference_mode, checkpointing_grads,
                       count_block_tokens, make_proposal)

TINY = dict(img_size=96, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def make_cait(name="cait_xxs24_224", seed=0, **kwargs):
    """A tiny Cait (timm's `name` with TINY sizes) whose layer scales (around 1), position
    embedding, class token, block weights (unit gain) and block biases are redrawn."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **dict(TINY, **kwargs)).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(("gamma_1", "gamma_2")):
                nn.init.uniform_(param, 0.5, 1.5)
            elif key in ("pos_embed", "cls_token"):
                nn.init.normal_(param)
            elif key.startswith("blocks") and param.dim() == 2:
                nn.init.normal_(param, std=param.shape[1] ** -0.5)
            elif key.startswith("blocks") and key.endswith("bias"):
                nn.init.normal_(param, std=0.1)
    return model


def images_for(model, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen)


def mix_heads(linear, attn):
    """timm's talking-heads projection by hand: out[b, g] = sum_h W[g, h] attn[b, h] + bias[g]."""
    return torch.einsum("gh,bhij->bgij", linear.weight, attn) + linear.bias[:, None, None]


def reference_talking_heads(attn, x):
    batch, length, channels = x.shape
    qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = mix_heads(attn.proj_l, (q * attn.scale) @ k.transpose(-2, -1))
    weights = mix_heads(attn.proj_w, logits.softmax(dim=-1))
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, length, channels))


def reference_class_attention(attn, u):
    """The first token of u attends to all of u (itself included)."""
    batch, length, channels = u.shape

    def heads(t):
        return t.reshape(batch, t.shape[1], attn.num_heads, -1).transpose(1, 2)

    q, k, v = heads(attn.q(u[:, :1])), heads(attn.k(u)), heads(attn.v(u))
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, 1, channels))


def reference_blocks(model, x):
    for block in model.blocks:
        x = x + block.gamma_1 * reference_talking_heads(block.attn, block.norm1(x))
        x = x + block.gamma_2 * block.mlp(block.norm2(x))
    return x


def reference_kept(model, net, images, z, order="score"):
    scores = reference.significance(net(images), tuple(model.patch_embed.grid_size), True)
    return reference.top_k(scores, reference.keep_count(model.patch_embed.num_patches, z, 0),
                           order)


def reference_features(model, net, images, z, order="score", broken=None):
    """`forward_features` by hand. `broken` gets one step wrong, to show that the test sees it:
    'same' (sample 0's kept tokens for every sample), 'pos_unmoved' (pruned before the position
    embedding, which is added at the first k positions), 'class_unpruned' (the blocks and the
    class attention over all patch tokens, the kept ones returned)."""
    batch = images.shape[0]
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)     # (B, N, C)
    x = model.patch_embed.norm(x)
    kept = None
    if z < 1:
        kept = reference_kept(model, net, images, z, order)
        if broken == "same":
            kept = kept[:1].expand(batch, -1)
    if broken == "pos_unmoved":
        x = reference.gather(x, kept, 0) + model.pos_embed[:, :kept.shape[1]]
    elif broken == "class_unpruned":
        x = reference_blocks(model, x + model.pos_embed)
    else:
        x = x + model.pos_embed
        x = x if kept is None else reference.gather(x, kept, 0)
        x = reference_blocks(model, x)
    if model.blocks_token_only is not None:
        cls_token = model.cls_token.expand(batch, -1, -1)
        for block in model.blocks_token_only:
            attended = reference_class_attention(block.attn,
                                                 block.norm1(torch.cat((cls_token, x), dim=1)))
            cls_token = cls_token + block.gamma_1 * attended
            cls_token = cls_token + block.gamma_2 * block.mlp(block.norm2(cls_token))
        if broken == "class_unpruned":
            x = reference.gather(x, kept, 0)
        x = torch.cat((cls_token, x), dim=1)
    return model.norm(x)


CONFIGS = {
    # the timm names' own settings (init_values, heads) at TINY sizes; the other pooling, one
    # class-attention block at another image size
    "cait_xxs24": ("cait_xxs24_224", {}),
    "cait_s24": ("cait_s24_224", {}),
    "avg_pool": ("cait_xxs24_224", dict(global_pool="avg")),
    "one_class_block_80px": ("cait_xxs36_224", dict(img_size=80, depth_token_only=1)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_cait_matches_hand_written_pipeline(config):
    name, kwargs = CONFIGS[config]
    model = make_cait(name, **kwargs)
    net = make_proposal()
    images = images_for(model)
    original_class = type(model)
    with torch.no_grad():
        unpatched = model(images)
        torch.testing.assert_close(model.forward_head(reference_features(model, net, images, 1.0)),
                                   unpatched, rtol=1e-5, atol=1e-5)
        assert papr_timm.patch(model, net, z=0.5) is model
        assert isinstance(model, original_class) and papr_timm.is_patched(model)
        counts = count_block_tokens(model)
        class_counts = []
        for block in model.blocks_token_only:
            block.attn.register_forward_pre_hook(lambda m, a: class_counts.append(a[0].shape[1]))
        for z in (0.5, 0.3, 0.1):
            model.papr_z = z
            kept = reference_kept(model, net, images, z)
            assert set(kept[0].tolist()) != set(kept[1].tolist())   # each sample its own
            counts.clear()
            class_counts.clear()
            tokens = model.forward_features(images)
            assert counts == [kept.shape[1]] * len(model.blocks)
            assert class_counts == [1 + kept.shape[1]] * len(model.blocks_token_only)
            expected = reference_features(model, net, images, z)
            torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(images), model.forward_head(expected),
                                       rtol=1e-5, atol=1e-5)
            for broken in ("same", "pos_unmoved", "class_unpruned") if z == 0.5 else ():
                wrong = reference_features(model, net, images, z, broken=broken)
                assert not torch.allclose(tokens, wrong, atol=1e-2), broken

        model.papr_z = 1.0   # keeps every token: bit for bit the unpatched model
        assert torch.equal(model(images), unpatched)
        papr_timm.unpatch(model)
        assert type(model) is original_class and not papr_timm.is_patched(model)
        assert torch.equal(model(images), unpatched)


def test_spatial_order_and_inference_mode():
    model = make_cait()
    net = make_proposal()
    assert_spatial_order_in_inference_mode(
        model, net, lambda images, z, order: reference_features(model, net, images, z,
                                                                order=order))


def test_unfused_class_attention():
    """timm's other class-attention path (fused_attn False: logits, softmax, weights @ v)."""
    model = make_cait()
    for block in model.blocks_token_only:
        block.attn.fused_attn = False
    net = make_proposal()
    images = images_for(model)
    papr_timm.patch(model, net, z=0.3)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images),
                                   reference_features(model, net, images, 0.3),
                                   rtol=1e-5, atol=1e-5)


def test_without_class_attention_after_prune_intermediate_layers():
    """timm >= 1.0.31 drops the class token and `blocks_token_only` (None); 1.0.20 empties
    `blocks_token_only` and keeps the class token: the patched model follows either."""
    model = make_cait()
    model.prune_intermediate_layers(indices=1, prune_head=True)
    net = make_proposal()
    images = images_for(model)
    with torch.no_grad():
        unpatched = model.forward_features(images)
        papr_timm.patch(model, net, z=0.5)
        kept = reference_kept(model, net, images, 0.5)
        tokens = model.forward_features(images)
        torch.testing.assert_close(tokens, reference_features(model, net, images, 0.5),
                                   rtol=1e-5, atol=1e-5)
    assert tokens.shape[1] == unpatched.shape[1] - model.patch_embed.num_patches + kept.shape[1]


def test_bf16_model_and_autocast():
    model = make_cait()
    assert_bf16_and_autocast_match(model, make_proposal(), images_for(model),
                                   lambda m, net, x: reference_features(m, net, x, 0.5))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_cait()
    papr_timm.patch(model, make_proposal(), z=0.5).train()
    grads = checkpointing_grads(model, images_for(model))
    assert grads[0].keys() == grads[1].keys()
    assert grads[0]["blocks.1.attn.proj_l.weight"].abs().sum() > 0
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


def test_merging_is_refused_with_the_reason():
    model = make_cait()
    with pytest.raises(ValueError, match="merge_r does not apply to Cait models: ToMe merging is "
                                         "not defined for CaiT: its talking-heads attention"):
        papr_timm.patch(model, make_proposal(), merge_r=2)
    assert not papr_timm.is_patched(model) and type(model) is Cait
