"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Written from the paper's description, for composing with PaPr as the PaPr paper does: prune
once before the blocks (score order kept), then merge `r` tokens in each block of the second half.

In a block, between attention and the MLP:
1. Bipartite split by position: set A = tokens 0, 2, 4, ..., set B = tokens 1, 3, 5, ...
2. Similarity: cosine similarity of the tokens' attention keys (averaged over heads).
3. Each A token draws one edge to its most similar B token; the r edges with the highest
   similarity are merged (the A token is averaged into its B token, weighted by token size).
   Prefix tokens (class, distillation, register) are protected: they neither merge nor receive.
4. Sizes add up; the next blocks use proportional attention: log(size) of each key is added to
   the attention logits, so a merged token weighs as much as the tokens it stands for.

Output order: prefix tokens first in their original order (timm's pooling reads them there),
then the unmerged A tokens (ascending position when the model has prefix tokens, as ToMe does
with a class token; in edge order otherwise), then the B tokens. With one class token this is
ToMe's order exactly.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import spec

__all__ = ["bipartite_merge", "proportional_block_forward", "check_block"]


def bipartite_merge(x: torch.Tensor, size: Optional[torch.Tensor], metric: torch.Tensor, r: int,
                    num_prefix_tokens: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge r tokens of x (B, t, C) by bipartite soft matching on `metric` (B, t, Cm).

    `size` (B, t, 1) is how many original tokens each token stands for (None: all ones).
    Returns the merged tokens (B, t - r, C), in x's dtype, and their sizes (B, t - r, 1), in
    float32 (float64 for a float64 x): the size-weighted averages are formed in that dtype, so
    that x * size neither overflows fp16 nor rounds in bf16. `r` is capped at
    (t - num_prefix_tokens) // 2, the number of unprotected A tokens that have a B partner.
    """
    batch, t, wdtype = _check_merge_args(x, size, metric, r, num_prefix_tokens)
    if size is None:
        size = torch.ones(batch, t, 1, dtype=wdtype, device=x.device)
    else:
        size = size.to(wdtype)
    prefix = num_prefix_tokens
    r = min(r, (t - prefix) // 2)
    if r <= 0:
        return x, size

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
        # A token i is original token 2i, B token j is original token 2j + 1.
        scores[:, : (prefix + 1) // 2, :] = float("-inf")  # prefix tokens in A do not merge
        scores[:, :, : prefix // 2] = float("-inf")        # nor does anything merge into them
        best, best_b = scores.max(dim=-1)                   # each A token's edge
        edges = torch.argsort(best, dim=-1, descending=True, stable=True)
        unmerged = edges[:, r:]                             # A tokens kept as they are
        merged = edges[:, :r]                               # A tokens merged into B
        into = best_b.gather(1, merged)                     # their B partners
        if prefix > 0:
            unmerged = unmerged.sort(dim=-1).values

    weighted = x.to(wdtype) * size
    def combine(values: torch.Tensor) -> torch.Tensor:
        a, b = values[:, ::2], values[:, 1::2]
        width = values.shape[-1]
        keep_a = a.gather(1, unmerged[..., None].expand(-1, -1, width))
        src = a.gather(1, merged[..., None].expand(-1, -1, width))
        b = b.scatter_reduce(1, into[..., None].expand(-1, -1, width), src, reduce="sum")
        return keep_a, b

    a_x, b_x = combine(weighted)
    a_s, b_s = combine(size)
    # Prefix tokens: the first ceil(P/2) of A (ascending, unmerged) and the first floor(P/2) of B.
    pa, pb = (prefix + 1) // 2, prefix // 2
    if prefix > 0:
        # Interleave them back into original order: prefix token p is A[p//2] or B[p//2].
        pre_x = torch.stack([a_x[:, p // 2] if p % 2 == 0 else b_x[:, p // 2] for p in range(prefix)], 1)
        pre_s = torch.stack([a_s[:, p // 2] if p % 2 == 0 else b_s[:, p // 2] for p in range(prefix)], 1)
        out_x = torch.cat([pre_x, a_x[:, pa:], b_x[:, pb:]], dim=1)
        out_s = torch.cat([pre_s, a_s[:, pa:], b_s[:, pb:]], dim=1)
    else:
        out_x = torch.cat([a_x, b_x], dim=1)
        out_s = torch.cat([a_s, b_s], dim=1)
    return (out_x / out_s).to(x.dtype), out_s


def _check_merge_args(x, size, metric, r, num_prefix_tokens) -> Tuple[int, int, torch.dtype]:
    """`bipartite_merge`'s arguments checked (TypeError/ValueError naming the argument) before
    any computation; returns the batch size, the token count and the dtype of the weighting."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise TypeError(f"x must be a floating (B, t, C) tensor, got "
                        f"{_describe(x)}")
    batch, t, _ = x.shape
    if not isinstance(metric, torch.Tensor) or metric.dim() != 3 or \
            tuple(metric.shape[:2]) != (batch, t):
        raise ValueError(f"metric must be a (B, t, Cm) = ({batch}, {t}, Cm) tensor (x's batch and "
                         f"token count), got {_describe(metric)}")
    if size is not None and (not isinstance(size, torch.Tensor) or
                             tuple(size.shape) != (batch, t, 1)):
        raise ValueError(f"size must be None or a ({batch}, {t}, 1) tensor (x's batch and token "
                         f"count), got {_describe(size)}")
    spec.check_int("r", r)
    num_prefix_tokens = spec.check_int("num_prefix_tokens", num_prefix_tokens)
    if not num_prefix_tokens < t:
        raise ValueError(f"num_prefix_tokens must be in [0, t) = [0, {t}) (x has {t} tokens), "
                         f"got {num_prefix_tokens}")
    return batch, t, size_dtype(x.dtype)


def size_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of token sizes and size-weighted sums for tokens of `dtype`: float32 (float64
    for float64), so that x * size neither overflows fp16 nor rounds sizes above 256 in bf16."""
    return torch.promote_types(dtype, torch.float32)


def weighted_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """sum(x * size) / sum(size) over the tokens (dim 1) of x (B, t, C) with sizes (B, t, 1),
    formed in `size_dtype`, returned in x's dtype: the mean of the tokens merged ones stand for."""
    wdtype = size_dtype(x.dtype)
    size = size.to(wdtype)
    return ((x.to(wdtype) * size).sum(dim=1) / size.sum(dim=1)).to(x.dtype)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {spec.shape_str(value)}"
    return type(value).__name__


def check_block(block: nn.Module) -> None:
    """Raise if `block` is not a timm ViT `Block` with a standard `Attention` (what merging needs)."""
    from timm.layers import Attention

    needed = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    if not all(hasattr(block, name) for name in needed) or not isinstance(block.attn, Attention):
        raise TypeError(f"token merging supports timm ViT Block with Attention, got "
                        f"{type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}")


def proportional_block_forward(block: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor],
                               r: int, num_prefix_tokens: int):
    """A timm ViT Block with proportional attention (log(size) added to the logits), then r merges
    between attention and the MLP. Returns (x, size)."""
    attn = block.attn
    h = block.norm1(x)
    batch, n, _ = h.shape
    gate = getattr(attn, "gate", None)     # an output gate: newer timm only (1.0.20 has none)
    gate = gate(h).sigmoid() if gate is not None else None
    qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.norm(o.transpose(1, 2).reshape(batch, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        o = o * gate
    o = attn.proj_drop(attn.proj(o))
    x = x + block.drop_path1(block.ls1(o))
    if r > 0:
        x, size = bipartite_merge(x, size, k.mean(dim=1), r, num_prefix_tokens)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size
