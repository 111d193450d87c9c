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
from conftest import run_in_threads  # noqa: E402


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


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_merging_model_traces_as_one_graph(pool):
    # 'avg': the sizes reach the weighted pooling through the per-thread slot, in the graph.
    model = tiny_vit(depth=4) if pool == "token" else \
        tiny_vit(depth=4, class_token=False, reg_tokens=2, global_pool="avg")
    papr_timm.patch(model, make_proposal(), z=0.5, merge_r=4)
    images = images_for(model, batch=2)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(images)
        # fullgraph=True raises on any graph break.
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------------------------------------
# An independent per-sample reference of a merging ViT (written from the paper, loops and manual
# attention): proportional attention, merging on the mean of the keys, sizes carried block to block.


def reference_attention(attn, h, size):
    """One sample h (t, C): timm Attention written out, log(size) added to the logits.
    Returns the projected output and the keys averaged over heads (the merge metric)."""
    t, _ = h.shape
    heads, dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(t, 3, heads, dim).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * dim ** -0.5) @ k.transpose(-1, -2) + size.log()[None, None, :]
    o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(t, heads * dim)
    o = attn.norm(o)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(h).sigmoid()
    return attn.proj(o), k.mean(0)


def reference_merging_features(model, tokens, r):
    """Per sample: the first half of the blocks as timm runs them, then in each later block
    proportional attention, `loop_merge` of r tokens on the keys, the MLP. Returns the final
    (normed) tokens and sizes of each sample."""
    num_prefix = model.num_prefix_tokens
    feats, sizes = [], []
    for sample in tokens:
        x = model.norm_pre(sample)
        size = torch.ones(len(x), dtype=x.dtype)
        for i, block in enumerate(model.blocks):
            if i < len(model.blocks) // 2:
                x = block(x[None])[0]
                continue
            o, keys = reference_attention(block.attn, block.norm1(x), size)
            x = x + block.ls1(o)
            x, size = loop_merge(x, size, keys, r, num_prefix)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        feats.append(model.norm(x))
        sizes.append(size)
    return feats, sizes


def reference_head(model, feats, sizes):
    """Logits from the reference tokens: class token(s); or, over the pooled tokens (the
    non-prefix ones unless `pool_include_prefix`), each merged token counting as the tokens it
    stands for: 'avg' their size-weighted mean, 'max' their maximum, 'avgmax' the mean of the
    two, 'map' attention pooling with log(size) added to its logits (`reference_map_pool`)."""
    if hasattr(model, "head_dist"):       # DeiT distilled, eval: mean of the two heads
        x = torch.stack([f[0] for f in feats])
        d = torch.stack([f[1] for f in feats])
        return (model.head(x) + model.head_dist(d)) / 2
    pool = model.global_pool
    p = 0 if model.pool_include_prefix else model.num_prefix_tokens
    pooled = []
    for f, s in zip(feats, sizes):
        if pool == "token":
            pooled.append(f[0])
            continue
        f, s = f[p:], s[p:]
        mean = (f * s[:, None]).sum(0) / s.sum()
        pooled.append({"avg": lambda: mean, "max": lambda: f.amax(0),
                       "avgmax": lambda: 0.5 * (f.amax(0) + mean),
                       "map": lambda: reference_map_pool(model.attn_pool, f, s)}[pool]())
    return model.head(model.fc_norm(torch.stack(pooled)))


def reference_map_pool(pool, f, s):
    """timm's AttentionPoolLatent on one sample f (t, C) written out, log(s) on its logits."""
    heads, dim = pool.num_heads, pool.head_dim
    if pool.pos_embed is not None:
        f = f + pool.pos_embed
    q = pool.q(pool.latent[0]).reshape(-1, heads, dim).transpose(0, 1)        # (heads, L, dim)
    k, v = pool.kv(f).reshape(len(f), 2, heads, dim).permute(1, 2, 0, 3)      # (heads, t, dim)
    q, k = pool.q_norm(q), pool.k_norm(k)
    logits = (q * dim ** -0.5) @ k.transpose(-1, -2) + s.log()[None, None, :]
    x = pool.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, heads * dim))   # (L, C)
    if pool.mlp is not None:
        x = x + pool.mlp(pool.norm(x))
    return x[0] if pool.pool == "token" else x.mean(0)


REFERENCE_MODELS = {
    "class_token": lambda: tiny_vit(depth=4),
    "gap": lambda: tiny_vit(depth=4, class_token=False, global_pool="avg"),
    "deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                                depth=4, embed_dim=64, num_heads=2,
                                                num_classes=10).eval(),
    "reg4_gap": lambda: tiny_vit(depth=4, class_token=False, reg_tokens=4, global_pool="avg"),
    "qk_norm": lambda: tiny_vit(depth=4, qk_norm=True),
    "max": lambda: tiny_vit(depth=4, class_token=False, global_pool="max"),
    "avgmax_cls": lambda: tiny_vit(depth=4, global_pool="avgmax"),
    "map": lambda: tiny_vit(depth=4, class_token=False, global_pool="map"),
    "map_reg2_include_prefix": lambda: tiny_vit(depth=4, class_token=False, reg_tokens=2,
                                                global_pool="map", pool_include_prefix=True),
}


