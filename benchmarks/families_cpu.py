"""CPU images/s of PaPr-patched timm models against the unpruned ones, one model per supported
family, side by side in one process: what PaPr buys a user serving that model on a CPU.

    python benchmarks/families_cpu.py [--models a,b@224,...] [--batch 8] [--runs 5]
        [--threads 1] [--clock process|wall] [--dtype fp32|bf16] [--proposal-sizes 160,128]
        [--stages 0/0,1] [--proposal-fp32] [--compile] [--dry]

For each model: the unpruned model, PaPr (MobileOne-S0 proposal, its time counted) at the
family's default z and at z = 0.5, the bound at z = 0.5 where it is cheap to build (the ViT-like
families: the first k patch tokens kept by a slice, no proposal, no selection; per-sample rope /
bias gathers still run) and the proposal alone, as the patched model runs it. Each run times
every config once, in turn (alternating), after one warm-up each; the table gives medians.
Columns: images/s, speed-up over unpruned, the FLOP ratio (FlopCounterMode on one image, SDPA
counted through its math form, the proposal included), the proposal's share of the PaPr time,
and PaPr / bound (bound time / PaPr time). `name@S` runs a model at S x S pixels (`img_size=S`).
`--proposal-sizes S,...` adds, for each S, PaPr at z = 0.5 and the proposal alone with the
proposal's opt-in `image_size=S` (`papr-z0.5-pS`, `proposal-pS`: the same network, its images
resized to S x S; it keeps other tokens, docs/design.md). `--proposal-fp32` adds PaPr at
z = 0.5 and the proposal alone with the proposal fixed to float32 whatever the images
(`create(..., dtype=torch.float32)`: `papr-z0.5-pfp32`, `proposal-pfp32`), the way out for bf16
models on a CPU without bf16 convolutions. `--stages 0/0,1` adds, for the
hierarchical families (Swin, ConvNeXt, MetaFormer), PaPr at their default z pruning only those
stages (`papr-z0.65-s0`, `papr-z0.65-s01`; sets separated by /). `--dtype bf16`: the models and
images in bf16 (the proposal follows them), as on a CPU with AMX / AVX512-BF16. `--compile`
times every config through `torch.compile` (static shapes; the PaPr models with their proposal
and selection traced in, the proposal-alone rows compiled alone; compiling is the warm-up, not
timed); the FLOP counts are the eager models'.
Random weights: speed does not depend on them.

`--clock process` (the default) times the CPU seconds the process used (time.process_time, all
its threads) instead of wall time: on a shared machine other processes' load stretches wall time
by a different factor from run to run, but hardly the CPU time of the work itself. With several
threads that is CPU cost (both cores' seconds), not latency: use `--clock wall` on a quiet
machine for latency; and set OMP_WAIT_POLICY=PASSIVE: else a thread waiting for a busy core
spins, and its spinning counts as work (2 threads on 2 cores at load 5: ViT-S/16 read 5.1
images/s, against 14.3 passive and 15.6 with 1 thread). `--dry` builds depth-1 models (the
test; MetaFormer names at full size: timm fixes their depths).
"""
import argparse
import copy
import os
import re
import statistics
import subprocess
import time

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import papr_kernels
from papr_kernels import proposal as papr_proposal
from papr_kernels import timm as papr_timm
from papr_kernels.timm.hiera import PaPrHiera
from papr_kernels.timm._stages import HierarchicalModel
from papr_kernels.timm.naflexvit import PaPrNaFlexVit
from papr_kernels.timm.vit import PrunedOnce
from papr_bench import allow_recompiles
from test_e2e import BoundViT, _proposal_runner, counted_gflops

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "deit_small_distilled_patch16_224",
          "vit_small_patch14_reg4_dinov2@224", "eva02_small_patch14_224", "beit_base_patch16_224",
          "vit_relpos_small_patch16_224", "cait_xxs24_224", "swin_tiny_patch4_window7_224",
          "swinv2_tiny_window8_256", "convnext_tiny", "convnextv2_tiny", "caformer_s18",
          "hiera_tiny_224", "naflexvit_base_patch16_gap")
