"""The fused glue of the pruned Swin / ConvNeXt blocks (issue 17) and what the patched models
build on it:

- `hierarchical.gather_layer_norm` / `masked_residual` on every backend against explicit
  per-row loops of torch ops (the Triton kernels under TRITON_INTERPRET=1 on CPU): layouts,
  dtypes, no weight / bias / gamma, tiny blocks, k = 0, B = 0, fake tensors, opcheck; the
  composition (autograd, autocast, mixed dtypes) is differentiable and promotes as torch does.
- selection once per forward: `select(proposal_map(f), ...)` is `select(f, ...)` bit for bit on
  every backend, and each pruned stage of a patched model gets `select(f, grid, z,
  order="spatial")`.
- the patched models with the Triton backend against the hand-written dense-and-mask reference
  of tests/test_hierarchical.py; ConvNeXt gathers from a contiguous channels-last map;
  torch.compile(fullgraph=True) of patched models on the Triton backend; the 1x1 convolutions on
  kept rows stay channels-last under Inductor.
"""
import pytest
import torch
import torch.nn.functional as F

import test_hierarchical as th
from conftest import backend_params
from lane_order import lane_order_mean, rounding_map
from papr_kernels import hierarchical as hier

timm = pytest.importorskip("timm")
from papr_kernels import timm as ptimm  # noqa: E402
from papr_kernels.timm import _stages  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
H, W = 5, 7                                   # N = 35 positions


def _dtype_id(dtype):
    return str(dtype).split(".")[-1]


def _x(layout, batch, c, dtype, device, gen):
    """(B, H, W, C) contiguous, an NCHW map seen channels-last, or (B, N, C)."""
    if layout == "nchw":
        x = torch.randn(batch, c, H, W, generator=gen).permute(0, 2, 3, 1)
    elif layout == "4d":
        x = torch.randn(batch, H, W, c, generator=gen)
    else:
        x = torch.randn(batch, H * W, c, generator=gen)
    return x.to(dtype).to(device)


def _indices(batch, k, device, gen, ascending=False):
    rows = [torch.randperm(H * W, generator=gen)[:k] for _ in range(batch)]
    idx = torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)
    return (idx.sort(dim=1).values if ascending else idx).to(device)


def _rows_by_loop(x, idx):
    """(B, k, C): x's rows at idx, one row at a time (positions row-major)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.stack([torch.stack([flat[b, p] for p in idx[b].tolist()])
                        for b in range(x.shape[0])]) if idx.numel() else \
        x.new_empty(x.shape[0], idx.shape[1], x.shape[-1])


def _masked_residual_by_loop(shortcut, idx, values, gamma):
    flat = shortcut.reshape(shortcut.shape[0], -1, shortcut.shape[-1])
    out = torch.zeros(flat.shape, dtype=shortcut.dtype, device=shortcut.device)
    for b in range(flat.shape[0]):
        for j, p in enumerate(idx[b].tolist()):
            branch = values[b, j] if gamma is None else values[b, j] * gamma
            out[b, p] = branch + flat[b, p]
    return out.view(shortcut.shape)


# ---------------------------------------------------------------------------------------------
# The fused ops on every backend


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("layout", ["nchw", "4d", "3d"])
@pytest.mark.parametrize("affine", [True, False])
def test_gather_layer_norm_matches_layer_norm_of_the_rows(backend, layout, dtype, affine):
    """The rows of a loop through torch's layer_norm. The Triton kernel sums the statistics in
    another order than torch's kernel (two passes in fp32, or fp64 for fp64), so it agrees within
    rounding (assert_close's default tolerances of the dtype, as the model tests' 1e-4 in fp32);
    every other backend runs torch's layer_norm on the gathered rows: equal bit for bit."""
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    x = _x(layout, 2, 40, dtype, device, gen)                # C = 40: masked channels too
    idx = _indices(2, 13, device, gen)
    weight = torch.randn(40, generator=gen).to(dtype).to(device) if affine else None
    bias = torch.randn(40, generator=gen).to(dtype).to(device) if affine else None
    got = hier.gather_layer_norm(x, idx, weight, bias, 1e-6, backend=name)
    want = F.layer_norm(_rows_by_loop(x, idx), (40,), weight, bias, 1e-6)
    assert got.shape == (2, 13, 40) and got.dtype == dtype and got.is_contiguous()
    if name == "triton":
        torch.testing.assert_close(got, want)
    else:
        assert torch.equal(got, want)


