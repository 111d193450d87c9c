"""What PaPr costs in accuracy on your images: a patched timm model against the unpruned one.

    python -m papr_kernels eval --model vit_base_patch16_224 --data /path/to/imagenet/val

Every batch runs through the unpruned model (`papr_z = 1`, bit for bit timm's) and the patched
one at each z, so decoding is shared and the rows compare the same images: top-1 / top-5
accuracy (labels from the folder names, sorted: ImageNet's synset folders give timm's class
order), the top-1 agreement with the unpruned model (no labels needed) and images/s of the
model calls alone (the proposal included; each config called once on the first batch before
its timed calls).
"""
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from . import spec


@dataclass
class Result:
    config: str                  # "unpruned" or "z=0.5"
    images: int
    top1: Optional[float]        # None without labels
    top5: Optional[float]        # None without labels or with fewer than 5 classes
    agreement: float             # fraction whose top-1 is the unpruned model's
    seconds: float               # in the model calls

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def evaluate(model: nn.Module, batches: Iterable, zs: Sequence[float],
             labels: bool = True) -> List[Result]:
    """`model` patched by `papr_kernels.timm.patch`, on `batches` of (images, targets) already
    on its device and in its dtype: one Result for the unpruned model, then one per z."""
    if not hasattr(model, "papr_z"):
        raise TypeError(f"model must be patched by papr_kernels.timm.patch, got a "
                        f"{type(model).__name__}")
    zs = [spec.check_z(z) for z in zs]
    configs = {"unpruned": 1.0, **{f"z={z:g}": z for z in zs}}
    counts = {name: dict(images=0, top1=0, top5=0, agree=0, seconds=0.0) for name in configs}
    saved_z, warm = model.papr_z, False
    try:
        with torch.inference_mode():
            for images, targets in batches:
                reference = None
                for name, z in configs.items():
                    model.papr_z = z
                    if not warm:                    # one-time costs out of the timings
                        model(images)
                    logits, seconds = _timed(model, images)
                    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                    reference = top[:, 0] if reference is None else reference
                    _count(counts[name], top, targets, reference, seconds)
                warm = True
    finally:
        model.papr_z = saved_z
    return [_result(name, c, labels, model_classes=_classes(model)) for name, c in counts.items()]


def _timed(model: nn.Module, images: torch.Tensor):
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    logits = model(images)
    sync()
    return logits.float(), time.perf_counter() - start


def _count(count: Dict, top: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor,
           seconds: float) -> None:
    targets = targets.to(top.device)
    count["images"] += top.shape[0]
    count["top1"] += int((top[:, 0] == targets).sum())
    count["top5"] += int((top == targets[:, None]).any(dim=1).sum())
    count["agree"] += int((top[:, 0] == reference).sum())
    count["seconds"] += seconds


def _classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or 0)


def _result(name: str, c: Dict, labels: bool, model_classes: int) -> Result:
    n = max(c["images"], 1)
    return Result(name, c["images"], c["top1"] / n if labels else None,
                  c["top5"] / n if labels and model_classes >= 5 else None,
                  c["agree"] / n, c["seconds"])


def table(results: List[Result]) -> str:
    """A markdown table of `results` (speed-up against the first row)."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}"
    base = results[0].images_per_s
    lines = ["| config | images | top-1 % | top-5 % | top-1 agreement % | images/s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.config} | {r.images} | {pct(r.top1)} | {pct(r.top5)} | "
                     f"{pct(r.agreement)} | {r.images_per_s:.1f} | {r.images_per_s / base:.2f}x |")
    return "\n".join(lines)


def image_batches(model: nn.Module, root: str, batch: int, workers: int = 0,
                  limit: Optional[int] = None, device="cpu", dtype=torch.float32):
    """(images, targets) batches of the image folder `root` with the model's own eval transform
    (timm's data config), on `device` in `dtype`; the first `limit` images when given."""
    import timm.data    # timm is an extra
    if not isinstance(root, str) or not os.path.isdir(root):
        raise ValueError(f"data must be a folder of images, got {root!r} (not a folder)")
    config = timm.data.resolve_data_config({}, model=model)
    try:
        dataset = timm.data.ImageDataset(root, transform=timm.data.create_transform(**config))
    except RuntimeError as exc:       # timm: "Found 0 images in subfolders of ..."
        raise ValueError(f"data: no images found under {root!r} ({exc})") from None
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    for images, targets in loader:
        yield images.to(device, dtype), targets
