"""PaPr for video: a VideoMAE-style tubelet ViT pruned by a 3-D ConvNet proposal.

The ViT embeds a (B, 3, 16, 224, 224) clip with a Conv3d of kernel and stride 2x16x16: 8x14x14 =
1568 tokens, no class token, mean pooling. The proposal network (torchvision's `r3d_18` trunk
without its pooling and head) gives (B, 512, t, h, w) features; `papr_kernels.prune` takes the
5-D path (trilinear resize to the (8, 14, 14) token grid) and keeps the top int(1568 * z) tokens.

    python examples/video_vit.py            # random weights, prints tokens kept and clips/s
"""
import argparse
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import papr_kernels
from papr_kernels import proposal as papr_proposal


class TubeletViT(nn.Module):
    """A tubelet ViT (VideoMAE layout): Conv3d 2x16x16 embedding, timm Blocks, mean pooling."""

    def __init__(self, num_frames: int = 16, img_size: int = 224, tubelet: Sequence[int] = (2, 16, 16),
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, num_classes: int = 400):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.grid = (num_frames // tubelet[0], img_size // tubelet[1], img_size // tubelet[2])
        self.patch_embed = nn.Conv3d(3, embed_dim, kernel_size=tuple(tubelet), stride=tuple(tubelet))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.grid[0] * self.grid[1] * self.grid[2],
                                                         embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, qkv_bias=True) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, t*h*w, C) tokens, row-major over (t, h, w), with positions."""
        return self.patch_embed(video).flatten(2).transpose(1, 2) + self.pos_embed

    def head_of(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.blocks(tokens).mean(dim=1)))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head_of(self.embed(video))


def r3d_18_proposal(pretrained_weights=None) -> papr_proposal.Proposal:
    """torchvision's R3D-18 without average pooling and classifier: (B, 512, T/8, H/16, W/16)."""
    from torchvision.models.video import r3d_18

    net = r3d_18(weights=pretrained_weights)
    trunk = nn.Sequential(net.stem, net.layer1, net.layer2, net.layer3, net.layer4)
    return papr_proposal.create(trunk)


class PaPrVideoViT(nn.Module):
    """A tubelet ViT that keeps only the top-z tokens ranked by a 3-D proposal network.

    `proposal_size` optionally resizes the clip (spatially) before the proposal to save its
    compute; the proposal's features are resized to the token grid anyway.
    """

    def __init__(self, vit: TubeletViT, proposal: nn.Module, z: float = 0.5,
                 proposal_size: Optional[int] = None):
        super().__init__()
        self.vit = vit
        self.proposal = papr_proposal.create(proposal)
        self.z = z
        self.proposal_size = proposal_size

    def proposal_input(self, video: torch.Tensor) -> torch.Tensor:
        if self.proposal_size is None:
            return video
        return F.interpolate(video, size=(video.shape[2], self.proposal_size, self.proposal_size),
                             mode="trilinear", align_corners=False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.embed(video)
        if self.z < 1:
            f = self.proposal(self.proposal_input(video))                  # (B, K, t, h, w)
            tokens = papr_kernels.prune(tokens, f, self.z, num_prefix_tokens=0, grid=self.vit.grid)
        return self.vit.head_of(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--embed-dim", type=int, default=384)
    parser.add_argument("--proposal-size", type=int, default=112)
    args = parser.parse_args()
    torch.manual_seed(0)
    vit = TubeletViT(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.embed_dim // 64).eval()
    video = torch.randn(args.batch, 3, 16, 224, 224)
    proposal = r3d_18_proposal()
    with torch.no_grad():
        for z in (1.0, 0.7, 0.5, 0.3):
            model = PaPrVideoViT(vit, proposal, z, args.proposal_size).eval()
            model(video)  # warm-up
            start = time.perf_counter()
            model(video)
            seconds = time.perf_counter() - start
            kept = 1568 if z == 1 else papr_kernels.keep_count(1568, z, 0)
            print(f"z={z:<4} tokens {kept:>4}/1568  {args.batch / seconds:7.2f} clips/s")


if __name__ == "__main__":
    main()