def test_fused_ops_read_strided_and_expanded_parameters(backend):
    """A weight, bias or gamma seen through strides (a slice, an expanded scalar) is read as
    its values (the Triton kernels read them at c, past an expanded gamma's one element)."""
    name, device = backend
    gen = torch.Generator().manual_seed(8)
    x, idx = _x("4d", 2, 8, torch.float32, device, gen), _indices(2, 6, device, gen)
    weight = torch.randn(16, generator=gen).to(device)[::2]
    bias = torch.randn(8, 2, generator=gen).to(device)[:, 1]
    got = hier.gather_layer_norm(x, idx, weight, bias, 1e-6, backend=name)
    want = F.layer_norm(_rows_by_loop(x, idx), (8,), weight.contiguous(), bias.contiguous(), 1e-6)
    torch.testing.assert_close(got, want)
    values = torch.randn(2, 6, 8, generator=gen).to(device)
    for gamma in (torch.tensor(0.5, device=device).expand(8), weight):
        assert torch.equal(hier.masked_residual(x, idx, values, gamma, backend=name),
                           _masked_residual_by_loop(x, idx, values, gamma.contiguous()))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("layout", ["nchw", "4d", "3d"])
@pytest.mark.parametrize("with_gamma", [True, False])
def test_masked_residual_matches_the_loop_bit_for_bit(backend, layout, dtype, with_gamma):
    """values * gamma + shortcut at the kept positions, rounded as the two torch ops (the
    product first; fp16/bf16 each in fp32, rounded to nearest even), +0.0 at the pruned ones."""
    name, device = backend
    gen = torch.Generator().manual_seed(4)
    shortcut = _x(layout, 3, 24, dtype, device, gen)
    idx = _indices(3, 17, device, gen, ascending=layout == "nchw")
    values = torch.randn(3, 17, 24, generator=gen).to(dtype).to(device)
    gamma = torch.randn(24, generator=gen).to(dtype).to(device) if with_gamma else None
    got = hier.masked_residual(shortcut, idx, values, gamma, backend=name)
    want = _masked_residual_by_loop(shortcut, idx, values, gamma)
    assert got.shape == shortcut.shape and got.is_contiguous()
    assert torch.equal(got, want)
    row_of = hier.kept_row_map(idx, (H, W), backend=name)
    assert torch.equal(hier.masked_residual(shortcut, idx, values, gamma, row_of=row_of,
                                            backend=name), want)
    pruned = torch.ones(3, H * W, dtype=torch.bool, device=device)
    pruned[torch.arange(3, device=device)[:, None], idx] = False
    flat = got.reshape(3, H * W, 24)
    assert not flat[pruned].signbit().any()                 # +0.0, not -0.0


@pytest.mark.parametrize("backend", backend_params("triton"), indirect=True)
def test_triton_fused_tiny_blocks_empty_work_and_no_launch(backend, monkeypatch):
    """Blocks smaller than k, N and C, several channel chunks: every mask of both kernels; k = 0
    writes zeros; B = 0 launches nothing."""
    from papr_kernels.ops.triton import common
    from papr_kernels.ops.triton import rows as tr
    _, device = backend
    monkeypatch.setattr(common, "BLOCK_OVERRIDE", dict(BLOCK_R=4, BLOCK_P=4, BLOCK_C=4, BLOCK_M=4))
    monkeypatch.setattr(common, "SPLIT_OVERRIDE", (1, 3))
    gen = torch.Generator().manual_seed(5)
    x = _x("nchw", 2, 11, torch.bfloat16, device, gen)
    idx = _indices(2, 10, device, gen)
    v, g = torch.randn(2, 10, 11, generator=gen).bfloat16(), torch.randn(11, generator=gen).bfloat16()
    want = _masked_residual_by_loop(x, idx, v.to(device), g.to(device))
    assert torch.equal(tr.masked_residual(x, idx, v.to(device), g.to(device)), want)
    assert torch.equal(tr.masked_residual(x, idx, v.to(device), g.to(device),
                                          row_of=hier.kept_row_map(idx, (H, W))), want)
    torch.testing.assert_close(tr.gather_layer_norm(x, idx, g.to(device), None, 1e-5),
                               F.layer_norm(_rows_by_loop(x, idx), (11,), g.to(device), None, 1e-5))
    assert torch.equal(tr.masked_residual(x, idx[:, :0], v[:, :0].to(device), None),
                       torch.zeros(x.shape, dtype=x.dtype))
    assert tr.gather_layer_norm(x, idx[:, :0], None, None, 1e-5).shape == (2, 0, 11)
    launches = {"n": 0}
    for kernel in (tr._gather_layer_norm_kernel, tr._masked_residual_kernel):
        def counting(*args, _original=kernel.run, **kwargs):
            launches["n"] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", counting)
    assert tr.masked_residual(x[:0], idx[:0], v[:0].to(device), None).shape == (0, H, W, 11)
    assert tr.gather_layer_norm(x[:0], idx[:0], None, None, 1e-5).shape == (0, 10, 11)
    assert launches["n"] == 0


