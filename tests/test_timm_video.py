"""The VideoMAE-style example: a tubelet ViT pruned by the 5-D path of `prune`, with an R3D-18
trunk as proposal, against a hand-written pipeline built from `papr_kernels.reference`."""
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")
pytest.importorskip("torchvision")

from papr_kernels import reference  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "video_vit.py"


def load_example():
    spec = importlib.util.spec_from_file_location("video_vit_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tubelet_vit_pruned_by_r3d_matches_hand_written_pipeline():
    example = load_example()
    torch.manual_seed(0)
    vit = example.TubeletViT(embed_dim=32, depth=2, num_heads=2, num_classes=7).eval()
    assert vit.grid == (8, 14, 14)
    proposal = example.r3d_18_proposal()
    model = example.PaPrVideoViT(vit, proposal, z=0.5, proposal_size=112).eval()
    video = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(1))
    seen = []
    vit.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        out = model(video)
        # Hand-written: Conv3d tubelets, positions, R3D trunk features, trilinear scores, top k.
        tokens = F.conv3d(video, vit.patch_embed.weight, vit.patch_embed.bias, stride=(2, 16, 16))
        tokens = tokens.flatten(2).transpose(1, 2) + vit.pos_embed            # (1, 1568, 32)
        small = F.interpolate(video, size=(16, 112, 112), mode="trilinear", align_corners=False)
        f = proposal.network(small)
        assert f.shape == (1, 512, 2, 7, 7)
        scores = reference.significance(f, (8, 14, 14))                      # trilinear, 5-D path
        keep = reference.keep_count(1568, 0.5, 0)
        kept = reference.gather(tokens, reference.top_k(scores, keep), 0)
        x = vit.blocks(kept)
        want = vit.head(vit.fc_norm(x.mean(dim=1)))
    assert seen[0] == 784  # int(1568 * 0.5) tokens enter the first block
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    model.z = 1.0
    with torch.no_grad():
        assert torch.equal(model(video), vit(video))
