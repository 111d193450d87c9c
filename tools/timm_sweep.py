"""Sweep every timm model name through `papr_kernels.timm.patch` (a tool, not part of `make test`).

    .venv/bin/python tools/timm_sweep.py [--filter SUBSTRING] [--limit N] [-v]

1. Every name of `timm.list_models()` is built on the meta device (no weights, no memory) to learn
   its class and a config signature: the model class, the set of module classes in it, and the
   attributes that decide the patched path (prefix tokens, pooling, position embedding, ROPE,
   bias modules, window sizes, ...). `patch` is tried on that meta model: a refusal must be a
   TypeError / ValueError raised by papr_kernels (anything else is a FAIL).
2. For one representative per accepted signature group (the smallest model of the group), a small
   real model is built with random weights (depth overridden: `depth=2`, or `depths=(1, 1, 2, 1)`
   for Swin / ConvNeXt; one block per stage for Hiera; MetaFormer at full size (timm fixes its
   depths); `depth_token_only=1` for CaiT;
   Sapiens2's per-block `num_kv_heads` cut to one full and one grouped-query block; a grid of
   more than MAX_TOKENS tokens halved by `img_size`), every parameter redrawn (timm zero-inits
   layer scales, post-norms, heads), at the model's own image size, batch 2, and checked:
   - z = 1: the patched model's logits equal the unpatched model's (bit for bit, else FAIL);
   - z = 0.5 order "score", z = 0.37 order "spatial": the logits match a reference
     within 1e-4 relative (max |diff| / max |ref|), and differ from z = 1's;
     ViT / Eva / NaFlexVit reference: timm's own forward with its `patch_drop` replaced by a
     module keeping the prefix tokens and the tokens at `papr_kernels.reference.prune`'s indices
     (for Eva and NaFlexVit it returns them too, and timm gathers the ROPE rows itself; NaFlexVit
     runs its patch dropout in train mode only, so its reference runs in train mode); Beit /
     RelPos / CaiT / Swin / ConvNeXt / MetaFormer: the hand-written pipelines of tests/
     (`reference_features`, `swin_by_hand`, `convnext_by_hand`, `metaformer_by_hand`); Hiera:
     timm's own masked forward (test_timm_hiera);
   - ViTs: merge_r=4 at z = 0.5: refused clearly, or test_timm_merge's per-sample reference
     where its head applies ('token' / 'avg' / 'max' / 'avgmax' / 'map' pooling, DeiT
     distilled), else finite and deterministic only ("weak");
   - dynamic_img_size models and NaFlexVit: z = 0.5 also at a non-square size (one token row and
     two token columns less), against the same reference.
3. Prints a markdown table (family, groups, models, pass / refused-clearly / FAIL) and the
   failures, one line each (group representative, what failed, the message).
"""
import argparse
import collections
import contextlib
import os
import sys
import time
import traceback

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import timm  # noqa: E402

import papr_kernels  # noqa: E402
import papr_kernels.timm as ptimm  # noqa: E402
from papr_kernels import reference  # noqa: E402
from papr_kernels.timm._core import family_of  # noqa: E402

TOL = 1e-4
Z_VALUES = ((0.5, "score"), (0.37, "spatial"))
# Module-valued attributes whose class (or absence) decides a patched path.
MODULE_ATTRS = ("patch_embed", "patch_drop", "norm_pre", "fc_norm", "attn_pool", "rope",
                "rel_pos_bias", "shared_rel_pos", "blocks_token_only", "head_dist", "norm",
                "head_drop", "pos_drop")
TENSOR_ATTRS = ("cls_token", "reg_token", "dist_token", "pos_embed")
VALUE_ATTRS = ("num_prefix_tokens", "global_pool", "no_embed_class", "dynamic_img_size",
               "pool_include_prefix", "has_class_token", "rope_mixed", "use_conv_mlp",
               "num_reg_tokens", "class_token", "rope_is_mixed")
# NaFlexVit's `embeds` (NaFlexEmbeds) attributes that decide its embedding path.
EMBEDS_ATTRS = ("is_linear", "pos_embed_type", "pos_embed_ar_preserving", "dynamic_img_pad",
                "enable_patch_interpolator")


def _extra(name, **kwargs):
    label = name + "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return label, (name, kwargs)