@pytest.mark.parametrize("kind,z,r", [("class_token", 0.5, 9), ("gap", 0.5, 9),
                                      ("deit_distilled", 0.5, 9), ("reg4_gap", 0.5, 9),
                                      ("qk_norm", 0.5, 9), ("class_token", 0.15, 4),
                                      ("reg4_gap", 0.15, 100), ("max", 0.5, 9),
                                      ("avgmax_cls", 0.5, 9), ("map", 0.5, 9),
                                      ("map_reg2_include_prefix", 0.5, 9)])
def test_patched_merging_vit_matches_reference(kind, z, r):
    torch.manual_seed(0)
    model = REFERENCE_MODELS[kind]().double()
    net = make_proposal().double()
    images = images_for(model, batch=2).double()
    with torch.no_grad():
        tokens, num_prefix = reference_tokens(model, net, images, z)
        want, sizes = reference_merging_features(model, tokens, r)
        want_logits = reference_head(model, want, sizes)
        papr_timm.patch(model, net, z=z, merge_r=r)
        got = model.forward_features(images)
        logits = model(images)
    assert num_prefix == {"gap": 0, "deit_distilled": 2, "reg4_gap": 4, "max": 0, "map": 0,
                          "map_reg2_include_prefix": 2}.get(kind, 1)
    assert max(float(s.max()) for s in sizes) > 2    # tokens of merged tokens were merged again
    assert got.shape == (2,) + want[0].shape
    for b in range(2):
        torch.testing.assert_close(got[b], want[b], rtol=0, atol=1e-10)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Pooling weighs merged tokens by size: lossless merging of identical tokens is exact.