BOUND_Z = 0.5
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HIERARCHICAL_PREFIXES = ("swin", "convnext")
FIXED_DEPTHS = ("caformer", "convformer", "poolformer")   # timm's MetaFormer names: full size


def parse_model(spec):
    """'name' or 'name@S' -> (name, S or None)."""
    name, _, size = spec.partition("@")
    return name, int(size) if size else None


def create(name, img_size, dry):
    kwargs = {} if img_size is None else {"img_size": img_size}
    if dry and not name.startswith(FIXED_DEPTHS):   # one block (per stage): the same code
        kwargs.update({"depths": (1, 1, 1, 1)} if name.startswith(HIERARCHICAL_PREFIXES)
                      else {"stages": (1, 1, 1, 1)} if name.startswith("hiera")
                      else {"depth": 1})
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # FlopCounterMode's module tracker fails on a parameter that requires grad used in a view
    # (CaiT's class token, torch 2.14); inference needs no grad.
    model.requires_grad_(False)
    size = img_size or timm.data.resolve_data_config({}, model=model)["input_size"][-1]
    return model, size


def keep_first_tokens(z):
    """A `PaPrState.prune_tokens` that keeps the first k patch tokens: no proposal, no
    selection."""
    def prune(x, images, grid, num_prefix_tokens, return_indices=False):
        k = papr_kernels.keep_count(x.shape[1], z, num_prefix_tokens)
        kept = torch.arange(k, device=x.device).expand(x.shape[0], k)
        x = x[:, :num_prefix_tokens + k]
        return (x, kept) if return_indices else x
    return prune


def keep_first_units(model, z):
    """A Hiera's `_papr_kept_units` that keeps its first k mask units: no proposal."""
    units = model.mask_spatial_shape[0] * model.mask_spatial_shape[1]
    k = papr_kernels.keep_count(units, z, 0)
    return lambda images: torch.arange(k, device=images.device).expand(images.shape[0], k)


def bound(model, proposal, z):
    """The bound of any pruner at z, or None where it is not cheap to build (Swin, ConvNeXt):
    timm ViTs by BoundViT, the families pruned once before their blocks (Eva, Beit, RelPos,
    CaiT), NaFlexVit and Hiera by a patched copy that keeps the first k tokens (mask units)."""
    if isinstance(model, VisionTransformer) and type(model).forward_features is \
            VisionTransformer.forward_features:
        return BoundViT(model, z)
    patched = papr_timm.patch(copy.deepcopy(model), proposal, z)
    # instance attributes: they shadow the methods
    if isinstance(patched, PaPrHiera):
        patched._papr_kept_units = keep_first_units(patched, z)
    elif isinstance(patched, (PrunedOnce, PaPrNaFlexVit)):
        patched._papr.prune_tokens = keep_first_tokens(z)
    else:
        return None
    return patched


def configs(model, proposal, proposal_sizes=(), stage_sets=(), proposal_fp32=False):
    """{config: (fn, z)} of one model, in timing order; for each of `proposal_sizes` S, PaPr at
    BOUND_Z and the proposal alone with the proposal at `image_size=S` (the same network); with
    `proposal_fp32`, the same with a copy of the proposal fixed to float32; for each of
    `stage_sets` (hierarchical families), PaPr at the default z on those stages only."""
    default = papr_timm.patch(copy.deepcopy(model), proposal)   # the family's default z
    patched = {default.papr_z: default}
    if BOUND_Z not in patched:
        patched[BOUND_Z] = papr_timm.patch(copy.deepcopy(model), proposal, BOUND_Z)
    out = {"unpruned": (model, 1.0)}
    for z in sorted(patched, reverse=True):
        out[f"papr-z{z:g}"] = (patched[z], z)
    bound_fn = bound(model, proposal, BOUND_Z)
    if bound_fn is not None:
        out[f"bound-z{BOUND_Z:g}"] = (bound_fn, BOUND_Z)
    out["proposal"] = (_proposal_runner(out[f"papr-z{BOUND_Z:g}"][0]), None)
    for size in proposal_sizes:
        smaller = papr_proposal.Proposal(proposal.network, image_size=size)
        papr = papr_timm.patch(copy.deepcopy(model), smaller, BOUND_Z)
        out[f"papr-z{BOUND_Z:g}-p{size}"] = (papr, BOUND_Z)
        out[f"proposal-p{size}"] = (_proposal_runner(papr), None)
    if proposal_fp32:   # a copy: one network cast back and forth would time the casts
        fixed = papr_proposal.Proposal(copy.deepcopy(proposal.network), dtype=torch.float32)
        papr = papr_timm.patch(copy.deepcopy(model), fixed, BOUND_Z)
        out[f"papr-z{BOUND_Z:g}-pfp32"] = (papr, BOUND_Z)
        out["proposal-pfp32"] = (_proposal_runner(papr), None)
    if isinstance(default, HierarchicalModel):
        for stages in stage_sets:
            papr = papr_timm.patch(copy.deepcopy(model), proposal, stages=stages)
            out[f"papr-z{papr.papr_z:g}-s{''.join(map(str, stages))}"] = (papr, papr.papr_z)
    return out


