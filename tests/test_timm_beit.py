"""papr_kernels.timm on timm's `Beit` (BEiT, BEiT v2) against a hand-written pipeline (saving,
deepcopy, torch.compile(fullgraph=True), threads, tracing: tests/test_timm_usage.py).

Random weights only (pretrained=False), 2 blocks. The reference embeds the images with timm's
public pieces, keeps the tokens at `papr_kernels.reference`'s indices, builds each sample's bias
from the (heads, n, n) table lookup by plain advanced indexing at [0] + (1 + kept), and runs the
attention by hand (logits + bias, softmax) with the block's layers; not through the patched
forward or `Attention.forward`. timm zero-initializes the bias tables and scales the branches by
small layer scales, so `make_beit` redraws them: a wrong bias gather would pass otherwise.
"""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

timm = pytest.importorskip("timm")
from timm.models.beit import Beit  # noqa: E402

import papr_kernels.timm as papr_timm  # noqa: E402
from papr_kernels import reference  # noqa: E402

from test_timm import (assert_bf16_and_autocast_match,  # noqa: E402
                       assert_spatial_order_in_inference_mode, checkpointing_grads,
                       count_block_tokens, make_proposal)

TINY = dict(img_size=96, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def make_beit(name=None, seed=0, **kwargs):
    """A tiny Beit (timm's `name` with TINY sizes, or a `Beit(**kwargs)`) whose bias tables,
    layer scales, q / v biases and block weights are redrawn (unit gain, scales around 1)."""
    torch.manual_seed(seed)
    args = dict(TINY, **kwargs)
    model = (timm.create_model(name, pretrained=False, **args) if name else Beit(**args)).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("relative_position_bias_table"):
                nn.init.normal_(param, std=1.0)
            elif key.endswith(("gamma_1", "gamma_2")):
                nn.init.uniform_(param, 0.5, 1.5)
            elif key.endswith(("q_bias", "v_bias")):
                nn.init.normal_(param, std=0.1)
            elif key.startswith("blocks") and param.dim() == 2:
                nn.init.normal_(param, std=param.shape[1] ** -0.5)
    return model


def images_for(model, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen)


def full_bias(module):
    """The (heads, n, n) bias of a module with a table: the table at timm's index."""
    index = module.relative_position_index
    return module.relative_position_bias_table[index].permute(2, 0, 1)


def reference_attention(attn, x, bias):
    """timm's Beit attention by hand: qkv (k without bias), scaled logits + the (B, heads, L, L)
    bias, softmax."""
    batch, length, _ = x.shape
    qkv_bias = None if attn.q_bias is None else \
        torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(batch, length, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.scale + bias
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, -1)
    return attn.proj(out)


def reference_block(block, x, bias):
    scale1 = 1 if block.gamma_1 is None else block.gamma_1
    scale2 = 1 if block.gamma_2 is None else block.gamma_2
    x = x + scale1 * reference_attention(block.attn, block.norm1(x), bias)
    return x + scale2 * block.mlp(block.norm2(x))


def reference_features(model, net, images, z, order="score", broken=None):
    """`forward_features` by hand. `broken` gathers the bias wrongly, to show that the test sees
    it: 'same' (sample 0's tokens for every sample), 'no_offset' (kept patch i read as token i)."""
    batch = images.shape[0]
    grid = tuple(model.patch_embed.grid_size)
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)     # (B, N, C)
    x = torch.cat((model.cls_token.expand(batch, -1, -1), model.patch_embed.norm(x)), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    n = x.shape[1]
    tokens = torch.arange(n).expand(batch, n)           # the token each row of x is
    if z < 1:
        scores = reference.significance(net(images), grid, True)
        kept = reference.top_k(scores, reference.keep_count(n, z, 1), order)
        x = reference.gather(x, kept, 1)
        tokens = torch.cat((torch.zeros(batch, 1, dtype=torch.long),
                            kept if broken == "no_offset" else kept + 1), dim=1)
        if broken == "same":
            tokens = tokens[:1].expand(batch, -1)

    def per_sample(bias):                                # (heads, n, n) -> (B, heads, L, L)
        return torch.stack([bias[:, t][:, :, t] for t in tokens])

    shared = None if model.rel_pos_bias is None else per_sample(full_bias(model.rel_pos_bias))
    for block in model.blocks:
        bias = torch.zeros(())
        if block.attn.relative_position_bias_table is not None:
            bias = bias + per_sample(full_bias(block.attn))
        if shared is not None:
            bias = bias + shared
        x = reference_block(block, x, bias)
    return model.norm(x)


def reference_kept(model, net, images, z):
    scores = reference.significance(net(images), tuple(model.patch_embed.grid_size), True)
    return reference.top_k(scores, reference.keep_count(model.patch_embed.num_patches + 1, z, 1))


CONFIGS = {
    # what the bias is; the timm names' own settings (no abs pos, per-block bias, layer scale)
    "beit_base": ("beit_base_patch16_224", {}),
    "beitv2_base": ("beitv2_base_patch16_224", {}),
    "beit_large": ("beit_large_patch16_224", {}),
    "shared_bias_no_abs_pos": (None, dict(use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                                          init_values=0.1)),
    "shared_and_block_bias_abs_pos": (None, dict(use_shared_rel_pos_bias=True,
                                                 use_rel_pos_bias=True)),
    "abs_pos_only_token_pool": (None, dict(global_pool="token")),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_beit_matches_hand_written_pipeline(config):
    name, kwargs = CONFIGS[config]
    model = make_beit(name, **kwargs)
    has_bias = model.rel_pos_bias is not None or \
        model.blocks[0].attn.relative_position_bias_table is not None
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
        for z in (0.5, 0.3, 0.1):
            model.papr_z = z
            kept = reference_kept(model, net, images, z)
            assert set(kept[0].tolist()) != set(kept[1].tolist())   # each sample its own
            counts.clear()
            tokens = model.forward_features(images)
            assert counts == [1 + kept.shape[1]] * 2
            expected = reference_features(model, net, images, z)
            torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(images), model.forward_head(expected),
                                       rtol=1e-5, atol=1e-5)
            # The gather matters. Without the class offset, two kept patches read the bias of
            # their left neighbours: the same relative position unless one is in column 0 (or
            # is patch 0), as z = 0.5 keeps here and z = 0.1 (3 patches of one row) does not.
            for broken in ("same", "no_offset") if has_bias and z == 0.5 else ():
                wrong = reference_features(model, net, images, z, broken=broken)
                assert not torch.allclose(tokens, wrong, atol=1e-2), broken

        model.papr_z = 1.0   # keeps every token: bit for bit the unpatched model
        assert torch.equal(model(images), unpatched)
        papr_timm.unpatch(model)
        assert type(model) is original_class and not papr_timm.is_patched(model)
        assert type(model.blocks[0].attn).__name__ == "Attention"
        assert torch.equal(model(images), unpatched)


def test_spatial_order_and_inference_mode():
    model = make_beit(use_shared_rel_pos_bias=True, use_rel_pos_bias=True, init_values=0.1)
    net = make_proposal()
    assert_spatial_order_in_inference_mode(
        model, net, lambda images, z, order: reference_features(model, net, images, z,
                                                                order=order))


def test_unfused_attention():
    """timm's other attention path (fused_attn False: logits + own bias + shared bias)."""
    model = make_beit(use_shared_rel_pos_bias=True, use_rel_pos_bias=True, init_values=0.1)
    for block in model.blocks:
        block.attn.fused_attn = False
    net = make_proposal()
    images = images_for(model)
    papr_timm.patch(model, net, z=0.3)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images),
                                   reference_features(model, net, images, 0.3),
                                   rtol=1e-5, atol=1e-5)


