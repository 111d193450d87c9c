"""papr_kernels.timm on timm's `Eva` (EVA-02, ROPE ViTs) against a hand-written pipeline
(saving, deepcopy, torch.compile(fullgraph=True), threads, tracing: tests/test_timm_usage.py).

Random weights only (pretrained=False), 2 blocks. The reference runs timm's public pieces
(patch_embed, prefix tokens, pos_embed, the model's ROPE table, blocks, norm, head) itself, with
the tokens and the ROPE rows gathered at `papr_kernels.reference`'s kept indices by plain
indexing, not through the patched forward or timm's `apply_keep_indices_nlc`.
"""
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.eva import Eva  # noqa: E402

import papr_kernels.timm as papr_timm  # noqa: E402
from papr_kernels import reference  # noqa: E402

from test_timm import checkpointing_grads, count_block_tokens, make_proposal  # noqa: E402


def make_eva(name, seed=0, **kwargs):
    """A 2-block model whose blocks' weights are redrawn with unit gain (and layer scale 1): timm's
    small initialization leaves the attention nearly uniform, where the ROPE would hardly matter."""
    torch.manual_seed(seed)
    args = dict(depth=2, num_classes=10)
    args.update(kwargs)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():
        for param in model.blocks.parameters():
            if param.dim() == 2:
                nn.init.normal_(param, std=param.shape[1] ** -0.5)
            elif param.dim() == 1 and not torch.all(param == 0):
                param.fill_(1)
    return model


def images_for(model, batch=2, size=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *(size or model.patch_embed.img_size), generator=gen)


def is_mixed(model):
    return getattr(model, "rope_mixed", False)


