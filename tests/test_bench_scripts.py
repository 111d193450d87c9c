"""The GPU per-call benchmark (benchmarks/per_call_gpu.py) runs end to end in its CPU dry run, so
that a lent GPU, which is rare, gets a script that works: every provider timed forward and
forward + backward, and the tables built from the timings."""
import json
import os
import re
import site
import statistics
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import per_call_gpu  # noqa: E402
import report  # noqa: E402
from conftest import requires  # noqa: E402


@pytest.mark.parametrize("f_layout", ["contiguous", "channels_last"])
def test_per_call_gpu_dry_run_times_every_provider_and_reports_the_targets(f_layout):
    times = per_call_gpu.measure(torch.float32, 2, rounds=2, device="cpu", f_layout=f_layout)
    assert set(times) == {"floor", "user eager", "auto"}   # cuda / triton: on a GPU only
    for t in times.values():
        assert len(t["host"]) == 2 and min(t["host"]) > 0
        assert len(t["fwdbwd"]) == 2 and min(t["fwdbwd"]) > 0
        # the host's own time: the same calls, read before the synchronize
        assert all(0 < i <= w for i, w in zip(t["issue"], t["host"]))
        assert all(0 < i <= w for i, w in zip(t["fwdbwd_issue"], t["fwdbwd"]))
        assert t["gpu"] is None                              # CUDA graphs: on a GPU only
    results = {("fp32", 2): times}
    table = per_call_gpu.table(results, "cpp")
    assert table.splitlines()[0].startswith("| dtype | B | floor GPU | user eager host / GPU | "
                                            "auto (cpp) host / GPU |")
    assert table.splitlines()[2].startswith("| fp32 | 2 | - | ")
    targets = per_call_gpu.targets(results).splitlines()[2]
    host_us = per_call_gpu._med(times["auto"]["host"]) * 1e6
    alone_us = per_call_gpu._med(times["auto"]["issue"]) * 1e6
    assert targets.startswith(f"| fp32 | 2 | {alone_us:.1f} us, {host_us:.1f} us (")


def test_per_call_gpu_backward_writes_the_gradient_as_a_training_step_does():
    """Each timed forward + backward starts from no gradient (optimizer.zero_grad's default):
    accumulating into x.grad added a read-modify-write of all of x per call (~0.45 ms at
    B = 1024 fp32 on an H200) that the floor does not pay."""
    x, f = per_call_gpu.pb.inputs(per_call_gpu.SHAPE, torch.float32, 2, "cpu")
    x = x.detach().clone().requires_grad_(True)
    grad = torch.ones(2, per_call_gpu.KEPT_TOKENS, per_call_gpu.SHAPE.channels)
    run = per_call_gpu.with_backward("auto", per_call_gpu.forward_providers("cpu")["auto"])
    for _ in range(3):
        run(x, f, grad)
    # d(sum of the kept rows) / dx: 1 at the kept rows (prefix token included), 0 elsewhere
    kept_rows = (x.grad == 1).all(dim=2).sum(dim=1)
    assert kept_rows.tolist() == [per_call_gpu.KEPT_TOKENS] * 2
    assert ((x.grad == 0) | (x.grad == 1)).all()


def test_per_call_gpu_times_forward_and_backward_after_their_warm_up(monkeypatch):
    """The calls per timed block are sized from warm calls: a first forward + backward that
    compiles its kernels (~1 s for Triton's) made it 1 call per block, then timed with a
    synchronize around each call, which is not calls issued back to back."""
    sized = []

    def calls_per_block(fn, target_s, device="cpu"):
        sized.append(fn)
        return 2

    monkeypatch.setattr(per_call_gpu.pb, "calls_per_block", calls_per_block)
    seen = []
    providers = per_call_gpu.forward_providers("cpu")
    monkeypatch.setattr(per_call_gpu, "forward_providers", lambda device: {
        "auto": lambda x, f: seen.append(len(sized)) or providers["auto"](x, f),
        "floor": providers["floor"]})
    per_call_gpu.measure(torch.float32, 2, rounds=1, device="cpu")
    # the auto forward ran (warm-up, forward and forward + backward) before any block was sized
    assert seen[:2] == [0, 0]


@requires("cpp", "cpu")
@requires("triton", "cpu")
def test_per_call_triton_python_path_restores_the_kernels():
    import per_call
    from papr_kernels.ops.triton import prune as triton_prune
    kernels = triton_prune._prune_fwd_kernel, triton_prune._prune_bwd_kernel
    lines = per_call.triton_python_path(rounds=1).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| forward", "| forward + backward", "| cpp forward (kernels run)"]
    assert all(float(line.split(" | ")[1].split()[0]) > 0 for line in lines[2:])
    assert (triton_prune._prune_fwd_kernel, triton_prune._prune_bwd_kernel) == kernels