@pytest.mark.parametrize("backend", backend_params("triton"), indirect=True)
def test_fused_custom_ops_opcheck_and_fake_tensors(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode
    _, device = backend
    gen = torch.Generator().manual_seed(6)
    x, idx = _x("nchw", 2, 6, torch.float32, device, gen), _indices(2, 5, device, gen)
    v, g = torch.randn(2, 5, 6, device=device), torch.randn(6, device=device)
    row_of = hier.kept_row_map(idx, (H, W))
    ops = torch.ops.papr_kernels
    for op, args in ((ops.triton_gather_layer_norm.default, (x, idx, g, g, 1e-5)),
                     (ops.triton_gather_layer_norm.default, (x, idx, None, None, 1e-5)),
                     (ops.triton_masked_residual.default, (x, row_of, v, g)),
                     (ops.triton_masked_residual.default, (x, row_of, v, None))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    with FakeTensorMode():
        x = torch.empty(4, 768, 7, 7, dtype=torch.bfloat16, device=device).permute(0, 2, 3, 1)
        idx = torch.empty(4, 31, dtype=torch.int64, device=device)
        rows = ops.triton_gather_layer_norm(x, idx, None, None, 1e-6)
        assert rows.shape == (4, 31, 768) and rows.dtype == x.dtype and rows.is_contiguous()
        row_of = torch.empty(4, 49, dtype=torch.int32, device=device)
        out = ops.triton_masked_residual(x, row_of, rows, None)
        assert out.shape == x.shape and out.is_contiguous()


def test_composition_is_differentiable_and_promotes(backend):
    """With autograd recording (training) or dtypes that differ (autocast), the fused ops are the
    composition of the differentiable row ops: float64 gradcheck, torch's type promotion."""
    name, device = backend
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=gen).to(device)
    x = x.permute(0, 2, 3, 1).requires_grad_()              # (B, H, W, C) = (2, 2, 3, 3)
    idx = torch.tensor([[4, 0, 2, 5], [1, 2, 3, 0]], device=device)
    v = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    g = torch.randn(3, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    torch.autograd.gradcheck(lambda x, w: hier.gather_layer_norm(x, idx, w, None, 1e-5,
                                                                 backend=name), (x, g))
    row_of = hier.kept_row_map(idx, (2, 3), backend=name)
    torch.autograd.gradcheck(lambda s, v, g: hier.masked_residual(s, idx, v, g, row_of=row_of,
                                                                  backend=name), (x, v, g))
    half = v.detach().bfloat16()
    got = hier.masked_residual(x.detach().float(), idx, half, g.detach().float(), backend=name)
    want = _masked_residual_by_loop(x.detach().float(), idx, half, g.detach().float())
    assert got.dtype == torch.float32 and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Selection once per forward


def test_select_from_the_proposal_map_equals_select_from_f(backend):
    """Every Swin-T / ConvNeXt-T stage grid from a 7x7 map of 64 channels, and a grid finer
    than f: the positions from f's float64 channel mean are f's, bit for bit (both orders on
    the smaller grids: the interpreted Triton sort of 56 x 56 takes seconds)."""
    name, device = backend
    f = torch.randn(3, 64, 7, 7, generator=torch.Generator().manual_seed(8)).to(device)
    m = hier.proposal_map(f)
    assert m.shape == (3, 1, 7, 7) and m.dtype == torch.float64 and not m.requires_grad
    for grid, z, orders in (((56, 56), 0.65, ("spatial",)), ((28, 28), 0.65, ("spatial",)),
                            ((14, 14), 0.5, ("spatial", "score")),
                            ((7, 7), 0.65, ("spatial", "score")), ((9, 5), 0.3, ("score",))):
        for order in orders:
            got = hier.select(m, grid, z, order=order, backend=name)
            assert torch.equal(got, hier.select(f, grid, z, order=order, backend=name)), grid
            if order == "spatial":
                assert bool((got.diff(dim=1) > 0).all())


def _maps():
    """f for the proposal map: random and order-deciding (tests/lane_order.py), fp32 and bf16,
    contiguous and channels_last, one to three rows."""
    gen = torch.Generator().manual_seed(9)
    yield torch.randn(3, 64, 7, 7, generator=gen)
    yield torch.randn(1, 1024, 7, 7, generator=gen).to(torch.bfloat16)
    for channels in (21, 130):
        for dtype in (torch.float32, torch.bfloat16):
            f = rounding_map(2, channels, (5, 6), dtype, seed=channels)
            yield f
            yield f.contiguous(memory_format=torch.channels_last)


def test_the_proposal_map_is_the_kernels_channel_mean(backend):
    """`proposal_map` on a compiled backend is channel_sum's mean (lane order, written out in
    tests/lane_order.py) bit for bit, so Swin / ConvNeXt keep the same positions on CPU and GPU;
    on "torch" it is torch's mean (the reference). Also where the summation order decides the
    float32 means: the positions from the map are f's own on that backend."""
    name, device = backend
    for f in _maps():
        m = hier.proposal_map(f.to(device), backend=name)
        assert m.shape == (f.shape[0], 1, *f.shape[2:]) and m.dtype == torch.float64
        want = f.double().mean(dim=1, keepdim=True) if name == "torch" else \
            lane_order_mean(f).view(m.shape)
        assert torch.equal(m.cpu(), want), (name, tuple(f.shape), f.dtype)
        if f.shape[1] > 16:
            for order in ("score", "spatial"):
                got = hier.select(m, (5, 6), 0.9, order=order, backend=name)
                assert torch.equal(got, hier.select(f.to(device), (5, 6), 0.9, order=order,
                                                    backend=name))


@pytest.mark.parametrize("name", ["swin", "convnext"])
def test_each_stage_gets_f_s_positions_in_ascending_order(name, monkeypatch):
    """The proposal's features are reduced once; each pruned stage's positions are
    select(f, grid, z, order="spatial") of the proposal's own features."""
    model = th.MODELS[name][0]()
    proposal, images = th._proposal(), torch.randn(2, 3, th.IMG, th.IMG)
    used, select, maps = [], hier.select, []

    def recording_select(f, grid, *args, **kwargs):
        used.append((tuple(grid), select(f, grid, *args, **kwargs)))
        return used[-1][1]

    def recording_map(f):
        maps.append(f)
        return proposal_map(f)

    proposal_map = hier.proposal_map
    monkeypatch.setattr(hier, "select", recording_select)
    monkeypatch.setattr(hier, "proposal_map", recording_map)
    ptimm.patch(model, proposal, 0.65, stages=(0, 2, 3))
    with torch.no_grad():
        model(images)
    assert len(maps) == 1
    f = proposal(images)
    assert [grid for grid, _ in used] == [(56, 56), (14, 14), (7, 7)]
    for grid, got in used:
        assert torch.equal(got, select(f, grid, 0.65, order="spatial"))


# ---------------------------------------------------------------------------------------------
# The patched models on the Triton backend (interpreted on CPU), channels-last ConvNeXt


def _small(name):
    """(model, images): the reduced models of tests/test_hierarchical.py at a small size."""
    if name == "swin":
        return th._swin(img_size=112), torch.randn(2, 3, 112, 112)
    return th.MODELS[name][0](), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("backend", backend_params("triton"), indirect=True)
@pytest.mark.parametrize("name", ["swin", "convnext", "convnext-conv_mlp", "convnextv2", "caformer",
                                  "poolformer"])
def test_patched_models_on_triton_match_the_dense_and_mask_reference(backend, name,
                                                                      monkeypatch):
    """...and each pruned stage maps its positions to kept rows once, for all its blocks (the
    dense kernels build no map of their own); Swin's and MetaFormer's inference forward adds
    back in place, which reads no map, so their stages build none (a recorded forward, out of
    place, builds them)."""
    from papr_kernels.ops.triton import rows as tr
    model, images, expected = _patched_small(name, "triton", monkeypatch)
    with torch.no_grad():
        selects = _counting(monkeypatch, hier, "select")
        maps = _counting(monkeypatch, tr._kept_row_map_kernel, "run")
        got = model(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    adds_back = name in ("swin", "caformer", "poolformer")
    assert selects["n"] == 4 and maps["n"] == (0 if adds_back else 4)
    if adds_back:
        recorded = model(images)                     # grad enabled: the out-of-place add back
        torch.testing.assert_close(recorded.detach(), expected, rtol=1e-4, atol=1e-4)
        assert recorded.requires_grad and maps["n"] == 4


def _patched_small(name, backend, monkeypatch):
    """(model, images, expected): the reduced model `name` patched with z = 0.5 on every stage
    to run on `backend`, and the hand-written dense-and-mask reference's output for the images."""
    monkeypatch.setenv("PAPR_KERNELS_BACKEND", backend)
    model, images = _small(name)
    by_hand, proposal = th.MODELS[name][2], th._proposal()
    with torch.no_grad():
        expected = by_hand(model, proposal, images, 0.5, (0, 1, 2, 3))
    ptimm.patch(model, proposal, 0.5)
    return model, images, expected


def _counting(monkeypatch, owner, name):
    """Count the calls of owner.name (a module's function, a kernel's launches)."""
    calls, original = {"n": 0}, getattr(owner, name)

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


@pytest.mark.parametrize("backend", backend_params("cpp"), indirect=True)
@pytest.mark.parametrize("name", ["convnext", "convnext-conv_mlp", "convnextv2"])
def test_patched_convnext_on_cpp_runs_the_fused_block_output(backend, name, monkeypatch):
    """Each pruned block's output is the C++ masked_residual (one call per block, the stage's
    row map passed in); a recorded forward (training) composes the differentiable row ops
    instead. Both match the hand-written dense-and-mask reference."""
    from papr_kernels.ops import extension
    model, images, expected = _patched_small(name, "cpp", monkeypatch)
    with torch.no_grad():
        fused = _counting(monkeypatch, extension, "_masked_residual_op")
        maps = _counting(monkeypatch, hier, "kept_row_map")
        got = model(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    blocks = sum(len(stage.blocks) for stage in model.stages)
    assert fused["n"] == blocks
    assert maps["n"] == 4
    recorded = model(images)
    torch.testing.assert_close(recorded.detach(), expected, rtol=1e-4, atol=1e-4)
    assert recorded.requires_grad and fused["n"] == blocks


@pytest.mark.parametrize("name", ["convnext", "convnext-conv_mlp"])
def test_convnext_gathers_from_contiguous_channels_last_maps(name, monkeypatch):
    """Each pruned block reads its conv_dw output as a contiguous (B, H, W, C) map (whole rows,
    no channel stride), for a channels-first and a channels-last model; same output as the
    reference either way."""
    model, images = _small(name)
    proposal, seen = th._proposal(), []
    gather_norm = _stages.gather_norm

    def recording(norm, x, indices, channels_first=False):
        seen.append(x.is_contiguous())
        return gather_norm(norm, x, indices, channels_first)

    monkeypatch.setattr(_stages, "gather_norm", recording)
    with torch.no_grad():
        expected = th.MODELS[name][2](model, proposal, images, 0.5, (0, 1, 2, 3))
        ptimm.patch(model, proposal, 0.5)
        got = model(images)
        model.to(memory_format=torch.channels_last)
        got_cl = model(images.contiguous(memory_format=torch.channels_last))
    assert seen == [True] * 10                                     # 5 blocks, two forwards
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_cl, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params("triton"), indirect=True)
def test_patched_convnext_on_triton_compiles_without_graph_breaks(backend, monkeypatch):
    """fullgraph=True through the fused custom ops (aot_eager: tracing, fast enough for CI;
    Swin's ops are a subset: gather_layer_norm and the in-place scatter_back); the graph builds
    one kept-row map per pruned stage (4) for the 5 blocks' masked_residual."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_compiler
    monkeypatch.setenv("PAPR_KERNELS_BACKEND", "triton")
    model, images = _small("convnext")
    ops = []

    def recording(gm, _):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    backend = aot_autograd(fw_compiler=make_boxed_compiler(recording))
    torch._dynamo.reset()
    with torch.no_grad():
        ptimm.patch(model, th._proposal(), 0.5)
        eager = model(images)
        compiled = torch.compile(model, fullgraph=True, backend=backend)(images)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert ops.count("papr_kernels.triton_kept_row_map.default") == 4
    assert ops.count("papr_kernels.triton_masked_residual.default") == 5



@pytest.mark.skipif(tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 14),
                    reason="torch < 2.14: Inductor re-strides the weights' channels-last views "
                           "too (seen on 2.11), the first convolution stays NCHW there")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_convs_on_kept_rows_stay_channels_last_under_inductor(dtype, monkeypatch):
    """The 1x1 convolutions of a branch run on the kept rows (`_stages.on_rows_as_map`:
    MetaFormer's NCHW stages, ConvNeXt conv_mlp) write channels-last outputs under Inductor as
    in eager, with eager's values. Inductor gives the map's size-1 dim stride 0, which ATen does
    not read as channels-last: without the weights' channels-last views the first convolution
    wrote NCHW (a transposing copy per convolution)."""
    from torch._inductor.select_algorithm import extern_kernels
    outputs, convolution = [], extern_kernels.convolution
    monkeypatch.setattr(extern_kernels, "convolution",
                        lambda *args, **kwargs: outputs.append(convolution(*args, **kwargs)) or
                        outputs[-1])
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 8, 1)).to(dtype)
    norm = torch.nn.LayerNorm(8).to(dtype)
    rows = torch.randn(2, 37, 8).to(dtype)

    def branch(rows):
        return _stages.on_rows_as_map(mlp, norm(rows * 2))

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected = branch(rows)
            got = torch.compile(branch)(rows)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    assert [tuple(o.shape) for o in outputs] == [(2, 32, 1, 37), (2, 8, 1, 37)]
    assert [o.stride(1) for o in outputs] == [1, 1]                 # channels-last


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
def test_fused_ops_check_what_the_kernels_read(backend):
    """Values of the wrong shape or type raise before any kernel runs, on every backend and
    whether or not autograd records (the composition path too, where torch would broadcast); a
    gamma or bias that is not one value per channel takes the composition (torch's
    broadcasting); a bias that is not one value per channel is refused, naming it."""
    name, device = backend
    gen = torch.Generator().manual_seed(9)
    shortcut, idx = _x("4d", 2, 6, torch.float32, device, gen), _indices(2, 5, device, gen)
    v = torch.randn(2, 5, 6, generator=gen).to(device)
    for bad in (v[:, :4], v[:, :1], v[0], v[:, :, :1], v[:, :1].clone().requires_grad_()):
        with pytest.raises(ValueError, match="values must be"):
            hier.masked_residual(shortcut, idx, bad, backend=name)
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        hier.masked_residual(shortcut, idx, [1.0], backend=name)
    with pytest.raises(TypeError, match="values must have a floating dtype"):
        hier.masked_residual(shortcut, idx, v.to(torch.complex64), backend=name)
    scalar = torch.tensor([2.0], device=device)
    assert torch.equal(hier.masked_residual(shortcut, idx, v, scalar, backend=name),
                       _masked_residual_by_loop(shortcut, idx, v, scalar))
    assert torch.equal(hier.masked_residual(shortcut, idx, v, scalar[0], backend=name),
                       _masked_residual_by_loop(shortcut, idx, v, scalar))
    with pytest.raises(ValueError, match=r"bias must be None, or \(C,\) = \(6,\)"):
        hier.gather_layer_norm(shortcut, idx, None, scalar, 1e-5, backend=name)