# Configurations users pass to create_model beyond the registered names (each its own group).
EXTRA_CONFIGS = dict([
    _extra("vit_small_patch16_224", class_token=False, global_pool="avg"),
    _extra("vit_small_patch16_224", class_token=False, global_pool="avg", pos_embed="none"),
    _extra("vit_small_patch16_224", reg_tokens=4, no_embed_class=True),
    _extra("vit_small_patch16_224", global_pool="avgmax"),
    _extra("vit_small_patch16_224", global_pool="max"),
    _extra("vit_small_patch16_224", global_pool="map"),
    _extra("vit_small_patch16_224", global_pool="avg", fc_norm=True),
    _extra("vit_small_patch16_224", pre_norm=True),
    _extra("vit_small_patch16_224", dynamic_img_size=True),
    _extra("vit_small_patch16_224", dynamic_img_size=True, dynamic_img_pad=True),
    _extra("vit_small_patch16_224", img_size=(224, 160)),
    _extra("vit_small_patch16_224", num_classes=0),
    _extra("vit_small_patch16_224", features_only=True),
    _extra("deit_tiny_distilled_patch16_224", dynamic_img_size=True),
    _extra("vit_small_patch16_rope_224", dynamic_img_size=True),
    _extra("eva02_tiny_patch14_224", dynamic_img_size=True),
    _extra("eva02_tiny_patch14_224", class_token=False, global_pool="avg"),
    _extra("beit_base_patch16_224", use_abs_pos_emb=True, use_rel_pos_bias=False,
           use_shared_rel_pos_bias=True),
    _extra("vit_relpos_small_patch16_224", class_token=True, global_pool="token"),
    _extra("swin_tiny_patch4_window7_224", img_size=(256, 192)),
    _extra("swinv2_tiny_window8_256", img_size=(256, 192)),
    _extra("convnext_atto", ls_init_value=None),
    _extra("convnext_atto", conv_mlp=True),
    _extra("convnext_atto", features_only=True),
    _extra("vit_small_patch16_224", use_naflex=True),              # NaFlexVit from a ViT
    _extra("vit_small_patch16_rope_224", use_naflex=True),         # NaFlexVit, axial ROPE
    _extra("vit_small_patch16_rope_mixed_224", use_naflex=True),   # NaFlexVit, mixed ROPE
    _extra("naflexvit_base_patch16_gap", embed_proj_type="conv", dynamic_img_pad=True),
])


class TinyProposal(nn.Module):
    """A cheap stride-32 ConvNet with random weights."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 8, stride=8)
        self.conv2 = nn.Conv2d(16, 8, 4, stride=4)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = nn.functional.pad(x, (0, -w % 32, 0, -h % 32))
        return self.conv2(torch.relu(self.conv1(x)))


def make_proposal():
    torch.manual_seed(0)
    return TinyProposal().eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Signatures


def family_name(model):
    try:
        return family_of(model).model_class.__name__
    except TypeError:
        return None


def _value(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(e, (int, float, str)) for e in v):
        return tuple(v)
    return type(v).__name__


def signature(model):
    types = frozenset(type(m).__name__ for m in model.modules())
    attrs = []
    for a in MODULE_ATTRS + TENSOR_ATTRS:
        if hasattr(model, a):
            v = getattr(model, a)
            attrs.append((a, None if v is None else type(v).__name__ if isinstance(v, nn.Module)
                          else tuple(v.shape) if a != "pos_embed" else "tensor"))
    for a in VALUE_ATTRS:
        if hasattr(model, a):
            attrs.append((a, _value(getattr(model, a))))
    embed = getattr(model, "patch_embed", None)
    for a in ("dynamic_img_pad", "strict_img_size", "flatten", "output_fmt"):
        if embed is not None and hasattr(embed, a):
            attrs.append(("patch_embed." + a, _value(getattr(embed, a))))
    embeds = getattr(model, "embeds", None)   # NaFlexVit
    for a in EMBEDS_ATTRS:
        if embeds is not None and hasattr(embeds, a):
            attrs.append(("embeds." + a, _value(getattr(embeds, a))))
    if embed is not None and hasattr(embed, "grid_size"):
        g = tuple(embed.grid_size)
        attrs.append(("square_grid", g[0] == g[1]))
    if family_name(model) in ("SwinTransformer", "SwinTransformerV2"):
        attrs.append(("img_size", _value(getattr(embed, "img_size", None))))
        attrs.append(("windows", tuple(tuple(b.window_size) for l in model.layers
                                       for b in l.blocks[:1])))
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks):
        b = blocks[0]
        for a in ("attn", "mlp", "ls1", "norm1", "norm2"):
            if hasattr(b, a):
                attrs.append(("blocks[0]." + a, type(getattr(b, a)).__name__))
        attn = getattr(b, "attn", None)
        for a in ("fused_attn", "qkv_bias_separate", "num_prefix_tokens"):
            if attn is not None and hasattr(attn, a):
                attrs.append(("attn." + a, _value(getattr(attn, a))))
    return (type(model).__name__, types, tuple(attrs))


def numel(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(name, extra=None):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **(extra or {}))


# ---------------------------------------------------------------------------------------------
# Refusals


def from_papr(exc):
    """Whether exc was raised by a frame of papr_kernels (not deep inside timm or torch)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.sep + "papr_kernels" + os.sep in frames[-1].filename


