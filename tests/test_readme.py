"""The README's Python examples run as written and do what their comments say.

Offline, timm cannot download weights: `timm.create_model` runs with `pretrained=False` here, and
the ViT-B / ConvNeXt-T of the examples are swapped for their smallest timm siblings (same
classes, same patch code) to keep the suite fast. Everything else is the README's text."""
import pathlib
import re

import pytest
import torch

import papr_kernels
from papr_kernels import reference

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SMALLER = {"vit_base_patch16_224": "vit_tiny_patch16_224", "convnext_tiny": "convnext_atto"}


def python_blocks():
    """{heading of the section: [code of each ```python block in it]}."""
    blocks, heading = {}, None
    for part in re.split(r"^(#+ .*)$", README.read_text(), flags=re.M):
        if part.startswith("#"):
            heading = part.lstrip("# ").strip()
        else:
            blocks.setdefault(heading, []).extend(
                re.findall(r"^```python\n(.*?)^```", part, flags=re.M | re.S))
    return blocks


def run(code: str, namespace: dict) -> dict:
    for big, small in SMALLER.items():
        code = code.replace(big, small)
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


@pytest.fixture
def offline_timm(monkeypatch, tmp_path):
    timm = pytest.importorskip("timm")
    create = timm.create_model

    def create_offline(name, pretrained=False, **kwargs):
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_offline)
    monkeypatch.chdir(tmp_path)   # torch.save / the ONNX file land here
    torch.manual_seed(0)
    return timm


def test_every_example_is_run_by_this_file():
    assert {h: len(b) for h, b in python_blocks().items() if b} == {
        "Quick start": 1, "timm models": 2, "Deploying: torch.export and ONNX": 1}


def test_quick_start():
    ns = run(python_blocks()["Quick start"][0], {})
    x, f, out, idx = ns["x"], ns["f"], ns["out"], ns["idx"]
    assert ns["layer"](x, f).shape == (8, 1 + 98, 768)      # the comment's shape
    assert torch.equal(out, reference.prune(x, f, 0.5))
    want_out, want_idx = reference.prune(x, f, 0.5, return_indices=True, order="spatial")
    assert torch.equal(idx, want_idx) and bool((idx.diff(dim=1) > 0).all())


def test_timm_models(offline_timm):
    from papr_kernels import timm as papr_timm
    vit_code, convnext_code = python_blocks()["timm models"]
    ns = run(vit_code, {})
    model = ns["model"]                                     # loaded, then unpatched
    assert not papr_timm.is_patched(model) and type(model).__name__ == "VisionTransformer"
    loaded = torch.load("papr_vit.pt", weights_only=False)
    assert papr_timm.is_patched(loaded) and loaded.papr_z == 0.3
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        loaded.papr_z = 1.0                                 # z = 1: the unpatched outputs
        assert torch.equal(loaded(images), model(images))
    ns = run(convnext_code, {"timm": offline_timm, "papr_kernels": papr_kernels})
    assert papr_timm.is_patched(ns["model"]) and ns["model"].papr_z == 0.65


def test_deploying(offline_timm):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from papr_kernels import timm as papr_timm
    model = offline_timm.create_model("vit_tiny_patch16_224").eval()
    papr_timm.patch(model, papr_kernels.proposal.create("mobileone_s0", pretrained=False), 0.5)
    ns = run(python_blocks()["Deploying: torch.export and ONNX"][0],
             {"torch": torch, "model": model})
    images = ns["images"]
    with torch.no_grad():
        want = model(images)
        assert torch.equal(ns["program"].module()(images), want)
    torch.testing.assert_close(torch.from_numpy(ns["logits"]), want, rtol=1e-4, atol=1e-4)


def test_the_readme_stays_short():
    """Issue 15: a README that explains; measurements live in docs/."""
    assert len(README.read_text().splitlines()) <= 220
