"""papr_kernels.timm on timm's `Hiera` against timm's own masked forward (saving, deepcopy,
torch.compile, threads, tracing: tests/test_timm_usage.py).

Random weights only (pretrained=False), one block per stage. The reference is timm's
`forward_features(images, mask=...)` (Hiera's MAE path: it drops the masked units' tokens with a
boolean mask) given the mask of the top units by `papr_kernels.reference`, with its patch
embedding left unmasked (PaPr embeds the whole image; timm's masked path zeroes the pruned
units' pixels first: `test_timm_masked_embedding_differs` shows the test sees that). timm
initializes the position embeddings at zero and the head small, so `make_hiera` redraws every
parameter: a wrong unit would pass otherwise.
"""
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.hiera import Hiera  # noqa: E402

import papr_kernels.timm as papr_timm  # noqa: E402
from papr_kernels import reference  # noqa: E402

from test_timm import checkpointing_grads  # noqa: E402

TINY = dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), num_classes=10)


def make_hiera(name="hiera_tiny_224", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **dict(TINY, **kwargs)).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("weight") and param.dim() == 1:          # norms: gains around 1
                nn.init.normal_(param, 1.0, 0.2)
            elif param.dim() == 1:
                nn.init.normal_(param, std=0.1)
            else:
                nn.init.normal_(param, std=param[0].numel() ** -0.5)
    return model


class StrideProposal(nn.Module):
    """(B, 3, H, W) -> (B, 8, H / stride, W / stride): one conv."""

    def __init__(self, stride=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, stride, stride=stride)

    def forward(self, x):
        return self.conv(x)