def try_patch(model, proposal, **kwargs):
    """None when patched, else ('refused', message) or ('FAIL', message)."""
    try:
        ptimm.patch(model, proposal, **kwargs)
        return None
    except (TypeError, ValueError) as exc:
        if from_papr(exc):
            return "refused", f"{type(exc).__name__}: {exc}"
        return "FAIL", f"unclear refusal {type(exc).__name__} from {_where(exc)}: {exc}"
    except Exception as exc:  # noqa: BLE001  (what the sweep is for)
        return "FAIL", f"crash {type(exc).__name__} from {_where(exc)}: {exc}"


def _where(exc):
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = os.path.relpath(frame.filename, ROOT) if ROOT in frame.filename else frame.filename
    return f"{where}:{frame.lineno}"


# ---------------------------------------------------------------------------------------------
# Small real models


MAX_TOKENS = 2048    # a bigger token grid (Sapiens2: 64 x 48) is built at half its size


def small_kwargs(fam, meta):
    if fam == "MetaFormer":     # timm's registrations fix depths and dims: full size
        return {}
    if fam == "Hiera":
        return {"stages": (1,) * len(meta.stage_ends)}
    if fam in ("SwinTransformer", "SwinTransformerV2", "ConvNeXt"):
        stages = meta.layers if fam != "ConvNeXt" else meta.stages
        return {"depths": (1, 1, 2, 1)[:len(stages)] if len(stages) == 4 else (1,) * len(stages)}
    if fam == "Cait":
        return {"depth": 2, "depth_token_only": 1}
    kv_heads = [getattr(getattr(b, "attn", None), "num_kv_heads", None)
                for b in getattr(meta, "blocks", [])]
    kwargs = {"depth": 2}
    if fam == "Eva" and kv_heads and None not in kv_heads:   # Sapiens2 takes one per block
        kwargs["num_kv_heads"] = (kv_heads[0], min(kv_heads))   # MHA and GQA
    embed = getattr(meta, "patch_embed", None)
    grid, patch = getattr(embed, "grid_size", None), getattr(embed, "patch_size", None)
    if grid is not None and patch is not None and grid[0] * grid[1] > MAX_TOKENS:
        kwargs["img_size"] = tuple(g // 2 * p for g, p in zip(grid, patch))   # half the grid
    return kwargs


def randomize(model, seed=0):
    """Redraw every parameter: timm zero-initializes layer scales, post-norms and some heads."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 1 and leaf == "weight":
                p.copy_(1 + 0.2 * noise)                     # norm scales
            elif p.dim() <= 1 or "logit_scale" in name:
                p.copy_(0.1 * noise)                         # biases, layer scales, gammas
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(noise / max(fan_in, 1) ** 0.5)
    return model


def build_small(name, fam, meta, extra=None):
    kwargs = dict(small_kwargs(fam, meta), **(extra or {}))
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return randomize(model).eval(), kwargs


def image_size(model):
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = cfg.get("input_size", (3, 224, 224))[1:]
    return tuple(int(s) for s in (size if isinstance(size, (tuple, list)) else (size, size)))


def images(size, batch=2, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


class KeepTokens(nn.Module):
    """Replaces timm's `patch_drop`: the prefix tokens and the patch tokens at
    `reference.prune`'s indices (`returns_indices`: Eva's (x, keep_indices))."""

    def __init__(self, features, z, order, prefix, grid, returns_indices):
        super().__init__()
        self.features, self.z, self.order = features, z, order
        self.prefix, self.grid, self.returns_indices = prefix, grid, returns_indices

    def forward(self, x):
        out, kept = reference.prune(x, self.features, self.z, num_prefix_tokens=self.prefix,
                                    grid=self.grid, order=self.order, return_indices=True)
        return (out, kept) if self.returns_indices else out


def patch_grid(model, x):
    """The token grid of images x: NaFlexVit's `embeds` grid of x, the NHWC embedding's
    (dynamic_img_size), else the embedding's grid."""
    if hasattr(model, "embeds"):
        return tuple(int(s) for s in model.embeds.dynamic_feat_size(tuple(x.shape[-2:])))
    with torch.no_grad():
        tokens = model.patch_embed(x)
    if tokens.dim() == 4:
        return tuple(tokens.shape[1:3])
    return tuple(int(s) for s in model.patch_embed.grid_size)