def test_bf16_model_and_autocast():
    model = make_beit("beit_base_patch16_224", use_shared_rel_pos_bias=True)
    assert_bf16_and_autocast_match(model, make_proposal(), images_for(model),
                                   lambda m, net, x: reference_features(m, net, x, 0.5))


def test_gradient_checkpointing_gives_the_same_gradients():
    """The blocks are recomputed in the backward pass, outside the forward: each recomputation
    must see its sample's bias again."""
    model = make_beit(use_shared_rel_pos_bias=True, use_rel_pos_bias=True, init_values=0.1)
    papr_timm.patch(model, make_proposal(), z=0.5).train()
    grads = checkpointing_grads(model, images_for(model))
    assert grads[0].keys() == grads[1].keys()
    assert grads[0]["blocks.1.attn.relative_position_bias_table"].abs().sum() > 0
    assert grads[0]["rel_pos_bias.relative_position_bias_table"].abs().sum() > 0
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


def test_merging_other_grids_and_other_blocks_are_refused():
    model = make_beit("beit_base_patch16_224")
    with pytest.raises(ValueError, match="merge_r does not apply to Beit models: ToMe merging is "
                                         "not defined with a relative position bias"):
        papr_timm.patch(model, make_proposal(), merge_r=2)
    model.blocks[1].attn.window_size = (5, 5)      # what set_window_size on one block leaves
    with pytest.raises(ValueError, match=r"model.blocks\[1\].attn has a relative position bias "
                                         r"over a \(5, 5\) window; .* \(6, 6\) patch grid"):
        papr_timm.patch(model, make_proposal())
    assert not papr_timm.is_patched(model)
    model.blocks[1] = nn.Identity()
    with pytest.raises(TypeError, match=r"model.blocks\[1\] \(Identity, attention NoneType\) "
                                        r"is not timm's beit Block with its Attention"):
        papr_timm.patch(model, make_proposal())
    assert not papr_timm.is_patched(model)
