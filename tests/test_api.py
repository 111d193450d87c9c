"""Public API: backend selection, the nn.Module, the command line, torch.compile."""
import os
import subprocess
import sys

import pytest
import torch

import papr_kernels
from papr_kernels import backends, reference, testing
from papr_kernels.__main__ import main


def _inputs(batch=2):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 197, 8, generator=gen), torch.randn(batch, 4, 7, 7, generator=gen)


def test_public_names():
    for name in ["prune", "significance", "keep_count", "available_backends", "PaPr"]:
        assert name in papr_kernels.__all__ and callable(getattr(papr_kernels, name))


def test_torch_backend_is_always_available():
    assert "torch" in papr_kernels.available_backends()
    assert "torch" in papr_kernels.available_backends("cpu")
    assert "torch" in papr_kernels.available_backends("meta")


def test_auto_picks_the_first_runnable_backend_in_preference_order(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    runnable = [n for n in backends._AUTO_ORDER.get("cpu", []) if n in
                papr_kernels.available_backends("cpu")] + ["torch"]
    assert backends.pick(None, "cpu") == runnable[0]


def test_env_variable_overrides_auto(monkeypatch, capsys):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.pick(None, "cpu") == "torch"
    assert main(["info"]) == 0
    assert "prune on cpu tensors runs: torch (PAPR_KERNELS_BACKEND=torch)" in capsys.readouterr().out
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="the environment variable PAPR_KERNELS_BACKEND must be "
                                         "one of .* got 'nonsense'"):
        papr_kernels.prune(*_inputs(), 0.5)
    assert main(["info"]) == 0
    assert "prune on cpu tensors runs: error: the environment variable PAPR_KERNELS_BACKEND" \
        in capsys.readouterr().out


def test_explicit_backend_wins_over_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    assert backends.pick("torch", "cpu") == "torch"


@pytest.mark.parametrize("grid", [None, (14, 14)], ids=["square-grid-found", "grid-given"])
def test_jit_trace_of_prune_and_the_module_replays_on_new_inputs(grid):
    x, f = _inputs()
    traced = torch.jit.trace(lambda x, f: papr_kernels.prune(x, f, 0.5, grid=grid), (x, f),
                             check_trace=False)
    module = torch.jit.trace(papr_kernels.PaPr(0.5), (x, f), check_trace=False)
    x2, f2 = torch.randn_like(x), torch.randn_like(f)
    want = reference.prune(x2, f2, 0.5)
    assert torch.equal(traced(x2, f2), want) and torch.equal(module(x2, f2), want)


class _UserModule(torch.nn.Module):
    def forward(self, x, f):
        return papr_kernels.prune(x, f, 0.5)


def test_jit_script_says_what_to_use_instead():
    """TorchScript cannot compile prune (keyword-only arguments, Python dispatch) nor a patched
    model (its state); it raised its own error at prune's signature, or at a state attribute of
    a patched ConvNeXt, without a word on what works (trace, export, compile: tested)."""
    timm = pytest.importorskip("timm")
    from papr_kernels.timm import patch

    convnext = patch(timm.create_model("convnext_atto", pretrained=False).eval(),
                     torch.nn.Conv2d(3, 8, 32, stride=32))
    eva = patch(timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56,
                                  depth=1).eval(), torch.nn.Conv2d(3, 8, 32, stride=32))
    for what, obj in [("papr_kernels.PaPr", papr_kernels.PaPr(0.5)),
                      ("papr_kernels.prune", papr_kernels.prune),
                      ("papr_kernels.prune", _UserModule()),      # scripted recursively
                      ("a patched ConvNeXt", convnext), ("a patched Eva", eva)]:
        with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile {what}: .*Use "
                                               f"torch.jit.trace, torch.export.export or "
                                               f"torch.compile"):
            torch.jit.script(obj)


@pytest.mark.parametrize("f_size", [7, 14], ids=["resized", "same-size"])
def test_meta_tensors_give_shapes(f_size):
    x, f = torch.empty(3, 197, 8, device="meta"), torch.empty(3, 4, f_size, f_size, device="meta")
    out, idx = papr_kernels.prune(x, f, 0.5, return_indices=True)
    assert out.shape == (3, 99, 8) and out.device.type == "meta"
    assert idx.shape == (3, 98) and idx.dtype == torch.int64