@contextlib.contextmanager
def swapped(model, attr, module, train=False):
    """`model.attr` replaced by `module` (and the model in train mode with `train`)."""
    old, training = getattr(model, attr), model.training
    setattr(model, attr, module)
    model.train(train or training)
    try:
        yield
    finally:
        setattr(model, attr, old)
        model.train(training)


def reference_logits(fam, model, net, x, z, order):
    """The unpatched `model`'s logits with PaPr done by the reference (see the module doc)."""
    if fam in ("VisionTransformer", "Eva", "NaFlexVit"):
        keep = KeepTokens(net(x), z, order, model.num_prefix_tokens,
                          patch_grid(model, x), returns_indices=fam != "VisionTransformer")
        with swapped(model, "patch_drop", keep, train=fam == "NaFlexVit"):
            return model(x)
    if fam in ("Beit", "Cait"):
        mod = __import__("test_timm_beit" if fam == "Beit" else "test_timm_cait")
        return model.forward_head(mod.reference_features(model, net, x, z, order))
    if fam == "Hiera":
        import test_timm_hiera as mod
        return model.forward_head(mod.reference_features(model, net, x, z))
    if fam == "VisionTransformerRelPos":
        import test_timm_relpos as mod
        feats = mod.reference_features(model, mod.full_biases(model), net, x, z, order)
        return model.forward_head(feats)
    import test_hierarchical as mod
    by_hand = {"SwinTransformer": mod.swin_by_hand, "SwinTransformerV2": mod.swinv2_by_hand,
               "ConvNeXt": mod.convnext_by_hand, "MetaFormer": mod.metaformer_by_hand}[fam]
    return by_hand(model, net, x, z, tuple(range(4)))


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_group(name, fam, meta, net, extra=None):
    """[] when every check passes, else the failures (strings)."""
    fails = []
    try:
        model, kwargs = build_small(name, fam, meta, extra)
    except Exception as exc:  # noqa: BLE001  (timm refused the depth override: the tool's limit)
        return [f"small model not built ({type(exc).__name__}: {exc}); weak check only: patch "
                f"accepted the meta model"]
    size = image_size(model)
    x = images(size)
    with torch.no_grad():
        dense = model(x)
        refusal = try_patch(model, net, z=1.0)
        if refusal:
            return [f"patch refused the small model ({kwargs}): {refusal[1]}"]
        out = model(x)
        if not torch.equal(out, dense):
            fails.append(f"z=1 differs from the unpatched model by {rel_diff(out, dense):.2e}")
        for z, order in Z_VALUES:     # some families take no order (`takes_order`)
            fails += check_pruned(fam, model, net, x, z, order, dense)
        if fam == "VisionTransformer":
            fails += check_merging(model, net, x)
        step = token_pixels(model, size)
        if step is not None:
            xs = images((size[0] - step[0], size[1] - 2 * step[1]))
            fails += [f"at {tuple(xs.shape[-2:])}: " + f
                      for f in check_pruned(fam, model, net, xs, 0.5, "score", None)]
    return fails