def images_for(size=224, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_mask(model, net, images, z):
    """(B, units) bool: the top int(units * z) mask units (at least one) in SPEC's order."""
    grid = tuple(model.mask_spatial_shape)
    units = grid[0] * grid[1]
    k = min(max(int(units * z), 1), units)
    kept = reference.rank(reference.significance(net(images), grid))[:, :k]
    mask = torch.zeros(images.shape[0], units, dtype=torch.bool)
    mask[torch.arange(images.shape[0])[:, None], kept] = True
    return mask


def reference_features(model, net, images, z, masked_embedding=False, **kwargs):
    """timm's own masked forward_features (its unpatched class), the embedding unmasked."""
    mask = reference_mask(model, net, images, z)
    forward_features = Hiera.forward_features.__get__(model)
    if masked_embedding:
        return forward_features(images, mask=mask, **kwargs)
    embed = model.patch_embed.forward
    model.patch_embed.forward = lambda x, mask=None: embed(x)
    try:
        return forward_features(images, mask=mask, **kwargs)
    finally:
        del model.patch_embed.forward


CONFIGS = {
    # the proposal map at the unit grid (7 x 7), resized to it (14 x 14 -> 7 x 7), abs-win
    # position embedding at 256 px (8 x 8 units)
    "tiny_224": ("hiera_tiny_224", {}, 32, 224),
    "tiny_224_resized": ("hiera_tiny_224", {}, 16, 224),
    "small_abswin_256": ("hiera_small_abswin_256", {}, 32, 256),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_hiera_matches_timms_masked_forward(config):
    name, kwargs, stride, size = CONFIGS[config]
    model, net, images = make_hiera(name, **kwargs), StrideProposal(stride), images_for(size)
    with torch.no_grad():
        unpatched = model(images)
        assert papr_timm.patch(model, net, z=0.5) is model
        assert isinstance(model, Hiera) and papr_timm.is_patched(model)
        for z in (0.5, 0.3, 0.01):
            model.papr_z = z
            mask = reference_mask(model, net, images, z)
            assert not torch.equal(mask[0], mask[1])          # each sample its own units
            expected = reference_features(model, net, images, z)
            tokens = model.forward_features(images)
            assert tokens.shape == expected.shape
            torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(images), model.forward_head(expected),
                                       rtol=1e-5, atol=1e-5)
            same = reference_mask(model, net, images[:1], z).expand_as(mask)
            if not torch.equal(same, mask):                   # one sample's units for both
                wrong = Hiera.forward_features(model, images, mask=same)
                assert not torch.allclose(tokens, wrong, atol=1e-2)
        model.papr_z = 1.0                                    # timm's own forward, bit for bit
        assert torch.equal(model(images), unpatched)
        papr_timm.unpatch(model)
        assert type(model) is Hiera and not papr_timm.is_patched(model)
        assert torch.equal(model(images), unpatched)


def test_timm_masked_embedding_differs():
    """timm's masked path zeroes the pruned units' pixels before the overlapping 7 x 7 patch
    convolution; PaPr embeds the whole image: the kept border tokens differ."""
    model, net, images = make_hiera(), StrideProposal(), images_for()
    papr_timm.patch(model, net, z=0.5)
    with torch.no_grad():
        tokens = model.forward_features(images)
        zeroed = reference_features(model, net, images, 0.5, masked_embedding=True)
    assert not torch.allclose(tokens, zeroed, atol=1e-3)


def test_intermediates_are_timms_rerolled_maps():
    model, net, images = make_hiera(), StrideProposal(), images_for()
    papr_timm.patch(model, net, z=0.4)
    with torch.no_grad():
        tokens, maps = model.forward_features(images, return_intermediates=True)
        expected, expected_maps = reference_features(model, net, images, 0.4,
                                                     return_intermediates=True)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    assert len(maps) == len(expected_maps) == 4
    for got, want in zip(maps, expected_maps):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_model_and_autocast():
    """As test_timm's `assert_bf16_and_autocast_match`; Hiera's features end with a linear (no
    norm), so under autocast they are bf16 too."""
    model, net, images = make_hiera(), StrideProposal(), images_for()
    papr_timm.patch(model, net, z=0.5)
    with torch.no_grad():
        fp32 = model.forward_features(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model.forward_features(images)
            expected_autocast = reference_features(model, net, images, 0.5)
        model.to(torch.bfloat16)
        out = model.forward_features(images.bfloat16())
        expected = reference_features(model, net.bfloat16(), images.bfloat16(), 0.5)
    assert out.dtype == autocast.dtype == torch.bfloat16
    assert not torch.allclose(autocast.float(), fp32, atol=1e-2)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.1)
    torch.testing.assert_close(autocast, expected_autocast, rtol=0.05, atol=0.1)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_hiera()
    papr_timm.patch(model, StrideProposal(), z=0.5).train()
    grads = checkpointing_grads(model, images_for())
    assert grads[0].keys() == grads[1].keys()
    assert grads[0]["blocks.3.attn.qkv.weight"].abs().sum() > 0
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


def test_what_a_patched_hiera_refuses():
    model, net, images = make_hiera(), StrideProposal(), images_for()
    with pytest.raises(ValueError, match="order does not apply to Hiera models: Hiera keeps its "
                                         "mask units in spatial order"):
        papr_timm.patch(model, net, order="spatial")
    with pytest.raises(ValueError, match="merge_r does not apply to Hiera models"):
        papr_timm.patch(model, net, merge_r=2)
    assert not papr_timm.is_patched(model)
    papr_timm.patch(model, net, z=0.5)
    with pytest.raises(ValueError, match="mask: a PaPr-patched Hiera makes its own"):
        model(images, mask=reference_mask(model, net, images, 0.5))
    model.patch_drop_rate = 0.2
    model.train()
    with pytest.raises(ValueError, match=r"patch_drop_rate > 0"):
        model(images)
    model.papr_z = 1.0           # timm's own: its mask argument and patch dropout work
    assert model(images).shape[1] < 56 * 56
    model.eval()
    with torch.no_grad():
        mask = reference_mask(model, net, images, 0.5)
        torch.testing.assert_close(model(images, mask=mask),
                                   Hiera.forward_features(model, images, mask=mask))
    video = Hiera(img_size=(4, 64, 64), in_chans=3, embed_dim=16, num_heads=1, stages=(1, 1),
                  q_pool=1, q_stride=(1, 2, 2), mask_unit_size=(1, 4, 4),
                  mask_unit_attn=(True, False), patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4),
                  patch_padding=(1, 3, 3), sep_pos_embed=True)
    with pytest.raises(ValueError, match="Hiera with a 3-D mask unit grid"):
        papr_timm.patch(video, net)