def _e2e_gpu_run(path, command, cases):
    """A pytest-benchmark JSON of test_e2e_gpu cases: (model, mode, B, provider, z, median_s)."""
    benchmarks = [{
        "name": f"test_e2e_gpu[{model}-bf16-{mode}-B{batch}-{provider}]",
        "stats": {"median": 2 * median, "iqr": 0.0, "rounds": 10},   # wall: the events win
        "extra_info": dict(suite="e2e-gpu", model=model, shape=model, batch=batch,
                           provider=provider, z=z, mode=mode, dtype="bf16", device="cuda",
                           event_median_s=median)}
        for model, mode, batch, provider, z, median in cases]
    machine = {"papr_kernels": {"slug": "cuda-nvidia-h200", "device": "cuda", "gpu": "NVIDIA H200",
                                "command": command}}
    with open(path, "w") as fh:
        json.dump({"machine_info": machine, "commit_info": {"id": "0123456789abcdef"},
                   "datetime": "2026-12-02T03:00:00", "benchmarks": benchmarks}, fh)
    return str(path)


def test_report_combines_the_e2e_runs_and_checks_the_targets_of_issues_12_and_17(tmp_path):
    vit, swin = "vit_base_patch16_224", "swin_tiny_patch4_window7_224"
    eager = _e2e_gpu_run(tmp_path / "eager.json", "pytest eager", [
        (vit, "eager", 256, "unpruned", 1.0, 0.024),
        (vit, "eager", 256, "papr-z0.5", 0.5, 0.015),
        (vit, "eager", 256, "bound-z0.5", 0.5, 0.013),
        (vit, "eager", 256, "proposal", None, 0.003),
        (vit, "eager", 256, "unpruned-again", 1.0, 0.0246),
        (swin, "eager", 256, "unpruned", 1.0, 0.010),
        (swin, "eager", 256, "papr-z0.65", 0.65, 0.0095),
        (swin, "eager", 256, "papr-z0.5", 0.5, 0.0096)])
    compiled = _e2e_gpu_run(tmp_path / "compile.json", "pytest compile", [
        (vit, "compile", 256, "unpruned", 1.0, 0.020),
        (vit, "compile", 256, "papr-z0.5", 0.5, 0.0124)])
    combined = str(tmp_path / "all.json")
    assert report.main([eager, compiled, "--combined", combined, "--no-plot"]) == 0
    md = (tmp_path / "all.md").read_text()
    assert "command: `pytest eager; pytest compile`" in md
    cells = [line.split(" | ") for line in md.splitlines() if line.startswith("| ")]
    rows = {(c[0][2:], c[2]): c for c in cells if len(c) == 13}
    # 256 images / 15 ms; speed-up 24 / 15 and 20 / 12.4; PaPr / bound 13 / 15; proposal 3 / 15;
    # the unpruned model timed again: 24.6 / 24 - 1
    assert rows[(vit, "eager")][3:] == ["256", "0.5", "10667", "19692", "17067", "1.60x", "1.85x",
                                        "0.87", "20%", "+2.5% |"]
    assert rows[(vit, "compile")][-1] == "- |"
    assert rows[(vit, "compile")][8] == "1.61x"
    targets = {c[0][2:]: c[1:] for c in cells if len(c) == 3}
    assert targets[f"{vit} eager, B=256, z=0.5: PaPr >= 1.45x unpruned"] == ["1.60x", "yes |"]
    assert targets[f"{vit} compile, B=256, z=0.5: PaPr >= 1.6x unpruned"] == ["1.61x", "yes |"]
    assert targets[f"{vit} eager, B=256, z=0.5: PaPr / bound >= 0.8"] == ["0.87", "yes |"]
    # issue 17: 10 / 9.5 and 10 / 9.6; ConvNeXt-T and the compiled hierarchical rows absent
    assert targets[f"{swin} eager, B=256, z=0.65: PaPr >= 1x unpruned (issue 17)"] == \
        ["1.05x", "yes |"]
    assert targets[f"{swin} eager, B=256, z=0.5: PaPr >= 1.05x unpruned (issue 17)"] == \
        ["1.04x", "no |"]
    assert targets["convnext_tiny eager, B=256, z=0.5: PaPr >= 1.2x unpruned (issue 17)"] == \
        ["not in this run", "not measured |"]
    assert targets[f"{swin} compile, B=256, z=0.65: PaPr >= 1x unpruned (issue 17)"] == \
        ["not in this run", "not measured |"]


def test_report_combines_the_runs_it_can_read(tmp_path, capsys):
    vit = "vit_base_patch16_224"
    whole = _e2e_gpu_run(tmp_path / "a.json", "pytest a", [
        (vit, "eager", 256, "unpruned", 1.0, 0.024), (vit, "eager", 256, "papr-z0.5", 0.5, 0.015)])
    cut = tmp_path / "b.json"
    cut.write_text(open(whole).read()[:100])   # a run killed while pytest-benchmark wrote it
    assert report.main([whole, str(cut), "--combined", str(tmp_path / "all.json"),
                        "--no-plot"]) == 0
    assert f"{cut} left out, not a complete JSON" in capsys.readouterr().err
    assert "| eager | 256 | 0.5 | 10667 | - | 17067 | 1.60x |" in (tmp_path / "all.md").read_text()


