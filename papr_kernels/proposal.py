"""Proposal networks: the lightweight ConvNet whose last feature map ranks the patches.

    proposal = papr_kernels.proposal.create("mobileone_s0")   # any timm ConvNet, stride 32
    f = proposal(images)                                      # (B, K, h, w), no grad

`create` builds the timm model with `features_only=True, out_indices=(-1,)` (its last stage),
reparameterizes it where timm can (MobileOne's branches fold into single convolutions), puts it
in eval mode, freezes it and runs it under `torch.no_grad`. A user `nn.Module` that returns
(B, K, h, w) (or a list/tuple whose last entry is that) is wrapped the same way.
Nothing is downloaded unless `pretrained=True` is passed through to timm.
"""
from typing import Union

import torch
from torch import nn

__all__ = ["Proposal", "create"]


class Proposal(nn.Module):
    """A frozen feature extractor: eval mode forever, no gradients, returns one (B, K, h, w) map."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.train(False)
        self.network.requires_grad_(False)

    def train(self, mode: bool = True) -> "Proposal":
        # Stays in eval mode whatever the enclosing model does (BatchNorm statistics are frozen).
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.network(x)
        if isinstance(f, (list, tuple)):
            f = f[-1]
        if not isinstance(f, torch.Tensor) or f.dim() not in (4, 5):
            got = type(f).__name__ if not isinstance(f, torch.Tensor) else f"shape {tuple(f.shape)}"
            raise ValueError(f"proposal network must return (B, K, h, w) or (B, K, t, h, w) "
                             f"features, got {got}")
        return f


def create(name: Union[str, nn.Module] = "mobileone_s0", pretrained: bool = False,
           **timm_kwargs) -> Proposal:
    """A frozen proposal network: a timm ConvNet by name, or a user module wrapped as is.

    Args:
        name: a timm model name (a ConvNet with `features_only` support), or an `nn.Module`
            returning (B, K, h, w) features.
        pretrained: passed to `timm.create_model` (False: random weights, no download).
        **timm_kwargs: further `timm.create_model` arguments (e.g. `in_chans`).
    """
    if isinstance(name, Proposal):
        return name
    if isinstance(name, nn.Module):
        if timm_kwargs or pretrained:
            raise ValueError("pretrained and timm_kwargs apply to a timm model name, not to a module")
        return Proposal(name)
    if not isinstance(name, str):
        raise TypeError(f"name must be a timm model name or an nn.Module, got {type(name).__name__}")
    import timm
    from timm.utils.model import reparameterize_model

    kwargs = {"features_only": True, "out_indices": (-1,)}
    kwargs.update(timm_kwargs)
    network = timm.create_model(name, pretrained=pretrained, **kwargs)
    network.eval()
    network = reparameterize_model(network)  # a no-op for models without reparameterizable blocks
    return Proposal(network)