def duplicate_tokens_model(make):
    """A model whose patch tokens are copies of two tokens (two patterns, zero position
    embedding): merging identical tokens with proportional attention changes nothing."""
    model = make().double()
    with torch.no_grad():
        model.pos_embed.zero_()
    height, width = model.patch_embed.img_size
    ph, pw = model.patch_embed.patch_size
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randn(2, 3, ph, pw, generator=gen, dtype=torch.float64)
    cells = (height // ph) * (width // pw)
    image = torch.empty(1, 3, height, width, dtype=torch.float64)
    for n in range(cells):
        row, col = divmod(n, width // pw)
        image[0, :, row * ph:(row + 1) * ph, col * pw:(col + 1) * pw] = patterns[int(n >= cells * 3 // 4)]
    return model, image


POOLS = {
    "token": lambda: tiny_vit(depth=4),
    "avg": lambda: tiny_vit(depth=4, class_token=False, global_pool="avg"),
    "avg_reg4": lambda: tiny_vit(depth=4, class_token=False, reg_tokens=4, global_pool="avg"),
    "avg_cls_fc_norm": lambda: tiny_vit(depth=4, global_pool="avg"),
    "avgmax": lambda: tiny_vit(depth=4, class_token=False, global_pool="avgmax"),
    "map": lambda: tiny_vit(depth=4, class_token=False, global_pool="map"),
    "map_reg2_include_prefix": lambda: tiny_vit(depth=4, class_token=False, reg_tokens=2,
                                                global_pool="map", pool_include_prefix=True),
    "vit_base_patch16_gap_224": lambda: timm.create_model("vit_base_patch16_gap_224", depth=4),
    "vit_base_patch16_reg4_gap_256": lambda: timm.create_model("vit_base_patch16_reg4_gap_256",
                                                               depth=4),
}


@pytest.mark.parametrize("pool", list(POOLS))
def test_merging_identical_tokens_is_lossless_with_each_pooling(pool):
    torch.manual_seed(0)
    model, image = duplicate_tokens_model(lambda: POOLS[pool]().eval())
    counts = count_block_tokens(model)
    with torch.no_grad():
        dense = model(image)
        papr_timm.patch(model, make_proposal().double(), z=1.0, merge_r=30)
        counts.clear()
        merged = model(image)
    assert counts[-1] <= counts[0] - 2 * 30       # the second half did merge
    torch.testing.assert_close(merged, dense, rtol=0, atol=1e-12)


def test_attention_pooling_without_size_weighting_is_refused():
    model = tiny_vit(depth=2, global_pool="prr") if "prr" in inspect.signature(
        timm.models.vision_transformer.VisionTransformer).parameters["global_pool"].annotation.__args__ \
        else None
    if model is None:
        pytest.skip(f"timm {timm.__version__}: no 'prr' pooling")
    with pytest.raises(ValueError, match=r"merge_r.*global_pool='prr'"):
        papr_timm.patch(model, make_proposal(), merge_r=2)
    assert not papr_timm.is_patched(model)
    papr_timm.patch(model, make_proposal(), merge_r=0)    # pruning alone is fine


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_weighted_pooling_under_trace_and_threads(pool):
    model = tiny_vit(depth=4, class_token=False, reg_tokens=2, global_pool=pool)
    papr_timm.patch(model, make_proposal(), z=0.5, merge_r=8)
    inputs = [images_for(model, batch=b, seed=b) for b in (2, 3, 1, 2)]
    with torch.no_grad():
        expected = [model(images) for images in inputs]
        traced = torch.jit.trace(model, (inputs[0],), check_trace=False)
        for images, want in zip(inputs, expected):
            torch.testing.assert_close(traced(images), want)
        # forward_features then forward_head by hand uses the same sizes.
        torch.testing.assert_close(model.forward_head(model.forward_features(inputs[1])), expected[1])
    results = run_in_threads(torch.no_grad()(model), inputs, repeats=3)   # no_grad per thread
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Precision, argument checks


def test_merge_weights_in_float32_for_half_inputs():
    # A massive activation (3000) in tokens of size 30: x * size overflows fp16 (max 65504).
    x = torch.zeros(1, 5, 4, dtype=torch.float16)
    x[0, 1:, 0] = 3000.0
    size = torch.tensor([1.0, 30.0, 30.0, 1.0, 1.0], dtype=torch.float16).view(1, 5, 1)
    metric = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float16)[None]
    out, out_size = merge.bipartite_merge(x, size, metric, 1, 1)
    want, want_size = loop_merge(x[0].double(), size[0, :, 0].double(), metric[0].double(), 1, 1)
    assert out.dtype == torch.float16 and out_size.dtype == torch.float32
    torch.testing.assert_close(out[0].double(), want)
    torch.testing.assert_close(out_size[0, :, 0].double(), want_size)
    # bf16 holds integers exactly only up to 256: sizes are kept in float32.
    xb = torch.randn(1, 4, 2).bfloat16()
    big = torch.tensor([1.0, 200.0, 57.0, 1.0]).view(1, 4, 1)
    mb = torch.tensor([[1.0, 0.5], [0, 1], [0, 1], [1, 0]])[None].bfloat16()  # token 2 into 1
    _, sb = merge.bipartite_merge(xb, big, mb, 1, 0)
    assert sb.dtype == torch.float32 and 257.0 in sb.flatten().tolist()


def test_fp16_merging_vit_stays_finite_and_close():
    model = tiny_vit(depth=4, class_token=False, global_pool="avg")
    papr_timm.patch(model, make_proposal(), z=0.5, merge_r=8)
    images = images_for(model, batch=2)
    with torch.no_grad():
        want = model.double()(images.double())
        got = model.half()(images.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)


@pytest.mark.parametrize("value,error", [(2.5, TypeError), ("2", TypeError), (None, TypeError),
                                         (True, TypeError), (-1, ValueError)])
def test_merge_r_is_checked(value, error):
    model = tiny_vit(depth=2)
    with pytest.raises(error, match="merge_r"):
        papr_timm.patch(model, make_proposal(), merge_r=value)
    assert not papr_timm.is_patched(model)
    # Checked before the family's options: a Swin model gets the same error.
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1),
                             embed_dim=32, num_heads=(1, 1, 1, 1))
    with pytest.raises(error, match="merge_r"):
        papr_timm.patch(swin, make_proposal(), merge_r=value)


def test_merge_r_accepts_integral_numbers():
    np = pytest.importorskip("numpy")
    model = papr_timm.patch(tiny_vit(depth=2), make_proposal(), merge_r=np.int64(2))
    assert model.papr_merge_r == 2 and type(model.papr_merge_r) is int


@pytest.mark.parametrize("change,error,match", [
    (dict(metric=torch.zeros(1, 8, 3)), ValueError, "metric"),
    (dict(metric=torch.zeros(2, 9, 3)), ValueError, "metric"),
    (dict(metric=torch.zeros(9, 3)), ValueError, "metric"),
    (dict(size=torch.ones(1, 8, 1)), ValueError, "size"),
    (dict(size=torch.ones(2, 9, 1)), ValueError, "size"),
    (dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    (dict(num_prefix_tokens=9), ValueError, "num_prefix_tokens"),
    (dict(num_prefix_tokens=1.0), TypeError, "num_prefix_tokens"),
    (dict(r=2.5), TypeError, "r must"),
    (dict(r=True), TypeError, "r must"),
    (dict(r=-3), ValueError, "r must"),
    (dict(x=torch.zeros(9, 4)), TypeError, "x must"),
])
def test_bipartite_merge_checks_its_arguments(change, error, match):
    args = dict(x=torch.randn(1, 9, 4), size=None, metric=torch.randn(1, 9, 3), r=2,
                num_prefix_tokens=1)
    args.update(change)
    with pytest.raises(error, match=match):
        merge.bipartite_merge(**args)