def proposal_config(config):
    """The config of the proposal alone that PaPr config `config` runs: proposal[-pS]."""
    size = re.search(r"-p(\d+|fp32)$", config)
    return "proposal" + (size.group(0) if size else "")


def seconds(fn, images, clock):
    start = clock()
    with torch.inference_mode():
        fn(images)
    return clock() - start


def time_alternating(fns, images, runs, clock):
    """{config: [seconds per run]}: one warm-up each, then `runs` rounds of every config."""
    for fn in fns.values():
        seconds(fn, images, clock)
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(seconds(fn, images, clock))
    return times


def measure_model(spec, proposal, batch, runs, clock, dry=False, proposal_sizes=(),
                  dtype=torch.float32, stage_sets=(), compiled=False, proposal_fp32=False):
    """The rows (dicts) of one model: one per config; `compiled`: each timed through
    torch.compile."""
    name, img_size = parse_model(spec)
    model, size = create(name, img_size, dry)
    model.to(dtype)
    images = torch.randn(batch, 3, size, size,
                         generator=torch.Generator().manual_seed(0)).to(dtype)
    fns = configs(model, proposal, proposal_sizes, stage_sets, proposal_fp32)
    timed = {c: torch.compile(fn, dynamic=False) if compiled else fn for c, (fn, _) in fns.items()}
    times = time_alternating(timed, images, runs, clock)
    proposal_gflops = {c: counted_gflops(fn, images) for c, (fn, _) in fns.items()
                       if c.startswith("proposal")}
    rows = []
    for config, (fn, z) in fns.items():
        uses_proposal = config.startswith(("papr", "proposal"))
        rows.append(dict(model=name, family=type(model).__name__, size=size, config=config, z=z,
                         dtype=next(model.parameters()).dtype,
                         median_s=statistics.median(times[config]), times_s=times[config],
                         gflops=counted_gflops(fn, images),
                         proposal_gflops=proposal_gflops[proposal_config(config)]
                         if uses_proposal else 0.0))
    add_ratios(rows, batch)
    return rows


def add_ratios(rows, batch):
    """images_per_s, speedup and flop_ratio (over unpruned), proposal_share and papr_vs_bound
    (bound time / PaPr time at the bound's z) of one model's rows, in place."""
    by_config = {r["config"]: r for r in rows}
    base = by_config["unpruned"]
    for r in rows:
        r["images_per_s"] = batch / r["median_s"]
        r["speedup"] = base["median_s"] / r["median_s"]
        r["flop_ratio"] = base["gflops"] / r["gflops"]
        is_papr = r["config"].startswith("papr")
        prop = by_config[proposal_config(r["config"])] if is_papr else None
        r["proposal_share"] = prop["median_s"] / r["median_s"] if is_papr else None
        b = by_config.get(f"bound-z{r['z']:g}") if is_papr else None
        r["papr_vs_bound"] = b["median_s"] / r["median_s"] if b else None