def test_module_matches_function():
    x, f = _inputs()
    layer = papr_kernels.PaPr(z=0.3, num_prefix_tokens=1, order="spatial", return_indices=True)
    out, idx = layer(x, f)
    expected, expected_idx = reference.prune(x, f, 0.3, order="spatial", return_indices=True)
    assert torch.equal(out, expected) and torch.equal(idx, expected_idx)
    assert "z=0.3" in repr(layer)
    assert torch.equal(papr_kernels.PaPr(1.0)(x, f), x)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(z=0.0), ValueError, "z must be"), (dict(order="best"), ValueError, "order must"),
    (dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens must be >= 0"),
    (dict(num_prefix_tokens=1.0), TypeError, "num_prefix_tokens must be an int"),
    (dict(align_corners="no"), TypeError, "align_corners must be a bool"),
    (dict(return_indices=1), TypeError, "return_indices must be a bool"),
], ids=["z", "order", "prefix", "prefix-type", "align", "return_indices"])
def test_module_checks_its_settings_when_built(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        papr_kernels.PaPr(**{"z": 0.5, **kwargs})


def test_significance_and_keep_count_are_the_reference():
    x, f = _inputs()
    scores = papr_kernels.significance(f, (14, 14))
    assert scores.shape == (2, 196) and scores.dtype == torch.float32
    assert torch.equal(scores, reference.significance(f, (14, 14)))
    assert torch.equal(papr_kernels.significance(f, [7, 28], align_corners=False),
                       reference.significance(f, (7, 28), False))
    video = torch.randn(1, 3, 2, 4, 4)
    assert torch.equal(papr_kernels.significance(video, (4, 7, 7)),
                       reference.significance(video, (4, 7, 7)))
    assert papr_kernels.keep_count(197, 0.5) == 98
    assert papr_kernels.keep_count(196, 0.3, 0) == reference.keep_count(196, 0.3, 0) == 58


@pytest.mark.parametrize("call,exc,message", [
    (lambda f: papr_kernels.significance(f.long(), (14, 14)), TypeError, "f must have a floating"),
    (lambda f: papr_kernels.significance(f[0], (14, 14)), ValueError, "f must be 4-D"),
    (lambda f: papr_kernels.significance(f, (0, 14)), ValueError, "grid must be positive"),
    (lambda f: papr_kernels.significance(f, (14, 14, 1)), ValueError, "grid must be 2 ints"),
    (lambda f: papr_kernels.significance(f, None), TypeError, "grid must be a tuple"),
    (lambda f: papr_kernels.significance(f, (14, 14), align_corners=1), TypeError, "align_corners"),
    (lambda f: papr_kernels.keep_count(10, 0.5, 10), ValueError, "num_prefix_tokens must be in"),
    (lambda f: papr_kernels.keep_count(197, -1), ValueError, "z must be a keep ratio"),
    (lambda f: papr_kernels.keep_count(197, "0.5"), TypeError, "z must be a real number"),
    (lambda f: papr_kernels.keep_count(0, 0.5, 0), ValueError, "n must be >= 1"),
    (lambda f: papr_kernels.keep_count(19.7, 0.5), TypeError, "n must be an int"),
], ids=["f-int", "f-3d", "grid-0", "grid-rank", "grid-none", "align", "prefix", "z", "z-type",
        "n-0", "n-float"])
def test_significance_and_keep_count_check_their_arguments(call, exc, message):
    _, f = _inputs()
    with pytest.raises(exc, match=message):
        call(f)


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"papr_kernels      {papr_kernels.__version__}" in text
    assert torch.__version__ in text
    assert any(line.split()[:3] == ["torch", "cpu", "available"] for line in text.splitlines())
    for name in backends.names():
        assert any(line.startswith(name) for line in text.splitlines())


@pytest.mark.parametrize("bf16,fp16", [(True, False), (False, False), (True, True)])
def test_info_says_which_reduced_precision_convolutions_this_cpu_runs_fast(
        monkeypatch, capsys, bf16, fp16):
    from papr_kernels import proposal
    monkeypatch.setitem(proposal._MKLDNN_SUPPORTED, torch.bfloat16, lambda: bf16)
    monkeypatch.setitem(proposal._MKLDNN_SUPPORTED, torch.float16, lambda: fp16)
    assert main(["info"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("CPU convolutions"))
    fast = [name for name, ok in (("bf16", bf16), ("fp16", fp16)) if ok]
    slow = [name for name, ok in (("bf16", bf16), ("fp16", fp16)) if not ok]
    if torch.backends.mkldnn.is_available():
        assert (f"{', '.join(fast)} by oneDNN" in line) == bool(fast), line
        assert (f"{', '.join(slow)} by torch's slow fallback" in line) == bool(slow), line
        assert ("dtype=torch.float32" in line) == bool(slow), line


def test_demo_prints_a_table_and_matches(capsys):
    assert main(["demo", "--batch", "2", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    torch_rows = [r for r in rows if r and r[0] == "torch"]
    assert [r[1:3] for r in torch_rows] == [["0.7", "138"], ["0.5", "99"], ["0.3", "60"]]
    assert all(r[-1] == "yes" for r in rows if r and r[0] in backends.names())


def test_matching_rule_catches_wrong_results():
    x, f = _inputs()
    out, idx = reference.prune(x, f, 0.5, return_indices=True)
    assert testing.mismatches(x, f, 0.5, out, idx, exact_indices=True) == []
    swapped = idx.clone()
    swapped[:, -1] = reference.rank(reference.significance(f, (14, 14)))[:, -1]  # worst patch
    assert any("not one float32 ULP apart" in p for p in testing.mismatches(
        x, f, 0.5, reference.gather(x, swapped, 1), swapped))
    assert testing.mismatches(x, f, 0.5, out * 2, idx)                      # wrong values
    assert testing.mismatches(x, f, 0.5, out, idx.flip(1)[:, :]) != []     # wrong order
    dup = idx.clone()
    dup[:, 1] = dup[:, 0]
    assert testing.mismatches(x, f, 0.5, reference.gather(x, dup, 1), dup)  # repeated index
    with pytest.raises(AssertionError, match="differ"):
        testing.assert_matches_reference(x, f, 0.5, out + 1, idx)
    # z = 1: indices arange(N), x itself; a reordering is caught.
    backwards = torch.arange(196).flip(0).expand(2, -1).contiguous()
    with pytest.raises(AssertionError, match="indices vs reference"):
        testing.assert_matches_reference(x, f, 1.0, reference.gather(x, backwards, 1), backwards)
    # Exact ties (a constant map) rank by index: the higher index first is caught.
    flat = torch.ones(2, 4, 7, 7)
    ties = torch.arange(98, 196).flip(0).expand(2, -1).contiguous()   # 98 tied patches, reversed
    assert any("not one float32 ULP apart" in p for p in testing.mismatches(
        x, flat, 0.5, reference.gather(x, ties, 1), ties))


@pytest.mark.parametrize("gap_ulps,allowed", [(1, True), (2, False)])
def test_matching_rule_allows_a_swap_within_one_float32_ulp_only(gap_ulps, allowed):
    # An unchanged 4x4 grid with align_corners=True: the scores are f's own float32 values.
    f = torch.arange(16, 0, -1, dtype=torch.float32).view(1, 1, 4, 4)  # 16 > 15 > ... > 1
    x = torch.randn(1, 17, 3)
    close = torch.tensor(15.0)
    for _ in range(gap_ulps):
        close = torch.nextafter(close, torch.tensor(16.0))
    f[0, 0, 0, 1] = close                                # patch 1 scores just above patch 2's 14
    f[0, 0, 0, 2] = 15.0
    out, idx = reference.prune(x, f, 0.5, return_indices=True)
    assert idx[0, :3].tolist() == [0, 1, 2]
    swapped = idx.clone()
    swapped[0, 1:3] = torch.tensor([2, 1])
    problems = testing.mismatches(x, f, 0.5, reference.gather(x, swapped, 1), swapped)
    assert (problems == []) == allowed, problems


def test_torch_compile_fullgraph_no_graph_break():
    x, f = _inputs()
    x.requires_grad_()

    def fn(x, f):
        return papr_kernels.prune(x, f, 0.5, backend="torch")

    explanation = torch._dynamo.explain(fn)(x, f)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, f)
    assert torch.equal(out, reference.prune(x, f, 0.5))
    out.sum().backward()
    assert int((x.grad != 0).any(dim=2).sum()) == 2 * 99


def test_import_is_light_and_a_cold_compile_needs_no_graph_break():
    """`import papr_kernels` and a first eager call load neither torch._dynamo (1.5 s), triton
    nor timm; a fresh process whose first call is compiled (fullgraph) still picks its backend
    once, at trace time."""
    code = """if True:
        import sys, torch, papr_kernels
        x, f = torch.randn(2, 197, 8), torch.randn(2, 4, 7, 7)
        out = papr_kernels.prune(x, f, 0.5)
        print(sorted(m for m in ("torch._dynamo", "triton", "timm") if m in sys.modules))
        fn = torch.compile(lambda x, f: papr_kernels.prune(x, f, 0.5), fullgraph=True,
                           backend="eager")
        print(torch.equal(fn(x + 1, f), papr_kernels.reference.prune(x + 1, f, 0.5)))
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "True"], proc.stdout


def test_availability_is_marked_constant_as_torch_marks_it():
    """backends._constant_result sets what torch.compiler.assume_constant_result sets (on this
    torch), without importing torch._dynamo at import."""
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert vars(marked).items() <= vars(backends.unavailable_reason).items()


def test_the_core_needs_neither_timm_nor_triton_nor_numpy():
    """torch is the only dependency (timm and triton are extras): without them (blocked in a
    fresh process) prune runs, `info` reports them missing, and the timm parts say what to
    install."""
    code = """if True:
        import contextlib, io, sys
        for name in ("timm", "triton", "numpy"):
            sys.modules[name] = None                  # `import name` raises ImportError
        import torch, papr_kernels
        from papr_kernels import reference
        from papr_kernels.__main__ import main
        x, f = torch.randn(2, 197, 8), torch.randn(2, 4, 7, 7)
        print(torch.equal(papr_kernels.prune(x, f, 0.5), reference.prune(x, f, 0.5)))
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            main(["info"])
        print([line.split()[0] for line in text.getvalue().splitlines()
               if "not available" in line or "cannot be imported" in line])
        for attempt in (lambda: __import__("papr_kernels.timm"),
                        lambda: papr_kernels.proposal.create("mobileone_s0")):
            try:
                attempt()
            except ImportError as exc:
                print(exc)
        try:
            main(["demo", "--model", "vit_tiny_patch16_224"])
        except SystemExit as exc:
            print(exc)
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "True"
    assert lines[1] == "['triton', 'timm', 'triton']", lines[1]   # the version rows, the backend
    assert lines[2] == "papr_kernels.timm needs timm: pip install timm (or papr_kernels[timm])"
    assert lines[3].startswith("a proposal named 'mobileone_s0' is a timm model: pip install timm")
    assert lines[4].startswith("python -m papr_kernels demo --model: papr_kernels.timm needs timm")


# ---------------------------------------------------------------------------------------------
# PaPr checks z, grid and backend when built; the CLI's --model


import fractions  # noqa: E402


class _FloatSubclass(float):
    pass


@pytest.mark.parametrize("z", [1, fractions.Fraction(1, 2), _FloatSubclass(0.25)],
                         ids=["int", "fraction", "float-subclass"])
def test_module_stores_z_as_the_checked_float(z):
    layer = papr_kernels.PaPr(z)
    assert type(layer.z) is float and layer.z == float(z)
    assert f"z={float(z)}" in repr(layer)
    x, f = _inputs()
    assert torch.equal(layer(x, f), reference.prune(x, f, float(z)))


def test_module_checks_and_keeps_a_given_grid():
    x, f = _inputs()
    layer = papr_kernels.PaPr(0.5, grid=[14, 14])
    assert layer.grid == (14, 14) and all(type(g) is int for g in layer.grid)
    assert torch.equal(layer(x, f), reference.prune(x, f, 0.5, grid=(14, 14)))
    assert papr_kernels.PaPr(0.5, grid=(2, 7, 14)).grid == (2, 7, 14)


@pytest.mark.parametrize("grid,exc,message", [
    (14, TypeError, "grid must be None or a sequence"),
    ("14", TypeError, "grid must be None or a sequence"),
    ((14,), ValueError, "grid must be 2 ints .* or 3 ints"),
    ((14, 0), ValueError, "grid must be positive"),
    ((14.0, 14), ValueError, "grid must be 2 ints"),
], ids=["int", "str", "rank", "zero", "float"])
def test_module_checks_its_grid_when_built(grid, exc, message):
    with pytest.raises(exc, match=message):
        papr_kernels.PaPr(0.5, grid=grid)


def test_module_checks_its_backend_when_built():
    with pytest.raises(ValueError, match="backend must be one of .* got 'nonsense'"):
        papr_kernels.PaPr(0.5, backend="nonsense")
    x, f = _inputs()
    assert torch.equal(papr_kernels.PaPr(0.5, backend="torch")(x, f), reference.prune(x, f, 0.5))


def test_cli_rejects_an_empty_model_name(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--model", "", "--batch", "1", "--repeats", "1"])
    captured = capsys.readouterr()
    assert "--model needs a timm model name" in captured.err and captured.out == ""
