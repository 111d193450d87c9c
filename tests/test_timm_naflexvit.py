"""papr_kernels.timm on timm's `NaFlexVit` (NCHW images) against timm's own forward.

Random weights only (pretrained=False), 2 blocks of width 64, every parameter redrawn (timm
zero-initializes or shrinks layer scales, position embeddings, prefix tokens). The reference is
the unpatched twin of the model running timm's own `forward_features` / `forward` in train mode
(every dropout rate is 0) with its `patch_drop` replaced by `KeepTokens`: the prefix tokens and
the patch tokens at `papr_kernels.reference.prune`'s indices, returned with the indices so that
timm gathers the ROPE rows itself (`apply_keep_indices_nlc`, per block for 'mixed' ROPE).
"""
import copy
from contextlib import contextmanager

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
pytest.importorskip("timm.models.naflexvit", reason=f"timm {timm.__version__} has no NaFlexVit")
from timm.models.naflexvit import NaFlexVit, batch_patchify  # noqa: E402

import papr_kernels.timm as papr_timm  # noqa: E402
from papr_kernels import reference  # noqa: E402

from test_timm import checkpointing_grads, count_block_tokens, make_proposal  # noqa: E402

TINY = dict(depth=2, embed_dim=64, num_heads=2, num_classes=10)

CONFIGS = {
    # name, extra arguments, prefix tokens
    "gap_reg4": ("naflexvit_base_patch16_gap", {}, 4),            # avg + fc_norm, 4 registers
    "map_reg1": ("naflexvit_base_patch16_map", {}, 1),            # attention pooling
    "parfac": ("naflexvit_base_patch16_parfac_gap", {}, 4),       # factorized, aspect-preserving
    "siglip": ("naflexvit_base_patch16_siglip", {}, 0),           # no prefix token, map
    "radio_like": ("naflexvit_base_patch16_gap",                  # C-RADIO's head: class token
                   dict(class_token=True, reg_tokens=2, global_pool="token", final_norm=False,
                        pos_embed_ar_preserving=True), 3),
    "conv_pad": ("naflexvit_base_patch16_map",                    # conv embedding, padded grid
                 dict(embed_proj_type="conv", dynamic_img_pad=True), 1),
    "rope_axial": ("vit_small_patch16_rope_224", dict(use_naflex=True), 1),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(use_naflex=True), 1),
}


def randomize(model, seed=0):
    """Redraw every parameter: norm scales and layer scales around 1, biases around 0, matrices
    at unit gain, position embeddings, prefix tokens and latents N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("pos_embed") or leaf in ("cls_token", "reg_token", "latent"):
                p.copy_(noise)
            elif p.dim() == 1 and leaf in ("weight", "gamma"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def make_model(config, **overrides):
    name, kwargs, _ = CONFIGS[config]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **dict(TINY, **kwargs, **overrides))
    assert isinstance(model, NaFlexVit)
    return randomize(model).eval()


def images(size=(64, 80), batch=2, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


class KeepTokens(nn.Module):
    """In place of timm's `patch_drop` (which returns (tokens, keep_indices)): the prefix tokens
    and the patch tokens at `reference.prune`'s indices."""

    def __init__(self, features, z, order, prefix, grid):
        super().__init__()
        self.features, self.z, self.order, self.prefix, self.grid = features, z, order, prefix, grid

    def forward(self, x):
        return reference.prune(x, self.features, self.z, num_prefix_tokens=self.prefix,
                               grid=self.grid, order=self.order, return_indices=True)


@contextmanager
def keeping(twin, keep):
    """`twin` (unpatched) in train mode with `keep` as its patch dropout."""
    old, training = twin.patch_drop, twin.training
    twin.patch_drop = keep
    twin.train()
    try:
        yield
    finally:
        twin.patch_drop = old
        twin.train(training)


def reference_run(twin, net, x, z, order="score", features=True, grid=None):
    grid = grid or twin.embeds.dynamic_feat_size(tuple(x.shape[-2:]))
    keep = KeepTokens(net(x), z, order, twin.num_prefix_tokens, grid)
    with keeping(twin, keep):
        return twin.forward_features(x) if features else twin(x)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_naflexvit_matches_timm_with_kept_tokens(config):
    model = make_model(config)
    twin = copy.deepcopy(model)
    num_prefix = CONFIGS[config][2]
    assert model.num_prefix_tokens == num_prefix
    net = make_proposal()
    x = images()
    original_class = type(model)
    with torch.no_grad():
        dense_features, dense = model.forward_features(x), model(x)
        assert papr_timm.patch(model, net, z=1.0) is model
        assert isinstance(model, original_class) and papr_timm.is_patched(model)
        assert torch.equal(model.forward_features(x), dense_features)   # timm's own, bit for bit
        assert torch.equal(model(x), dense)
        counts = count_block_tokens(model)
        cases = [(0.5, "score", (64, 80)), (0.5, "spatial", (64, 80)), (0.3, "score", (96, 48))]
        if model.embeds.dynamic_img_pad:       # a size the patches do not divide: padded
            cases.append((0.5, "score", (56, 72)))
        for z, order, size in cases:
            papr_timm.patch(model, net, z=z, order=order)
            xs = images(size)
            grid = model.embeds.dynamic_feat_size(size)
            counts.clear()
            tokens = model.forward_features(xs)
            keep = reference.keep_count(num_prefix + grid[0] * grid[1], z, num_prefix)
            assert counts == [num_prefix + keep] * 2, (size, grid)
            torch.testing.assert_close(tokens, reference_run(twin, net, xs, z, order),
                                       rtol=1e-5, atol=1e-5)
            logits = model(xs)
            torch.testing.assert_close(logits, reference_run(twin, net, xs, z, order, False),
                                       rtol=1e-5, atol=1e-5)
        papr_timm.patch(model, net, z=0.5)
        assert not torch.allclose(model(x), dense, atol=1e-3)
        papr_timm.unpatch(model)
        assert type(model) is original_class and not papr_timm.is_patched(model)
        assert torch.equal(model(x), dense)