def table(rows):
    lines = ["| model | family | px | config | GFLOPs/img (proposal) | images/s | speed-up | "
             "FLOP ratio | proposal share | PaPr / bound |", "|" + "---|" * 10]
    for r in rows:
        if r["config"].startswith("proposal"):
            continue   # its time is the share column
        share = "-" if r["proposal_share"] is None else f"{100 * r['proposal_share']:.0f}%"
        vs_bound = "-" if r["papr_vs_bound"] is None else f"{r['papr_vs_bound']:.2f}"
        lines.append(f"| {r['model']} | {r['family']} | {r['size']} | {r['config']} | "
                     f"{r['gflops']:.2f} ({r['proposal_gflops']:.2f}) | "
                     f"{r['images_per_s']:.2f} | {r['speedup']:.2f}x | {r['flop_ratio']:.2f}x | "
                     f"{share} | {vs_bound} |")
    return "\n".join(lines)


def proposal_table(rows):
    """The proposal alone at each image size (--proposal-sizes), against the full-size one."""
    lines = ["| model | proposal at | ms / batch | time / full-size proposal's |", "|---|---|---|---|"]
    full = {r["model"]: r["median_s"] for r in rows if r["config"] == "proposal"}
    for r in rows:
        if r["config"].startswith("proposal") and r["config"] != "proposal-pfp32":
            at = r["config"][len("proposal-p"):] + " px" if r["config"] != "proposal" else \
                f"{r['size']} px (as given)"
            lines.append(f"| {r['model']} | {at} | {r['median_s'] * 1e3:.1f} | "
                         f"{r['median_s'] / full[r['model']]:.2f} |")
    return "\n".join(lines)


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated timm names, name@S for S x S pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=list(CLOCKS), default="process")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--proposal-sizes", default="",
                        help="comma-separated S: also PaPr with the proposal at image_size=S")
    parser.add_argument("--stages", default="",
                        help="stage sets like 0/0,1: also PaPr of the hierarchical families on "
                             "those stages only")
    parser.add_argument("--proposal-fp32", action="store_true",
                        help="also PaPr with the proposal fixed to float32")
    parser.add_argument("--compile", action="store_true",
                        help="time every config through torch.compile")
    parser.add_argument("--dry", action="store_true", help="depth-1 models (a smoke test)")
    args = parser.parse_args(argv)
    try:
        args.stages = tuple(tuple(int(i) for i in group.split(","))
                            for group in args.stages.split("/") if group)
    except ValueError:
        parser.error(f"--stages must be stage sets like 0/0,1, got {args.stages!r}")
    if args.batch < 1 or args.runs < 1:
        parser.error("--batch and --runs must be >= 1")
    try:
        args.proposal_sizes = tuple(int(s) for s in args.proposal_sizes.split(",") if s)
    except ValueError:
        parser.error(f"--proposal-sizes must be comma-separated ints, got "
                     f"{args.proposal_sizes!r}")
    if any(s < 1 for s in args.proposal_sizes):
        parser.error("--proposal-sizes must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        allow_recompiles()   # each model and config is its own graph
    torch.manual_seed(1)
    proposal = papr_proposal.create("mobileone_s0", pretrained=False)
    print(f"torch {torch.__version__}, timm {timm.__version__}, commit {commit()}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, B={args.batch}, median of {args.runs} "
          f"alternating runs, {args.clock} clock, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
          f"{', torch.compile' if args.compile else ''}"
          f"{', DRY (depth-1 models)' if args.dry else ''}"
          f"{f', proposal sizes {args.proposal_sizes}' if args.proposal_sizes else ''}"
          f"{', proposal also in fp32' if args.proposal_fp32 else ''}",
          flush=True)
    rows = []
    for spec in args.models.split(","):
        rows += measure_model(spec, proposal, args.batch, args.runs, CLOCKS[args.clock],
                              args.dry, args.proposal_sizes, DTYPES[args.dtype], args.stages,
                              args.compile, args.proposal_fp32)
        print(f"{spec} done", flush=True)
    print()
    if args.proposal_sizes:
        print(proposal_table(rows))
        print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