def token_pixels(model, size):
    """The pixels (h, w) of one token of a model that takes any image size, else None."""
    if hasattr(model, "embeds"):    # NaFlexVit
        return tuple(model.embeds.patch_size)
    if getattr(model, "dynamic_img_size", False):
        return tuple(s // g for s, g in zip(size, model.patch_embed.grid_size))
    return None


MERGE_R = 4


def check_merging(model, net, x, z=0.5):
    """patch(..., merge_r=MERGE_R): refused clearly, or the logits of test_timm_merge's
    reference (per sample, loops) where its head applies ('token' / 'avg' / 'max' / 'avgmax' /
    'map' pooling, DeiT distilled), else finite and deterministic only (weak)."""
    ptimm.unpatch(model)
    tokens = []
    keep = KeepTokens(net(x), z, "score", model.num_prefix_tokens, patch_grid(model, x),
                      returns_indices=False)
    keep.register_forward_hook(lambda module, args, out: tokens.append(out))
    with swapped(model, "patch_drop", keep):
        model.forward_features(x)
    refusal = try_patch(model, net, z=z, merge_r=MERGE_R)
    if refusal:
        return [] if refusal[0] == "refused" else [f"merge_r={MERGE_R}: {refusal[1]}"]
    try:
        out, again = model(x), model(x)
    except Exception as exc:  # noqa: BLE001
        return [f"merge_r={MERGE_R}: patched forward crashed: {type(exc).__name__} from "
                f"{_where(exc)}: {exc}"]
    if not torch.isfinite(out).all() or not torch.equal(out, again):
        return [f"merge_r={MERGE_R}: not finite or not deterministic"]
    import test_timm_merge as mod
    if model.global_pool not in ("token", "avg", "max", "avgmax", "map") and \
            not hasattr(model, "head_dist"):
        return [f"merge_r={MERGE_R}: global_pool={model.global_pool!r}: weak check only"]
    feats, sizes = mod.reference_merging_features(model, tokens[0], MERGE_R)
    d = rel_diff(out, mod.reference_head(model, feats, sizes))
    return [] if d <= TOL else [f"merge_r={MERGE_R}: differs from the reference by {d:.2e}"]


def takes_order(fam):
    """False for the families whose kept positions are in spatial order, no `order` option."""
    return fam not in ("SwinTransformer", "SwinTransformerV2", "ConvNeXt", "MetaFormer", "Hiera")


def check_pruned(fam, model, net, x, z, order, dense):
    ptimm.unpatch(model)
    try:
        ref = reference_logits(fam, model, net, x, z, order)
    except Exception as exc:  # noqa: BLE001
        return [f"z={z} {order}: reference failed ({type(exc).__name__}: {exc}); weak check only"]
    kwargs = {"order": order} if takes_order(fam) else {}
    refusal = try_patch(model, net, z=z, **kwargs)
    if refusal:
        return [f"z={z} {order}: patch refused: {refusal[1]}"]
    try:
        out = model(x)
        again = model(x) if (z, order) == Z_VALUES[0] else out
    except Exception as exc:  # noqa: BLE001
        return [f"z={z} {order}: patched forward crashed: {type(exc).__name__} from "
                f"{_where(exc)}: {exc}"]
    fails = []
    if not torch.isfinite(out).all() or not torch.equal(out, again):
        fails.append(f"z={z} {order}: not finite or not deterministic")
    d = rel_diff(out, ref)
    if not d <= TOL:
        fails.append(f"z={z} {order}: differs from the reference by {d:.2e} (silent mismatch)")
    if dense is not None and torch.equal(out, dense):
        fails.append(f"z={z} {order}: equals the unpruned output (nothing pruned?)")
    return fails


# ---------------------------------------------------------------------------------------------
# Sweep


def sweep(names, verbose, meta_only=False):
    net = make_proposal()
    groups = collections.OrderedDict()        # signature -> [(numel, name)]
    outcome = {}                              # name -> (family, status, message)
    for label in names:
        name, extra = EXTRA_CONFIGS.get(label, (label, None))
        try:
            meta = meta_model(name, extra)
        except Exception as exc:  # noqa: BLE001  (timm's own failure: not ours)
            outcome[label] = (None, "not built", f"{type(exc).__name__}: {exc}", None)
            continue
        fam = family_name(meta)
        refusal = try_patch(meta, net, z=0.5)
        if refusal is None:
            ptimm.unpatch(meta)
            sig = (fam,) + signature(meta) + ((label,) if extra else ())
            groups.setdefault(sig, []).append((numel(meta), label))
        else:
            status, msg = refusal
            outcome[label] = (fam, status, msg, type(meta).__name__)
    results = []
    if meta_only:
        for sig, members in groups.items():
            members.sort()
            results.append((sig[0], members[0][1], [n for _, n in members], "pass", []))
        return outcome, results
    for sig, members in groups.items():
        members.sort()
        rep = members[0][1]
        fam = sig[0]
        t0 = time.time()
        try:
            name, extra = EXTRA_CONFIGS.get(rep, (rep, None))
            fails = check_group(name, fam, meta_model(name, extra), net, extra)
        except Exception as exc:  # noqa: BLE001
            fails = [f"crash {type(exc).__name__} from {_where(exc)}: {exc}"]
        status = "FAIL" if any("weak check" not in f for f in fails) else (
            "weak" if fails else "pass")
        results.append((fam, rep, [n for _, n in members], status, fails))
        if verbose:
            print(f"{status:5s} {fam:24s} {rep:50s} {len(members):3d} models "
                  f"{time.time() - t0:5.1f}s {'; '.join(fails)}", flush=True)
    return outcome, results


def report(outcome, results, seconds):
    rows = collections.OrderedDict()

    def row(fam):
        return rows.setdefault(fam, collections.Counter())
    for fam, rep, members, status, fails in results:
        r = row(fam)
        r["groups"] += 1
        r["models"] += len(members)
        r[status] += len(members)
        r[status + " groups"] += 1
    refused_groups = collections.defaultdict(set)
    for name, entry in outcome.items():
        fam, status = entry[0], entry[1]
        if status == "not built":
            r = row("(not built on meta)")
            r["models"] += 1
            continue
        key = fam or "(other classes)"
        r = row(key)
        r["models"] += 1
        r["refused" if status == "refused" else "FAIL"] += 1
        refused_groups[key].add(entry[3] if fam is None else entry[2])
    for key, msgs in refused_groups.items():
        rows[key]["groups"] += len(msgs)
    total = len(outcome) + sum(len(r[2]) for r in results)
    print(f"timm {timm.__version__}, torch {torch.__version__}, papr_kernels "
          f"{getattr(papr_kernels, '__version__', '?')}; {total} names, {seconds / 60:.1f} min\n")
    print("| family | groups | models | pass | weak | refused clearly | FAIL |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for fam, r in rows.items():
        print(f"| {fam} | {r['groups']} | {r['models']} | {r['pass']} | {r['weak']} | "
              f"{r['refused']} | {r['FAIL']} |")
    fails = [(fam, rep, len(m), f) for fam, rep, m, s, f in results if s != "pass"]
    fails += [(e[0], n, 1, [e[2]]) for n, e in outcome.items() if e[1] == "FAIL"]
    if fails:
        print("\nFailures and weak checks (group representative, group size):")
        for fam, rep, size, msgs in fails:
            for msg in msgs:
                print(f"- {fam} `{rep}` ({size}): {msg[:400]}")
    refused = collections.Counter()
    for n, e in outcome.items():
        if e[1] == "refused" and e[0] is not None:
            refused[(e[0], e[2][:200])] += 1
    if refused:
        print("\nRefusals within supported families (message, models):")
        for (fam, msg), count in refused.items():
            print(f"- {fam} ({count}): {msg}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--filter", default="", help="only names containing this")
    parser.add_argument("--names", default="", help="only these names (comma-separated)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many names")
    parser.add_argument("--meta-only", action="store_true",
                        help="classify and group only (every group counted as pass)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per group")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    names = [n for n in list(timm.list_models()) + list(EXTRA_CONFIGS) if args.filter in n
             and (not args.names or n in args.names.split(","))]
    if args.limit:
        names = names[:args.limit]
    t0 = time.time()
    outcome, results = sweep(names, args.verbose, args.meta_only)
    report(outcome, results, time.time() - t0)
    return 1 if any(s == "FAIL" for *_, s, _ in results) or any(
        e[1] == "FAIL" for e in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
