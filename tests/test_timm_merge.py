"""papr_kernels.merge (ToMe-style bipartite soft matching) against explicit Python loops, and
the merge schedule of a patched timm ViT (`patch(..., merge_r=r)`)."""
import inspect
import math

import pytest
import torch

timm = pytest.importorskip("timm")

import papr_kernels.timm as papr_timm  # noqa: E402
from timm.layers import Attention  # noqa: E402
from papr_kernels import merge, reference  # noqa: E402
from test_timm import count_block_tokens, images_for, make_proposal, reference_tokens, tiny_vit  # noqa: E402


def loop_merge(x, size, metric, r, num_prefix):
    """One sample, written as the paper describes it, with plain Python loops.

    x (t, C), size (t,), metric (t, Cm). Returns the merged (t - r, C) tokens and sizes (t - r,).
    """
    t = len(x)
    r = min(r, (t - num_prefix) // 2)
    a_set = [i for i in range(t) if i % 2 == 0]
    b_set = [j for j in range(t) if j % 2 == 1]

    def cosine(u, v):
        dot = sum(float(p) * float(q) for p, q in zip(u, v))
        return dot / (math.sqrt(sum(float(p) ** 2 for p in u)) * math.sqrt(sum(float(q) ** 2 for q in v)))

    edges = []  # (similarity, A token, its most similar B token); protected tokens take no part
    for i in a_set:
        if i < num_prefix:
            continue
        best, partner = -math.inf, None
        for j in b_set:
            if j >= num_prefix and cosine(metric[i], metric[j]) > best:
                best, partner = cosine(metric[i], metric[j]), j
        edges.append((best, i, partner))
    edges.sort(key=lambda e: (-e[0], e[1]))
    merged, kept = edges[:r], edges[r:]

    total = {j: x[j] * size[j] for j in b_set}
    weight = {j: float(size[j]) for j in b_set}
    for _, i, j in merged:
        total[j] = total[j] + x[i] * size[i]
        weight[j] += float(size[i])

    kept_a = [i for _, i, _ in kept]
    if num_prefix > 0:
        kept_a.sort()
    order = list(range(num_prefix)) + kept_a + [j for j in b_set if j >= num_prefix]
    out_x, out_size = [], []
    for token in order:
        if token in total:
            out_x.append(total[token] / weight[token])
            out_size.append(weight[token])
        else:
            out_x.append(x[token])
            out_size.append(float(size[token]))
    return torch.stack(out_x), torch.tensor(out_size, dtype=x.dtype)


@pytest.mark.parametrize("t,num_prefix,r", [(9, 0, 3), (10, 1, 3), (11, 2, 4), (12, 4, 2),
                                            (10, 1, 100), (7, 5, 3)])
def test_bipartite_merge_matches_loops(t, num_prefix, r):
    gen = torch.Generator().manual_seed(t * 10 + num_prefix)
    batch, channels = 3, 5
    x = torch.randn(batch, t, channels, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, t, 1), generator=gen).double()
    metric = torch.randn(batch, t, 4, generator=gen, dtype=torch.float64)
    out, out_size = merge.bipartite_merge(x, size, metric, r, num_prefix)
    merges = max(min(r, (t - num_prefix) // 2), 0)
    assert out.shape == (batch, t - merges, channels) and out_size.shape == (batch, t - merges, 1)
    for b in range(batch):
        want_x, want_size = loop_merge(x[b], size[b, :, 0], metric[b], r, num_prefix)
        torch.testing.assert_close(out[b], want_x)
        torch.testing.assert_close(out_size[b, :, 0], want_size)
    # Prefix tokens are untouched and stay in front; the total size is conserved.
    torch.testing.assert_close(out[:, :num_prefix], x[:, :num_prefix])
    torch.testing.assert_close(out_size.sum(1), size.sum(1))


@pytest.mark.parametrize("attention", ["plain", "qk_norm", "gated"])
def test_proportional_attention_equals_duplicated_tokens(attention):
    """A token of size s must act in attention as s identical copies of itself (timm's own
    forward of the block on the copies is the reference), with each Attention option."""
    block = tiny_vit(embed_dim=32, depth=1, qk_norm=attention == "qk_norm").blocks[0]
    if attention == "gated":
        if "gated" not in inspect.signature(Attention).parameters:
            pytest.skip(f"timm {timm.__version__}: Attention has no output gate")
        block.attn = Attention(32, num_heads=2, qkv_bias=True, gated=True)
    block = block.double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 32, generator=gen, dtype=torch.float64)
    sizes = [1, 3, 2, 1, 4, 1, 2]
    expanded = torch.cat([x[:, i:i + 1].expand(-1, s, -1) for i, s in enumerate(sizes)], dim=1)
    first_copy = torch.tensor([0] + sizes[:-1]).cumsum(0)
    size = torch.tensor(sizes, dtype=torch.float64).view(1, -1, 1)
    with torch.no_grad():
        out, out_size = merge.proportional_block_forward(block, x, size, 0, 1)
        want = block(expanded)[:, first_copy]
    torch.testing.assert_close(out, want)
    assert torch.equal(out_size, size)


@pytest.mark.parametrize("r,expected", [(5, [99, 99, 94, 89]), (1000, [99, 99, 50, 26])])
def test_patched_vit_merges_in_second_half(r, expected):
    model = tiny_vit(depth=4)
    papr_timm.patch(model, make_proposal(), z=0.5, merge_r=r)
    counts = count_block_tokens(model)
    images = images_for(model, batch=2)
    with torch.no_grad():
        out = model(images)
    assert counts == expected  # 1 + int(197 * 0.5) tokens after pruning, r fewer per late block
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_first_half_runs_plain_blocks_on_score_ordered_pruned_tokens():
    model = tiny_vit(depth=2)
    net = make_proposal()
    papr_timm.patch(model, net, z=0.5, merge_r=4)
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out))
    images = images_for(model, batch=1)
    with torch.no_grad():
        model(images)
        x, _ = reference_tokens(model, net, images, 0.5)  # hand-written, score order
        want = model.blocks[0](x)
    assert want.shape[1] == 1 + reference.keep_count(197, 0.5, 1)
    torch.testing.assert_close(seen[0], want)


def test_merge_needs_timm_blocks():
    model = tiny_vit(depth=2, block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(TypeError, match="token merging supports"):
        papr_timm.patch(model, make_proposal(), merge_r=2)
    assert not papr_timm.is_patched(model)


def test_merging_model_traces_as_one_graph():
    model = tiny_vit(depth=4)
    papr_timm.patch(model, make_proposal(), z=0.5, merge_r=4)
    images = images_for(model, batch=2)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(images)
        # fullgraph=True raises on any graph break.
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