def naflex_batch(model, x):
    """NaFlex ("sequence") mode's input for images x: patches, coordinates, all valid."""
    patches, (h, w) = batch_patchify(x, model.embeds.patch_size)
    coord = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
    coord = coord.reshape(1, h * w, 2).expand(x.shape[0], -1, -1)
    valid = torch.ones(x.shape[0], h * w, dtype=torch.bool)
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def test_naflex_mode_is_refused_while_pruning_and_timms_own_at_z_1():
    model = make_model("gap_reg4")
    x = images()
    batch = naflex_batch(model, x)
    with torch.no_grad():
        dense = model(batch)
        papr_timm.patch(model, make_proposal(), z=0.5)
        with pytest.raises(ValueError, match=r"pruned NaFlexVit takes \(B, C, H, W\) images "
                                             r"\(patch_coord, patch_valid given\): NaFlex mode"):
            model(batch)
        with pytest.raises(ValueError, match=r"\(patch_coord given\)"):
            model.forward_features(batch["patches"], patch_coord=batch["patch_coord"])
        with pytest.raises(ValueError, match=r"\(attn_mask given\)"):
            model.forward_features(x, attn_mask=torch.zeros(2, 1, 24, 24))
        with pytest.raises(ValueError, match=r"\(patches of shape \(2, 20, 768\)\)"):
            model.forward_features(batch["patches"])
        model.papr_z = 1.0
        assert torch.equal(model(batch), dense)


def test_merging_is_refused_with_the_reason():
    model = make_model("gap_reg4")
    with pytest.raises(ValueError, match="merge_r does not apply to NaFlexVit models: ToMe "
                                         "merging is not implemented for NaFlexVit"):
        papr_timm.patch(model, make_proposal(), merge_r=2)
    assert not papr_timm.is_patched(model) and type(model) is NaFlexVit


class KeepThenDrop(nn.Module):
    """KeepTokens, then timm's own patch dropout among the kept tokens; the indices composed."""

    def __init__(self, keep, drop):
        super().__init__()
        self.keep, self.drop = keep, drop

    def forward(self, x):
        x, kept = self.keep(x)
        x, dropped = self.drop(x)
        return x, torch.gather(kept, 1, dropped)


@pytest.mark.parametrize("config", ["rope_mixed", "gap_reg4"])
def test_train_mode_patch_dropout_drops_among_the_kept_tokens(config):
    model = make_model(config, patch_drop_rate=0.25)
    twin = copy.deepcopy(model)
    net = make_proposal()
    x = images()
    papr_timm.patch(model, net, z=0.5).train()
    counts = count_block_tokens(model)
    torch.manual_seed(5)
    out = model.forward_features(x)
    prefix = model.num_prefix_tokens
    assert counts[0] == prefix + int(reference.keep_count(prefix + 20, 0.5, prefix) * 0.75)
    keep = KeepTokens(net(x), 0.5, "score", twin.num_prefix_tokens, (4, 5))
    with keeping(twin, KeepThenDrop(keep, twin.patch_drop)):
        torch.manual_seed(5)
        expected = twin.forward_features(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_forward_intermediates_stays_dense():
    model = make_model("rope_mixed")
    x = images()
    with torch.no_grad():
        dense_final, dense_maps = model.forward_intermediates(x, indices=2)
        papr_timm.patch(model, make_proposal(), z=0.5)
        final, maps = model.forward_intermediates(x, indices=2)
    assert torch.equal(final, dense_final) and maps[0].shape == (2, 64, 4, 5)
    assert all(torch.equal(a, b) for a, b in zip(maps, dense_maps))


def test_reset_classifier_and_gradient_checkpointing():
    model = make_model("map_reg1")
    twin = copy.deepcopy(model)
    net = make_proposal()
    x = images()
    papr_timm.patch(model, net, z=0.5)
    for m in (model, twin):
        torch.manual_seed(3)
        m.reset_classifier(5, global_pool="avg")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_run(twin, net, x, 0.5, features=False),
                                   rtol=1e-5, atol=1e-5)
    grads = checkpointing_grads(model, x)
    assert grads[0].keys() == grads[1].keys() and "blocks.1.attn.qkv.weight" in grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


@pytest.mark.parametrize("config", ["gap_reg4", "rope_mixed"])
def test_compiled_model_matches_eager(config):
    model = papr_timm.patch(make_model(config), make_proposal(), z=0.5)
    x = images()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        model.papr_z = 0.3
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
