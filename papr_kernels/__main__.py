"""Command line: `python -m papr_kernels info`, `demo` and `eval`."""
import argparse
import os
import platform
import sys
import time
from typing import List, Optional

import torch

import papr_kernels
from papr_kernels import backends, evaluate, testing
from papr_kernels import proposal as papr_proposal
from papr_kernels.ops import extension

try:   # timm is an extra: `info` and the tensor demo run without it
    from papr_kernels import timm as papr_timm
    _TIMM_ERROR = None
except ImportError as exc:
    papr_timm, _TIMM_ERROR = None, exc


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {exc})"
    return getattr(module, "__version__", "unknown")


def _extension_build() -> str:
    build = extension.build_info()
    if build is None:
        return "not loaded (pure-Python install or another build; see the cpp backend below)"
    archs = ", ".join(f"sm_{a.replace('.', '')}" for a in build["archs"]) or "none"
    ptx = f" + PTX of compute_{build['archs'][-1].replace('.', '')}" if build["ptx"] and \
        build["archs"] else ""
    abi = (f"; stable ABI: loads into torch >= {build['stable_abi']}, {build['python_abi']}-abi3"
           if "stable_abi" in build else "")
    return (f"built against torch {build['torch']}, CUDA {build['cuda'] or 'none'}: {archs}{ptx}"
            f"{abi}")


def _cpu_convolutions() -> str:
    """Which reduced-precision dtypes this CPU's oneDNN convolves in (a proposal that follows
    bf16 / fp16 images runs torch's slow fallback convolution where it does not)."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    slow = [name for dtype, name in names.items()
            if papr_proposal._slow_on_cpu(torch.device("cpu"), dtype)]
    fast = [name for name in names.values() if name not in slow]
    out = [f"{', '.join(fast)} by oneDNN"] if fast else []
    if slow:
        out.append(f"{', '.join(slow)} by torch's slow fallback (a proposal for such models: "
                   f"proposal.create(..., dtype=torch.float32))")
    return "; ".join(out)


def info() -> None:
    """Versions, devices and each backend with why it can or cannot run (like xformers.info)."""
    cuda = torch.cuda.is_available()
    rows = [
        ("papr_kernels", papr_kernels.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA build", torch.version.cuda or "none (CPU build)"),
        ("CUDA device", torch.cuda.get_device_name(0) if cuda else "none"),
        ("triton", _version("triton")),
        ("timm", _version("timm")),
        ("extension _C", _extension_build()),
        ("CPU convolutions", _cpu_convolutions()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print()
    print(f"{'backend':<8}  {'device':<6}  {'status':<11}  description / reason")
    for name in backends.names():
        backend = backends._REGISTRY[name]
        for device_type in backend.devices:
            if device_type == "meta":
                continue
            reason = backends.unavailable_reason(name, device_type)
            status = "available" if reason is None else "unavailable"
            print(f"{name:<8}  {device_type:<6}  {status:<11}  {reason or backend.description}")
    print()
    forced = os.environ.get(backends.ENV_VAR)
    for device_type in ["cpu"] + (["cuda"] if cuda else []):
        try:
            chosen = backends.pick(None, device_type)
        except (ValueError, RuntimeError) as exc:
            chosen = f"error: {exc}"
        how = f"{backends.ENV_VAR}={forced}" if forced else "auto"
        print(f"prune on {device_type} tensors runs: {chosen} ({how})")


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (JIT compilation, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def demo(batch: int = 8, repeats: int = 20) -> bool:
    """Prune ViT-B/16-224-shaped tokens with MobileOne-S0-shaped features on every backend."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 197, 768, generator=gen)
    f = torch.randn(batch, 1024, 7, 7, generator=gen)
    print(f"x {tuple(x.shape)} tokens (ViT-B/16, 224 px), f {tuple(f.shape)} proposal features "
          f"(MobileOne-S0), fp32, CPU")
    print(f"{'backend':<8}  {'z':>4}  {'tokens kept':>11}  {'latency (ms)':>12}  matches reference")
    all_match = True
    for name in papr_kernels.available_backends("cpu"):
        for z in (0.7, 0.5, 0.3):
            out, idx = papr_kernels.prune(x, f, z, backend=name, return_indices=True)
            ok = not testing.mismatches(x, f, z, out, idx)
            all_match &= ok
            ms = _median_ms(lambda: papr_kernels.prune(x, f, z, backend=name), repeats)
            print(f"{name:<8}  {z:>4}  {out.shape[1]:>11}  {ms:>12.3f}  {'yes' if ok else 'NO'}")
    return all_match