def reference_features(model, net, images, z, order="score", rope_rows=None):
    """`forward_features` by hand: embed, prefix + position tokens, PaPr reference, blocks with
    the ROPE rows of each sample's kept positions, norm; and the prefix token count.
    `rope_rows` (N,) reorders the ROPE table first (a wrong table, to show that it matters)."""
    batch, _, height, width = images.shape
    patch = model.patch_embed.patch_size
    grid = (height // patch[0], width // patch[1])
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)   # (B, N, C)
    x = model.patch_embed.norm(x)
    prefix = [t.expand(batch, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    num_prefix = sum(t.shape[1] for t in prefix)
    pos = model.pos_embed
    if pos is not None and grid != tuple(model.patch_embed.grid_size):
        pos = resample_abs_pos_embed(pos, new_size=grid, old_size=model.patch_embed.grid_size,
                                     num_prefix_tokens=0 if model.no_embed_class else num_prefix)
    if pos is not None and model.no_embed_class:
        x = x + pos
    x = torch.cat(prefix + [x], dim=1)
    if pos is not None and not model.no_embed_class:
        x = x + pos
    rope = None if model.rope is None else model.rope.get_embed(shape=list(grid))
    # (N, dim), or (depth, heads, N, dim) for mixed ROPE
    if rope_rows is not None:
        rope = rope[..., rope_rows, :]
    if z < 1:
        scores = reference.significance(net(images), grid, True)
        kept = reference.top_k(scores, reference.keep_count(x.shape[1], z, num_prefix), order)
        x = reference.gather(x, kept, num_prefix)
        if rope is None:
            pass
        elif is_mixed(model):   # per block (heads, N, dim) -> (B, heads, k, dim)
            rope = [table[:, kept].transpose(0, 1) for table in rope]
        else:                   # (N, dim) -> (B, 1, k, dim)
            rope = rope[kept.reshape(-1)].reshape(batch, 1, kept.shape[1], -1)
    x = model.norm_pre(x)
    for i, block in enumerate(model.blocks):
        x = block(x, rope=rope[i] if is_mixed(model) else rope)
    return model.norm(x), num_prefix


def reference_logits(model, net, images, z, order="score"):
    return model.forward_head(reference_features(model, net, images, z, order)[0])


MODELS = [
    # name, extra arguments, prefix tokens
    ("eva02_tiny_patch14_224", dict(img_size=112), 1),     # class token, abs pos + ROPE (cat)
    ("vit_betwixt_patch16_rope_reg4_gap_256",              # 4 registers, no class token
     dict(embed_dim=64, num_heads=2, init_values=None), 4),
    ("vit_small_patch16_rope_mixed_224",                   # depth-dependent ('mixed') ROPE
     dict(embed_dim=64, num_heads=2, init_values=None), 1),
    ("vit_small_patch16_dinov3",                           # class + 4 registers, DINOv3 ROPE
     dict(img_size=64, embed_dim=64, num_heads=2), 5),
]


@pytest.mark.parametrize("name,kwargs,num_prefix", MODELS, ids=[m[0] for m in MODELS])
def test_patched_eva_matches_hand_written_pipeline(name, kwargs, num_prefix):
    model = make_eva(name, **kwargs)
    net = make_proposal()
    images = images_for(model)
    original_class = type(model)
    with torch.no_grad():
        unpatched = model(images)
        assert torch.equal(reference_logits(model, net, images, 1.0), unpatched)
        dense = model.forward_features(images)
        assert papr_timm.patch(model, net, z=0.5) is model
        assert isinstance(model, original_class) and papr_timm.is_patched(model)
        counts = count_block_tokens(model)
        for z in (0.5, 0.3, 0.1):
            model.papr_z = z
            counts.clear()
            tokens = model.forward_features(images)
            n = model.patch_embed.num_patches + num_prefix
            assert counts == [num_prefix + reference.keep_count(n, z, num_prefix)] * 2
            expected, prefix = reference_features(model, net, images, z)
            assert prefix == num_prefix
            torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(tokens[:, :num_prefix], dense[:, :num_prefix], atol=1e-2)
            shuffled = torch.randperm(n - num_prefix, generator=torch.Generator().manual_seed(3))
            wrong_rope, _ = reference_features(model, net, images, z, rope_rows=shuffled)
            assert not torch.allclose(tokens, wrong_rope, atol=1e-2)   # the ROPE rows matter
            torch.testing.assert_close(model(images), model.forward_head(expected),
                                       rtol=1e-5, atol=1e-5)

        model.papr_z = 1.0   # keeps every token: bit for bit the unpatched model
        assert torch.equal(model(images), unpatched)
        papr_timm.unpatch(model)
        assert type(model) is original_class and not papr_timm.is_patched(model)
        assert torch.equal(model(images), unpatched)


def test_spatial_order_class_token_and_registers():
    torch.manual_seed(0)
    model = Eva(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                num_reg_tokens=2, use_rot_pos_emb=True, global_pool="token").eval()
    assert model.num_prefix_tokens == 3
    net = make_proposal()
    images = images_for(model)
    papr_timm.patch(model, net, z=0.4, order="spatial")
    assert model.papr_order == "spatial"
    with torch.no_grad():
        expected, _ = reference_features(model, net, images, 0.4, order="spatial")
        torch.testing.assert_close(model.forward_features(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images), model.forward_head(expected),
                                   rtol=1e-5, atol=1e-5)


def test_eva_without_rope():
    """The first EVA: an absolute position embedding only (`rope` None)."""
    model = make_eva("eva_giant_patch14_224", img_size=56, embed_dim=64, num_heads=2)
    assert model.rope is None
    net = make_proposal()
    images = images_for(model)
    papr_timm.patch(model, net, z=0.3)
    with torch.no_grad():
        expected, _ = reference_features(model, net, images, 0.3)
        assert expected.shape[1] == 1 + reference.keep_count(17, 0.3, 1)
        torch.testing.assert_close(model.forward_features(images), expected,
                                   rtol=1e-5, atol=1e-5)


def test_dynamic_image_size():
    model = make_eva("eva02_tiny_patch14_224", img_size=112, dynamic_img_size=True)
    net = make_proposal()
    papr_timm.patch(model, net, z=0.4)
    counts = count_block_tokens(model)
    with torch.no_grad():
        for size in [(84, 126), (112, 112), (140, 98)]:       # grids 6x9, 8x8, 10x7
            images = images_for(model, size=size)
            counts.clear()
            out = model.forward_features(images)
            n = 1 + (size[0] // 14) * (size[1] // 14)
            assert counts[0] == 1 + reference.keep_count(n, 0.4, 1)
            torch.testing.assert_close(out, reference_features(model, net, images, 0.4)[0],
                                       rtol=1e-5, atol=1e-5)


def test_bf16_model():
    # (timm 1.0.20's mixed ROPE table fails in bf16 in timm itself, patched or not)
    model = make_eva("eva02_tiny_patch14_224", img_size=112)
    net = make_proposal()
    papr_timm.patch(model, net, z=0.5)
    model.to(torch.bfloat16)
    images = images_for(model).bfloat16()
    with torch.no_grad():
        out = model.forward_features(images)
        expected, _ = reference_features(model, net.bfloat16(), images, 0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_eva("vit_small_patch16_rope_mixed_224", embed_dim=64, num_heads=2,
                     init_values=None)
    papr_timm.patch(model, make_proposal(), z=0.5)
    grads = checkpointing_grads(model, images_for(model))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


def test_merging_and_unsupported_forwards_are_refused():
    model = make_eva("eva02_tiny_patch14_224", img_size=112)
    with pytest.raises(ValueError, match="merge_r does not apply to Eva models: ToMe merging is "
                                         "not defined with rotary position embeddings"):
        papr_timm.patch(model, make_proposal(), merge_r=2)
    assert not papr_timm.is_patched(model)
    papr_timm.patch(model, make_proposal(), z=0.5)
    images = images_for(model)
    with pytest.raises(ValueError, match="attn_mask / is_causal are not supported"):
        model.forward_features(images, attn_mask=torch.zeros(2, 1, 65, 65, dtype=torch.bool))
    dropping = make_eva("eva02_tiny_patch14_224", img_size=112, patch_drop_rate=0.5)
    papr_timm.patch(dropping, make_proposal(), z=0.5).train()
    with pytest.raises(ValueError, match="patch dropout .* in train mode is not supported"):
        dropping(images)
    dropping.papr_z = 1.0          # timm's own forward, with its patch dropout
    assert dropping(images).shape == (2, 10)
