"""papr_kernels.evaluate and `python -m papr_kernels eval`: the counts against a per-image loop
written here over the same batches, on a folder of random images (random weights)."""
import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402

import papr_kernels.timm as papr_timm  # noqa: E402
from papr_kernels import evaluate  # noqa: E402
from papr_kernels.__main__ import main  # noqa: E402

CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 class folders of 3 random images each (sizes differ: the transform resizes)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (48 + 8 * i, 64 + 8 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


def patched_vit(num_classes=6):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2,
                              num_classes=num_classes).eval()
    net = torch.nn.Conv2d(3, 8, 32, stride=32)
    return papr_timm.patch(model, net, z=0.7)


def by_hand(model, batches, zs):
    """{config: (images, top-1 hits, top-5 hits, agreements)} by plain loops over each image's
    logits (the model called here on the same batches)."""
    out = {}
    logits = {}
    for config, z in [("unpruned", 1.0)] + [(f"z={z:g}", z) for z in zs]:
        model.papr_z = z
        with torch.no_grad():
            logits[config] = [(model(images), targets) for images, targets in batches]
    for config, rows in logits.items():
        n = top1 = top5 = agree = 0
        for (batch, targets), (dense, _) in zip(rows, logits["unpruned"]):
            for row, target, dense_row in zip(batch.tolist(), targets.tolist(), dense.tolist()):
                ranked = sorted(range(len(row)), key=lambda c: -row[c])
                n += 1
                top1 += ranked[0] == target
                top5 += target in ranked[:5]
                agree += ranked[0] == max(range(len(dense_row)), key=lambda c: dense_row[c])
        out[config] = (n, top1, top5, agree)
    return out


def test_counts_match_a_per_image_loop(folder):
    model = patched_vit()
    batches = list(evaluate.image_batches(model, folder, batch=4))   # 4 + 4 + 1 images
    assert [len(t) for _, t in batches] == [4, 4, 1]
    assert sorted(torch.cat([t for _, t in batches]).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    zs = (0.5, 0.2)
    results = evaluate.evaluate(model, batches, zs)
    assert model.papr_z == 0.7                                        # put back
    expected = by_hand(model, batches, zs)
    assert [r.config for r in results] == ["unpruned", "z=0.5", "z=0.2"]
    for r in results:
        n, top1, top5, agree = expected[r.config]
        assert (r.images, r.top1, r.top5, r.agreement) == (n, top1 / n, top5 / n, agree / n)
        assert r.seconds > 0
    assert results[0].agreement == 1.0
    assert results[2].agreement < 1.0            # 20% of the tokens changes a random ViT


def test_without_labels_or_five_classes(folder):
    model = patched_vit(num_classes=3)
    batches = list(evaluate.image_batches(model, folder, batch=8, limit=5))
    assert sum(len(t) for _, t in batches) == 5
    results = evaluate.evaluate(model, batches, [0.5], labels=False)
    assert all(r.top1 is None and r.top5 is None for r in results)
    results = evaluate.evaluate(model, batches, [0.5])
    assert all(r.top1 is not None and r.top5 is None for r in results)   # 3 classes: no top-5
    text = evaluate.table(results)
    assert text.splitlines()[2].startswith("| unpruned | 5 |") and "| - |" in text


def test_bad_arguments_are_named(folder, tmp_path):
    model = patched_vit()
    with pytest.raises(ValueError, match="data must be a folder of images"):
        next(evaluate.image_batches(model, str(tmp_path / "missing"), batch=2))
    with pytest.raises(ValueError, match="data: no images found under"):
        next(evaluate.image_batches(model, str(tmp_path), batch=2))
    with pytest.raises(ValueError, match="z must be"):
        evaluate.evaluate(model, [], [1.5])
    with pytest.raises(TypeError, match="model must be patched by papr_kernels.timm.patch"):
        evaluate.evaluate(torch.nn.Linear(2, 2), [], [0.5])


def test_cli_prints_the_table(folder, capsys, monkeypatch):
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--data", folder, "--no-pretrained",
                 "--batch", "4", "--workers", "0", "--limit", "5", "--z", "0.5", "0.3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("vit_tiny_patch16_224 (random weights), proposal mobileone_s0")
    rows = [line.split(" | ") for line in out[3:]]
    assert [r[0] for r in rows] == ["| unpruned", "| z=0.5", "| z=0.3"]
    assert [r[1] for r in rows] == ["5"] * 3 and rows[0][4] == "100.00"
    patched = []
    patch = papr_timm.patch
    monkeypatch.setattr(papr_timm, "patch", lambda m, p, **kw: patched.append(p) or patch(m, p))
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--data", folder, "--no-pretrained",
                 "--workers", "0", "--limit", "2", "--proposal-size", "160"]) == 0
    assert "proposal mobileone_s0 at 160 px" in capsys.readouterr().out
    assert patched[0].image_size == (160, 160)
    with pytest.raises(SystemExit, match="data must be a folder of images"):
        main(["eval", "--model", "vit_tiny_patch16_224", "--data", folder + "/nothing",
              "--no-pretrained", "--workers", "0"])