def _tokens_seen(model):
    """A list a forward fills with the token count entering the first block (ViT) or the rows
    the first pruned block's MLP runs on (Swin, ConvNeXt), and the hook handles."""
    seen = []
    blocks = getattr(model, "blocks", None)
    if blocks is not None:                                    # ViT: tokens entering block 0
        hooks = [blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))]
    else:                                                     # positions in the first MLP
        fc1 = next(m for name, m in model.named_modules() if name.endswith("mlp.fc1"))
        channels_dim = -1 if isinstance(fc1, torch.nn.Linear) else 1   # Linear or 1x1 conv
        hooks = [fc1.register_forward_pre_hook(lambda m, a: seen.append(
            a[0].numel() // (a[0].shape[0] * a[0].shape[channels_dim])))]
    return seen, hooks


def timm_demo(model_name: str, batch: int = 8, repeats: int = 3) -> bool:
    """A patched timm model end to end (random weights, MobileOne-S0 proposal): images/s."""
    if papr_timm is None:
        raise SystemExit(f"python -m papr_kernels demo --model: {_TIMM_ERROR}")
    import timm
    try:                          # the backend prune will run (PAPR_KERNELS_BACKEND), checked
        backends.pick(None, "cpu")   # before anything is built or timed
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"python -m papr_kernels demo: {exc}") from None
    torch.manual_seed(0)
    try:
        model = timm.create_model(model_name, pretrained=False).eval()
    except RuntimeError as exc:   # timm: "Unknown model (...)"
        raise SystemExit(f"python -m papr_kernels demo: --model {model_name!r}: {exc}") from None
    images = torch.randn(batch, 3, *model.pretrained_cfg["input_size"][1:])
    proposal = papr_proposal.create("mobileone_s0", pretrained=False)
    try:                          # a family `patch` supports? (before anything is timed)
        papr_timm.unpatch(papr_timm.patch(model, proposal))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"python -m papr_kernels demo: --model {model_name!r}: {exc}") from None
    print(f"{model_name} (random weights), MobileOne-S0 proposal, batch {batch}, "
          f"{tuple(images.shape[1:])}, fp32, {'CUDA' if images.is_cuda else 'CPU'}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'z':>4}  {'tokens':>6}  {'images/s':>9}  {'speed-up':>8}")
    baseline = None
    with torch.inference_mode():
        for z in (1.0, 0.7, 0.5, 0.3):
            if z < 1:
                papr_timm.patch(model, proposal, z=z)
            seen, hooks = _tokens_seen(model)
            ms = _median_ms(lambda: model(images), repeats)
            for hook in hooks:
                hook.remove()
            rate = batch / (ms / 1e3)
            baseline = baseline or rate
            label = "none" if z == 1 else f"{z}"
            print(f"{label:>4}  {seen[0]:>6}  {rate:>9.2f}  {rate / baseline:>7.2f}x")
    papr_timm.unpatch(model)
    return True


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _add_eval_parser(sub) -> None:
    parser = sub.add_parser(
        "eval", help="accuracy of a PaPr-patched timm model against the unpruned one on a "
                     "folder of images (papr_kernels.evaluate)")
    parser.add_argument("--model", required=True, help="timm model name")
    parser.add_argument("--data", required=True,
                        help="image folder; class subfolders in the model's class order give "
                             "labels (ImageNet val: one folder per synset)")
    parser.add_argument("--z", type=float, nargs="+", default=None,
                        help="keep ratios (default: the family's default)")
    parser.add_argument("--proposal", default="mobileone_s0")
    parser.add_argument("--proposal-size", type=_positive_int, default=None,
                        help="run the proposal on images resized to this size (the opt-in "
                             "image_size of papr_kernels.proposal.create)")
    parser.add_argument("--batch", type=_positive_int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--limit", type=_positive_int, default=None, help="first N images only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--no-labels", action="store_true",
                        help="agreement with the unpruned model only (folders are no classes)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random weights for the model and the proposal (a dry run)")


def eval_command(args) -> int:
    """`python -m papr_kernels eval`: the table of `papr_kernels.evaluate.evaluate`."""
    if papr_timm is None:
        raise SystemExit(f"python -m papr_kernels eval: {_TIMM_ERROR}")
    import timm
    pretrained = not args.no_pretrained
    try:
        model = timm.create_model(args.model, pretrained=pretrained).eval()
        proposal = papr_proposal.create(args.proposal, pretrained=pretrained,
                                        image_size=args.proposal_size)
        papr_timm.patch(model, proposal)
        model.to(args.device, DTYPES[args.dtype])
        zs = args.z or [model.papr_z]
        batches = evaluate.image_batches(model, args.data, args.batch, args.workers, args.limit,
                                         args.device, DTYPES[args.dtype])
        results = evaluate.evaluate(model, batches, zs, labels=not args.no_labels)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise SystemExit(f"python -m papr_kernels eval: {exc}") from None
    size = f" at {args.proposal_size} px" if args.proposal_size else ""
    print(f"{args.model} ({'pretrained' if pretrained else 'random weights'}), proposal "
          f"{args.proposal}{size}, {args.data}, batch {args.batch}, {args.dtype}, {args.device}")
    print(evaluate.table(results))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papr_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and backend availability")
    demo_parser = sub.add_parser("demo", help="prune ViT-B/16-shaped tokens on every backend")
    demo_parser.add_argument("--batch", type=_positive_int, default=8)
    demo_parser.add_argument("--repeats", type=_positive_int, default=None,
                             help="timed runs (default 20; 3 with --model)")
    demo_parser.add_argument("--model", default=None,
                             help="run this timm model (any family papr_kernels.timm.patch "
                                  "takes) patched end to end (e.g. vit_base_patch16_224)")
    _add_eval_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "eval":
        return eval_command(args)
    if args.model is not None:
        if not args.model.strip():
            parser.error(f"--model needs a timm model name (e.g. vit_base_patch16_224), got "
                         f"{args.model!r}")
        return 0 if timm_demo(args.model, args.batch, args.repeats or 3) else 1
    return 0 if demo(args.batch, args.repeats or 20) else 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