def test_report_refuses_several_results_without_a_combined_path(tmp_path):

    runs = [_e2e_gpu_run(tmp_path / f"{i}.json", "pytest", []) for i in range(2)]
    with pytest.raises(SystemExit):
        report.main(runs)


@pytest.mark.slow
def test_gpu_check_dry_run_measures_the_checkout_and_brings_back_every_table(tmp_path):
    """tools/gpu_check.sh percall e2e, as the lent GPU runs it (python3 without this package
    installed: `-S` leaves out the editable install's .pth) on tiny CPU cases: both per-call
    tables and the end-to-end tables on stdout (only the output's tail comes back), and in $OUT
    at most 8 plain files with plain names (what the device tool brings back)."""
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", OUT=str(tmp_path / "out"),
               PY=f"{sys.executable} -S", PYTHONPATH=os.pathsep.join(site.getsitepackages()))
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    run = subprocess.run(["bash", "tools/gpu_check.sh", "percall", "e2e"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    out = run.stdout
    assert out.count("| dtype | B | floor GPU | user eager host / GPU | auto (cpp) host / GPU |") \
        == 2, out + run.stderr
    assert "| fp32 | 2 | - | " in out
    assert "bench-e2e-gpu rc=0" in out and "bench-e2e-gpu-hierarchical rc=0" in out
    table = out[out.index("**End to end, side by side**"):]
    assert "| vit_tiny_patch16_224-depth2 | fp32 | eager | 1 | 0.5 |" in table
    assert "| convnext_atto-depths1111 | fp32 | eager | 1 | 0.5 |" in table
    files = sorted(os.listdir(tmp_path / "out"))
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {"bench-e2e-gpu.json", "bench-e2e-gpu-hierarchical.json", "per-call-gpu.md"} <= \
        set(files)


class _FakeTimed:
    """Stands for papr_bench.Timed on a GPU: each call takes `seconds[i]` (the last repeats)
    and records it as its CUDA-event time."""

    def __init__(self, seconds):
        self.seconds, self.event_times_s = list(seconds), []

    def __call__(self):
        s = self.seconds[min(len(self.event_times_s), len(self.seconds) - 1)]
        time.sleep(s)
        self.event_times_s.append(s)

    def event_median_s(self):
        return statistics.median(self.event_times_s)


def test_e2e_gpu_warms_up_past_idle_clocks_and_times_enough_rounds():
    test_e2e = pytest.importorskip("test_e2e")   # needs timm
    # a first call that compiles (0.5 s), then 2 ms calls: 0.1 s more of warm-up, and rounds
    # for 0.25 s of them capped at 50 (the compile call does not count)
    timed = _FakeTimed([0.5, 0.002])
    assert test_e2e.warm_up(timed, 1, quick=False) == 50
    assert len(timed.event_times_s) > 10   # ~0.1 s of 2 ms calls (sleep overshoots)
    # 60 ms calls (ViT-L at B = 256): at least 10 rounds
    timed = _FakeTimed([0.06])
    assert test_e2e.warm_up(timed, 1, quick=False) == 10 and len(timed.event_times_s) >= 3
    # 20 ms: 0.25 / 0.02 rounds
    assert test_e2e.warm_up(_FakeTimed([0.02]), 3, quick=False) == 13
    timed = _FakeTimed([0.002])
    assert test_e2e.warm_up(timed, 1, quick=True) == 2 and len(timed.event_times_s) == 1


def test_e2e_gpu_cases_share_their_images_drawn_once():
    test_e2e = pytest.importorskip("test_e2e")
    images = test_e2e.gpu_images(2, "cpu", torch.bfloat16)
    expected = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert images.dtype == torch.bfloat16 and torch.equal(images, expected.bfloat16())
    assert test_e2e.gpu_images(2, "cpu", torch.bfloat16) is images   # not drawn again


def test_e2e_gpu_cases_time_each_papr_before_its_bound_and_the_baseline_twice():
    test_e2e = pytest.importorskip("test_e2e")
    cases = test_e2e.gpu_cases("cuda", quick=False)
    vit_b = [p for m, dt, mode, b, p in cases
             if (m, mode, b) == ("vit_base_patch16_224", "compile", 256)]
    assert vit_b == ["unpruned", "papr-z0.7", "bound-z0.7", "papr-z0.5", "bound-z0.5",
                     "papr-z0.3", "bound-z0.3", "proposal", "unpruned-again"]
    swin = [p for m, dt, mode, b, p in cases
            if (m, dt, mode, b) == ("swin_tiny_patch4_window7_224", "bf16", "eager", 256)]
    assert swin == ["unpruned", "papr-z0.65", "papr-z0.5", "proposal", "unpruned-again"]
    models = [m for m, *_ in cases]
    assert [m for i, m in enumerate(models) if i == 0 or models[i - 1] != m] == \
        list(test_e2e.GPU_MODELS)   # each model's cases together (one model cached at a time)
