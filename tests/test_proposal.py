"""The proposal's `compiled` switch (issue 12: on a GPU the proposal is a large share of a pruned
model's time; torch.compile is the lever that keeps its output), its opt-in `image_size` (the
lever that changes it) and the wrapper's guarantees. Counted with dynamo's
CompileCounter backend, so no Inductor compile runs here."""
import fractions
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

from papr_kernels import proposal as papr_proposal


class Features(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 32, stride=32)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _images(batch=2):
    return torch.randn(batch, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def test_a_compiled_proposal_gives_the_features_of_the_network_and_compiles_once_per_shape():
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = papr_proposal.create(Features(), compiled={"backend": counter})
    plain = papr_proposal.create(Features())
    images = _images()
    for _ in range(3):
        assert torch.equal(compiled(images), plain(images))
    assert counter.frame_count == 1
    assert torch.equal(compiled(_images(batch=3)), plain(_images(batch=3)))
    assert counter.frame_count == 2  # static shapes: a new batch size compiles again


def test_a_proposal_is_not_compiled_unless_asked():
    torch._dynamo.reset()
    proposal = papr_proposal.create(Features())
    proposal(_images())
    assert proposal.__dict__["_compiled_network"] is None


def test_a_compiled_proposal_inside_a_compiled_model_is_traced_with_it():
    torch._dynamo.reset()
    inner, outer = CompileCounter(), CompileCounter()
    proposal = papr_proposal.create(Features(), compiled={"backend": inner})
    images = _images()
    expected = papr_proposal.create(Features())(images)
    got = torch.compile(lambda x: proposal(x) * 2, backend=outer, fullgraph=True)(images)
    assert torch.equal(got, expected * 2)
    assert (outer.frame_count, inner.frame_count) == (1, 0)


def test_a_compiled_proposal_pickles_without_its_compiled_function():
    torch._dynamo.reset()
    proposal = papr_proposal.create(Features(), compiled={"backend": CompileCounter()})
    images = _images()
    before = proposal(images)
    assert proposal.__dict__["_compiled_network"] is not None
    assert "_compiled_network" not in proposal.state_dict()
    buffer = io.BytesIO()
    torch.save(proposal, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.__dict__["_compiled_network"] is None and loaded.compiled
    assert torch.equal(loaded(images), before)


def test_compiled_must_be_a_bool_or_compile_arguments():
    with pytest.raises(TypeError, match="compiled"):
        papr_proposal.create(Features(), compiled="yes")


def test_an_image_network_runs_channels_last_on_cpu():
    """oneDNN's NHWC convolutions are the fast ones on CPU too (MobileOne-S0, B = 8: ~1.4x): the
    network's conv weights become channels_last when it is wrapped, the images follow, and the
    features are the NCHW network's within float rounding (the convolutions sum in another
    order). A callable without weights gets its images as they are."""
    network = Features()
    reference_features = torch.relu(network.conv(_images()))   # NCHW weights and images
    wrapped = papr_proposal.create(network)
    assert network.conv.weight.is_contiguous(memory_format=torch.channels_last)
    formats = []
    network.register_forward_pre_hook(lambda m, a: formats.append(
        (a[0].is_contiguous(memory_format=torch.channels_last), a[0].is_contiguous())))
    torch.testing.assert_close(wrapped(_images()), reference_features)
    assert formats == [(True, False)]        # the NCHW images reached the network as NHWC
    seen = []
    papr_proposal.create(lambda x: seen.append(x.is_contiguous()) or x[:, :2])(_images())
    assert seen == [True]


# ---------------------------------------------------------------------------------------------
# The wrapper's guarantees (frozen, follows the images, fixed dtype, tracing, compile arguments)


class BatchNormFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 32, stride=32)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


class Owner(nn.Module):
    """A user model that keeps its proposal network in its own module tree too (after the
    proposal: `train` reaches it last)."""

    def __init__(self, network):
        super().__init__()
        self.proposal = papr_proposal.create(network)
        self.network = network


def test_a_proposal_its_owner_puts_in_training_mode_keeps_its_batchnorm_statistics():
    owner = Owner(BatchNormFeatures())
    bn = owner.network.bn
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    expected = owner.proposal(_images())
    owner.train()                                   # reaches the network: it is a submodule
    assert owner.network.training and not owner.proposal.training
    got = owner.proposal(_images(batch=3))[:2]
    assert not owner.network.training and not bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert torch.equal(got, owner.proposal(_images(batch=3))[:2])
    assert torch.equal(owner.proposal(_images()), expected)   # eval-mode (running) statistics


class FixedFilter(nn.Module):
    """A proposal without parameters: a fixed filter bank held in a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", torch.randn(4, 3, 32, 32,
                                                   generator=torch.Generator().manual_seed(3)))

    def forward(self, x):
        return F.conv2d(x, self.kernel, stride=32).abs()


def test_a_network_with_buffers_only_follows_the_images_and_runs_channels_last():
    network = FixedFilter()
    expected = network(_images())                          # NCHW, fp32
    expected_bf16 = F.conv2d(_images().bfloat16(), network.kernel.bfloat16(), stride=32).abs()
    proposal = papr_proposal.create(network)
    assert network.kernel.is_contiguous(memory_format=torch.channels_last)
    formats = []
    network.register_forward_pre_hook(lambda m, a: formats.append(
        (a[0].dtype, a[0].is_contiguous(memory_format=torch.channels_last))))
    torch.testing.assert_close(proposal(_images()), expected)
    f = proposal(_images().bfloat16())
    assert network.kernel.dtype == torch.bfloat16 and f.dtype == torch.bfloat16
    torch.testing.assert_close(f, expected_bf16)
    assert formats == [(torch.float32, True), (torch.bfloat16, True)]
    assert proposal.follow(torch.device("cpu"), torch.float64) == torch.float64
    assert network.kernel.dtype == torch.float64


def test_a_fixed_dtype_holds_under_autocast():
    proposal = papr_proposal.create(Features(), dtype=torch.float32)
    plain = papr_proposal.create(Features())
    expected = plain(_images())
    for images in (_images(), _images().bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = proposal(images)
        assert f.dtype == torch.float32
        assert proposal.network.conv.weight.dtype == torch.float32
        torch.testing.assert_close(f, plain(images.float()), rtol=0, atol=0)
    torch.testing.assert_close(proposal(_images()), expected, rtol=0, atol=0)
    # without a fixed dtype, autocast picks the compute dtype (bf16 here)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(_images()).dtype == torch.bfloat16


def test_jit_trace_runs_the_plain_network_of_a_compiled_proposal():
    torch._dynamo.reset()
    counter = CompileCounter()
    proposal = papr_proposal.create(Features(), compiled={"backend": counter})
    traced = torch.jit.trace(proposal, _images(), check_trace=False)
    other = _images() * 2 + 1
    assert torch.equal(traced(other), papr_proposal.create(Features())(other))
    assert counter.frame_count == 0 and proposal.__dict__["_compiled_network"] is None


def test_an_empty_dict_of_compile_arguments_compiles(monkeypatch):
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda x: fn(x) + 1                  # marks the features that went through it

    monkeypatch.setattr(torch, "compile", fake_compile)
    images = _images()
    expected = papr_proposal.create(Features())(images)
    compiled = papr_proposal.create(Features(), compiled={})
    assert torch.equal(compiled(images), expected + 1)
    assert calls == [{"dynamic": False}]
    assert compiled.__dict__["_compiled_network"] is not None
    assert torch.equal(papr_proposal.create(Features(), compiled=False)(images), expected)
    assert len(calls) == 1


def test_create_refuses_arguments_it_would_ignore_with_an_existing_proposal():
    proposal = papr_proposal.create(Features())
    assert papr_proposal.create(proposal) is proposal
    assert papr_proposal.create(proposal, pretrained=False) is proposal   # patch passes it
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        papr_proposal.create(proposal, dtype=torch.float64)
    with pytest.raises(ValueError, match="compiled=True"):
        papr_proposal.create(proposal, compiled=True)
    with pytest.raises(ValueError, match="compiled=\\{\\}"):
        papr_proposal.create(proposal, compiled={})
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        papr_proposal.create(proposal, pretrained_cfg_overlay={})
    assert proposal.dtype is None and proposal.compiled is False


@pytest.mark.parametrize("dtype", ["float32", torch.int64, torch.complex64, 32])
def test_dtype_must_be_none_or_a_floating_dtype(dtype):
    with pytest.raises(TypeError, match="dtype must be None"):
        papr_proposal.create(Features(), dtype=dtype)
    assert papr_proposal.create(Features(), dtype=torch.float64).dtype == torch.float64


def test_a_bad_timm_keyword_is_not_reported_as_a_failed_download(monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TypeError, match="drop_rate_typo") as info:
        papr_proposal.create("mobileone_s0", pretrained=True, drop_rate_typo=0.1)
    assert "could not load the pretrained weights" not in str(info.value)


def test_a_missing_local_weights_file_is_still_reported_with_the_offline_advice(tmp_path):
    pytest.importorskip("timm")
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(RuntimeError, match="could not load the pretrained weights of the "
                                           "proposal 'mobileone_s0'") as info:
        papr_proposal.create("mobileone_s0", pretrained_cfg_overlay=dict(file=missing))
    assert "pretrained=False" in str(info.value)


def test_an_empty_list_of_features_is_a_clear_error():
    with pytest.raises(ValueError, match="proposal network returned no features"):
        papr_proposal.create(lambda x: [])(_images())
    f = papr_proposal.create(lambda x: [x[:, :1], x[:, :2, ::32, ::32]])(_images())
    assert f.shape == (2, 2, 2, 3)                   # the last entry of a list


# ---------------------------------------------------------------------------------------------
# Snapshots of the weights (exact round trips through another dtype)


def _snapshot_tensors(proposal):
    return [t for values in proposal.__dict__.get("_snapshots", {}).values() for t in values]


def test_weights_loaded_in_an_intermediate_dtype_are_kept():
    proposal = papr_proposal.create(Features())
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():          # weights away from fp16's subnormals: bf16 values fit fp16
        for t in proposal.network.parameters():
            t.copy_((torch.rand(t.shape, generator=gen) + 0.5) * torch.randn(
                t.shape, generator=gen).sign())
    original = proposal.network.conv.weight.detach().clone()
    # The bf16-rounded original weights: their values survive fp16 and bf16 exactly, so only
    # the version counters (bumped by load_state_dict) tell that they were changed.
    checkpoint = {k: v.bfloat16() for k, v in proposal.network.state_dict().items()}
    for k, v in checkpoint.items():
        assert torch.equal(v.half().bfloat16(), v), k
    proposal.half()
    proposal.network.load_state_dict(checkpoint)
    proposal.bfloat16()
    proposal.float()
    weight = proposal.network.conv.weight
    assert not torch.equal(weight, original)
    assert torch.equal(weight, original.bfloat16().float())


def test_a_round_trip_without_changes_is_still_exact_across_a_move():
    proposal = papr_proposal.create(Features())
    original = proposal.network.conv.weight.detach().clone()
    proposal.half()
    proposal._apply(lambda t: t.clone())             # a move: same dtypes, new storage
    proposal.float()
    assert torch.equal(proposal.network.conv.weight, original)


def test_a_move_keeps_no_copy_of_the_weights():
    proposal = papr_proposal.create(Features())
    proposal._apply(lambda t: t.clone())             # same dtypes: nothing to snapshot
    assert _snapshot_tensors(proposal) == []
    proposal.to(torch.float64)                       # the fp32 weights are kept ...
    kept = _snapshot_tensors(proposal)
    assert {t.dtype for t in kept} == {torch.float32} and len(kept) == 2
    proposal.to("meta")                              # ... and go where the weights go
    assert {t.device.type for t in _snapshot_tensors(proposal)} == {"meta"}
    assert len(_snapshot_tensors(proposal)) == 2


def test_a_video_network_keeps_its_memory_format():
    """Channels_last is for image networks: a Conv3d trunk (5-D weights) is left as it is."""
    torch.manual_seed(0)
    network = nn.Conv3d(3, 4, (2, 32, 32), stride=(2, 32, 32))
    video = torch.randn(2, 3, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = network(video)
    proposal = papr_proposal.create(network)
    assert network.weight.is_contiguous()
    f = proposal(video)
    assert f.shape == (2, 4, 2, 2, 2) and torch.equal(f, expected)


# ---------------------------------------------------------------------------------------------
# image_size: the opt-in lower input resolution (issue 12's lever; changes the kept tokens)


class Recording(nn.Module):
    """A stride-8 conv that records the images it is given (a copy, with their dtype)."""

    def __init__(self, dims=2):
        super().__init__()
        torch.manual_seed(0)
        kernel = (8, 8) if dims == 2 else (2, 8, 8)
        self.conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(3, 4, kernel, stride=kernel)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.conv(x)


def _resized(images, size):
    """The reference resize: bilinear, antialiased, align_corners=False, in float32."""
    return F.interpolate(images.float(), size=size, mode="bilinear", antialias=True,
                         align_corners=False)


def _photo(batch=2, height=120, width=88, seed=5):
    """Images with structure and fine texture (a smooth field plus noise): the resize modes
    differ on them by far more than rounding."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width),
                          indexing="ij")
    smooth = torch.stack([torch.sin(3 * x + c) * torch.cos(2 * y - c) for c in (0.0, 1.0, 2.0)])
    return smooth + 0.5 * torch.randn(batch, 3, height, width, generator=gen)


@pytest.mark.parametrize("size,expected", [((64, 40), (64, 40)), (48, (48, 48))])
def test_the_network_sees_the_images_resized_to_image_size(size, expected):
    network = Recording()
    proposal = papr_proposal.create(network, image_size=size)
    assert proposal.image_size == expected
    images = _photo()
    f = proposal(images)
    reference = _resized(images, expected)
    assert len(network.seen) == 1 and network.seen[0].shape == (2, 3, *expected)
    assert torch.equal(network.seen[0], reference)      # bit for bit: the same kernel
    assert network.seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(f, network.conv(reference.contiguous(
        memory_format=torch.channels_last)), rtol=0, atol=0)
    assert f.shape[-2:] == (expected[0] // 8, expected[1] // 8)


def test_the_default_gives_the_network_the_images_as_they_are(monkeypatch):
    images = _photo()
    for proposal in (papr_proposal.create(Recording()),
                     papr_proposal.create(Recording(), image_size=(120, 88))):  # already there
        calls = []
        monkeypatch.setattr(papr_proposal.F, "interpolate",
                            lambda *a, **k: calls.append(a) or F.interpolate(*a, **k))
        f = proposal(images)
        assert calls == [] and torch.equal(proposal.network.seen[0], images)
        assert torch.equal(f, proposal.network.conv(images.contiguous(
            memory_format=torch.channels_last)))
    assert papr_proposal.create(Recording()).image_size is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_image_size_resizes_in_float32_and_rounds_once_to_the_networks_dtype(dtype):
    """CPU's antialiased bilinear has no fp16 / bf16 kernel: the resize runs in float32
    (float64 images: float64) and its result is cast once to the dtype the network runs in."""
    images = _photo().to(dtype)
    network = Recording()
    proposal = papr_proposal.create(network, image_size=(64, 40))
    f = proposal(images)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    reference = F.interpolate(images.to(compute), size=(64, 40), mode="bilinear",
                              antialias=True, align_corners=False).to(dtype)
    assert f.dtype == dtype and torch.equal(network.seen[0], reference)
    fixed = papr_proposal.create(Recording(), dtype=torch.float16, image_size=(64, 40))
    fixed(_photo())                                      # fp32 images, a fixed fp16 network
    assert torch.equal(fixed.network.seen[0], _resized(_photo(), (64, 40)).half())


def test_image_size_under_autocast_resizes_in_float32_and_autocast_runs_the_network():
    network = Recording()
    proposal = papr_proposal.create(network, image_size=(64, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = proposal(_photo())
    assert f.dtype == torch.bfloat16 and network.conv.weight.dtype == torch.float32
    assert torch.equal(network.seen[0], _resized(_photo(), (64, 40)))


def test_image_size_resizes_each_frame_of_a_video():
    network = Recording(dims=3)
    proposal = papr_proposal.create(network, image_size=(64, 40))
    video = torch.stack([_photo(seed=s) for s in range(4)], dim=2)     # (2, 3, 4, 120, 88)
    f = proposal(video)
    frames = torch.stack([_resized(video[:, :, t], (64, 40)) for t in range(4)], dim=2)
    assert torch.equal(network.seen[0], frames) and f.shape == (2, 4, 2, 8, 5)
    with pytest.raises(ValueError, match="image_size"):
        proposal(torch.randn(3, 120, 88))


@pytest.mark.parametrize("value,error", [
    (0, ValueError), (-160, ValueError), ((160, 0), ValueError), (True, TypeError),
    (160.0, TypeError), ("160", TypeError), ((160, 128, 3), TypeError), ((160,), TypeError),
    ((True, 160), TypeError), ((160, 12.5), TypeError)])
def test_image_size_must_be_positive_ints(value, error):
    with pytest.raises(error, match="image_size"):
        papr_proposal.create(Features(), image_size=value)
    with pytest.raises(error, match="image_size"):
        papr_proposal.Proposal(Features(), image_size=value)
    proposal = papr_proposal.create(Features())
    with pytest.raises(error, match="image_size"):
        proposal.image_size = value
    assert proposal.image_size is None
    with pytest.raises(ValueError, match=r"image_size=\(160, 128\) cannot apply"):
        papr_proposal.create(proposal, image_size=(160, 128))


def test_image_size_survives_pickling_and_deepcopy_and_shows_in_the_repr():
    proposal = papr_proposal.create(Features(), image_size=(64, 40), dtype=torch.float32)
    assert "image_size=(64, 40)" in repr(proposal) and "dtype=torch.float32" in repr(proposal)
    assert "image_size" not in repr(papr_proposal.create(Features()))
    expected = proposal(_photo())
    buffer = io.BytesIO()
    torch.save(proposal, buffer)
    buffer.seek(0)
    for copy_ in (torch.load(buffer, weights_only=False), __import__("copy").deepcopy(proposal)):
        assert copy_.image_size == (64, 40) and torch.equal(copy_(_photo()), expected)
    old = papr_proposal.create(Features())
    del old.__dict__["_image_size"]                   # pickled before image_size existed
    assert old.image_size is None and old(_photo()).shape == (2, 8, 3, 2)


def test_image_size_under_compile_export_and_onnx():
    torch._dynamo.reset()
    network = Features()
    proposal = papr_proposal.create(network, image_size=(96, 64))
    images = _photo(height=120, width=88)
    expected = network(_resized(images, (96, 64)).contiguous(memory_format=torch.channels_last))
    assert expected.shape == (2, 8, 3, 2)
    counter = CompileCounter()
    got = torch.compile(proposal, backend=counter, fullgraph=True)(images)
    assert counter.frame_count == 1 and torch.equal(got, expected)
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(proposal, (images,), dynamic_shapes=({0: batch},))
    other = _photo(batch=3, seed=9)
    torch.testing.assert_close(program.module()(other), proposal(other), rtol=0, atol=1e-6)


def test_image_size_through_onnx_runtime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import warnings
    proposal = papr_proposal.create(Features(), image_size=(96, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(proposal, (_photo(),), str(tmp_path / "p.onnx"), dynamo=True,
                          verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=16)},))
    session = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    other = _photo(batch=3, seed=9)
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    want = proposal(other)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=0,
                               atol=1e-5 * float(want.abs().max()))


def test_a_patched_vit_with_a_smaller_proposal_keeps_the_reference_tokens_of_its_features():
    pytest.importorskip("timm")
    from test_timm import images_for, make_vit, reference_tokens
    from papr_kernels.timm import patch
    model = make_vit("vit_small_patch16_224", depth=1)
    torch.manual_seed(1)
    proposal = papr_proposal.create("mobileone_s0", pretrained=False, image_size=160)
    network = proposal.network
    patch(model, proposal, 0.5)
    images = images_for(model, batch=2)

    def reference_features(images):       # the network on the reference resize: a 5 x 5 map
        return network(_resized(images, (160, 160)).contiguous(
            memory_format=torch.channels_last))[-1]

    entering = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: entering.append(a[0]))
    with torch.no_grad():
        assert reference_features(images).shape == (2, 1024, 5, 5)
        model(images)
        expected, _ = reference_tokens(model, reference_features, images, 0.5)
    assert entering[0].shape == expected.shape == (2, 1 + 98, 384)
    torch.testing.assert_close(entering[0], expected, rtol=1e-5, atol=1e-5)


# --- the CPU bf16 convolution with its ReLU folded in (ConvReLU) -------------------------------

def _plain_mobileone(seed=0):
    """A reparameterized MobileOne-S0 as timm leaves it (no folding), random weights and
    biases (timm's init folds into zero biases, which a lost bias would pass)."""
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model
    torch.manual_seed(seed)
    network = timm.create_model("mobileone_s0", pretrained=False, features_only=True,
                                out_indices=(-1,)).eval()
    network = reparameterize_model(network)
    with torch.no_grad():
        for conv in network.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.normal_(0, (2 / conv.weight[0].numel()) ** 0.5)
                conv.bias.normal_(0, 0.1)
    return network.to(memory_format=torch.channels_last)


def _count_fused(monkeypatch):
    """A list that grows by one for each ConvReLU call that takes the fused oneDNN path."""
    calls, fuses = [], papr_proposal._fuses_on_cpu

    def counting(x, weight):
        fused = fuses(x, weight)
        calls.extend([True] if fused else [])
        return fused
    monkeypatch.setattr(papr_proposal, "_fuses_on_cpu", counting)
    return calls


def test_create_folds_the_relu_of_each_reparameterized_block_into_its_convolution():
    network = papr_proposal.create("mobileone_s0", pretrained=False).network
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    # MobileOne-S0: the stem, then 2 x (2, 8, 10, 1) blocks (a depthwise and a pointwise each)
    assert len(convs) == 43 and all(type(c) is papr_proposal.ConvReLU for c in convs)
    assert not any(isinstance(m, nn.ReLU) for m in network.modules())
    assert papr_proposal.fuse_conv_relu(network) == 0             # folded once
    plain = _plain_mobileone()
    assert network.state_dict().keys() == plain.state_dict().keys()   # checkpoints still load


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_folded_convolutions_give_the_features_of_the_plain_network(monkeypatch, dtype, batch):
    plain = _plain_mobileone()
    folded = _plain_mobileone()
    assert papr_proposal.fuse_conv_relu(folded) == 43
    plain, folded = plain.to(dtype), folded.to(dtype)
    fused_calls = _count_fused(monkeypatch)
    images = torch.randn(batch, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    images = images.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, out = plain(images)[-1], folded(images)[-1]
    assert out.shape == (batch, 1024, 3, 4) and 0.05 < (out > 0).float().mean() < 0.95
    # bit for bit: the ReLU commutes with rounding to bf16, the convolution is oneDNN's
    assert torch.equal(out, expected), (out.float() - expected.float()).abs().max()
    fused_here = dtype == torch.bfloat16 and papr_proposal._MKLDNN_BF16
    assert len(fused_calls) == (43 if fused_here else 0)


def test_the_fused_path_is_checked_against_the_two_ops(monkeypatch):
    """What the bit-for-bit test above catches: a fused call with the wrong padding, without the
    ReLU post-op, or without the bias."""
    if not papr_proposal._MKLDNN_BF16:
        pytest.skip("oneDNN bf16 convolutions are not supported on this CPU: nothing is fused")
    plain = _plain_mobileone().bfloat16()
    images = torch.randn(2, 3, 64, 64).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = plain(images)[-1]
    pointwise = torch.ops.mkldnn._convolution_pointwise
    broken = {
        "no ReLU": lambda x, w, b, p, s, d, g, attr, *a: pointwise(x, w, b, p, s, d, g, "none",
                                                                    *a),
        "no bias": lambda x, w, b, *a: pointwise(x, w, None, *a),
        "no padding": lambda x, w, b, p, *a: pointwise(x, w, b, [0, 0], *a) if w.shape[-1] == 1
        else pointwise(x, w, b, [p[0] - 1 if p[0] else 0, p[1]], *a),
    }
    for what, op in broken.items():
        folded = _plain_mobileone().bfloat16()
        papr_proposal.fuse_conv_relu(folded)
        monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", op)
        with torch.no_grad():
            try:
                out = folded(images)[-1]
            except RuntimeError:
                continue    # a shape error is caught too
        monkeypatch.undo()
        assert not torch.equal(out, expected), what


def test_folded_convolutions_pack_their_weights_once_per_shape_and_weights(monkeypatch):
    """bf16 on CPU: each ConvReLU reorders its weight into oneDNN's layout at its first call
    for an input shape (43 reorders), not at the next call of that shape; again at another batch
    size, after load_state_dict of other weights, after an in-place edit and after a round trip
    through fp32, each time giving the features of a plain network with those weights.
    deepcopy and pickle leave the packed weights behind; packing that fails falls back to the
    plain weight."""
    if not papr_proposal._MKLDNN_BF16:
        pytest.skip("oneDNN bf16 convolutions are not supported on this CPU: nothing is fused")
    import copy
    import pickle
    reorder, packs = torch._C._nn.mkldnn_reorder_conv2d_weight, []
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight",
                        lambda *args: packs.append(1) or reorder(*args))
    folded = _plain_mobileone().bfloat16()
    papr_proposal.fuse_conv_relu(folded)

    def images(batch):
        return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch)
                           ).bfloat16().contiguous(memory_format=torch.channels_last)

    def check(batch, seed, reorders):
        plain = _plain_mobileone(seed).bfloat16()
        packs.clear()
        with torch.no_grad():
            out = folded(images(batch))[-1]
            assert torch.equal(out, plain(images(batch))[-1])
        assert len(packs) == reorders

    check(2, 0, 43)
    check(2, 0, 0)                                  # the same shape and weights: packed already
    check(3, 0, 43)                                 # another batch size
    folded.load_state_dict(_plain_mobileone(1).bfloat16().state_dict())
    check(3, 1, 43)                                 # other weights, copied in place
    check(3, 1, 0)
    folded.float().bfloat16()
    check(3, 1, 43)                                 # new storage (fp32 and back)
    for conv in (m for m in folded.modules() if type(m) is papr_proposal.ConvReLU):
        conv.weight.data = conv.weight.detach().clone()   # the same values, a new storage
    check(3, 1, 43)
    stem = next(m for m in folded.modules() if type(m) is papr_proposal.ConvReLU)
    with torch.no_grad():
        stem.weight.mul_(1.5)
    plain = _plain_mobileone(1).bfloat16()
    with torch.no_grad():
        next(m for m in plain.modules() if isinstance(m, nn.Conv2d)).weight.copy_(stem.weight)
        packs.clear()
        assert torch.equal(folded(images(3))[-1], plain(images(3))[-1]) and len(packs) == 1
    for clone in (copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))):
        assert not any("_papr_packed" in m.__dict__ for m in clone.modules())
        with torch.no_grad():
            assert torch.equal(clone(images(3))[-1], plain(images(3))[-1])

    def failing(*args):
        raise RuntimeError("no packing here")
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", failing)
    fresh = copy.deepcopy(folded)
    with torch.no_grad():
        assert torch.equal(fresh(images(2))[-1], plain(images(2))[-1])


def test_folded_convolutions_run_as_the_two_ops_under_autocast_and_gradients(monkeypatch):
    plain, folded = _plain_mobileone(), _plain_mobileone()
    papr_proposal.fuse_conv_relu(folded)
    fused_calls = _count_fused(monkeypatch)
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):   # fp32 weights, bf16 compute
        expected, out = plain(images)[-1], folded(images)[-1]
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    plain, folded = plain.bfloat16().requires_grad_(True), folded.bfloat16().requires_grad_(True)
    images = images.bfloat16().requires_grad_(True)
    out, expected = folded(images)[-1], plain(images)[-1]
    assert torch.equal(out, expected)
    out.sum().backward()
    grad = images.grad.clone()
    images.grad = None
    expected.sum().backward()
    assert torch.equal(grad, images.grad) and grad.abs().sum() > 0
    assert fused_calls == []


def test_a_proposal_exports_its_folded_convolutions_as_standard_ops():
    network = papr_proposal.create("mobileone_s0", pretrained=False).network.bfloat16()
    images = torch.randn(1, 3, 64, 64).bfloat16().contiguous(memory_format=torch.channels_last)
    program = torch.export.export(network, (images,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in t for t in targets), targets
    assert any("conv2d" in t for t in targets) and any("relu" in t for t in targets)


def test_a_dispatch_mode_sees_the_folded_convolutions_as_the_two_ops():
    """FlopCounterMode (any TorchDispatchMode) sees conv + ReLU, so it counts the FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    plain, folded = _plain_mobileone().bfloat16(), _plain_mobileone().bfloat16()
    papr_proposal.fuse_conv_relu(folded)
    images = torch.randn(1, 3, 64, 64).bfloat16().contiguous(memory_format=torch.channels_last)
    counts = []
    for network in (plain, folded):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            network(images)
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_following_images_into_a_dtype_this_cpu_only_emulates_warns_once_with_the_fix(
        monkeypatch, dtype):
    """bf16 / fp16 convolutions without oneDNN's support (no AVX512-BF16 / AMX / AVX512-FP16)
    run ATen's slow fallback; the proposal still follows the images, and says how not to."""
    monkeypatch.setitem(papr_proposal._MKLDNN_SUPPORTED, dtype, lambda: False)
    proposal = papr_proposal.create(Features())
    images = _images().to(dtype)
    with pytest.warns(UserWarning, match=r"dtype=torch\.float32") as caught:
        f = proposal(images)
    assert len(caught) == 1 and str(dtype) in str(caught[0].message)
    assert f.dtype == dtype                       # followed all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no cast on the next call: no warning
        proposal(images)


@pytest.mark.parametrize("fixed", [None, torch.float32])
def test_no_warning_where_the_cpu_runs_that_dtype_or_the_dtype_is_fixed(monkeypatch, fixed):
    supported = fixed is None
    monkeypatch.setitem(papr_proposal._MKLDNN_SUPPORTED, torch.bfloat16, lambda: supported)
    proposal = papr_proposal.create(Features(), dtype=fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = proposal(_images().to(torch.bfloat16))
        proposal(_images())                       # float32 images: nothing to say either
    assert f.dtype == (fixed or torch.bfloat16)


def test_the_slow_dtype_warning_comes_again_after_unpickling(monkeypatch):
    """(another machine may lack what this one has)"""
    monkeypatch.setitem(papr_proposal._MKLDNN_SUPPORTED, torch.bfloat16, lambda: False)
    proposal = papr_proposal.create(Features())
    images = _images().bfloat16()
    with pytest.warns(UserWarning, match="oneDNN has no torch.bfloat16 convolutions"):
        proposal(images)
    loaded = torch.load(io.BytesIO(_saved(proposal)), weights_only=False)
    with pytest.warns(UserWarning, match="oneDNN has no torch.bfloat16 convolutions"):
        loaded(images)


def test_autocast_into_a_dtype_this_cpu_only_emulates_warns(monkeypatch):
    monkeypatch.setitem(papr_proposal._MKLDNN_SUPPORTED, torch.bfloat16, lambda: False)
    proposal = papr_proposal.create(Features())
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.warns(UserWarning, match=r"runs in torch\.bfloat16 \(autocast dtype\)"):
        assert proposal(_images()).dtype == torch.bfloat16


def _saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def test_a_torch_without_onednn_or_its_query_counts_as_the_slow_fallback(monkeypatch):
    def missing():
        raise AttributeError("no such op")
    cpu = torch.device("cpu")
    monkeypatch.setitem(papr_proposal._MKLDNN_SUPPORTED, torch.bfloat16, missing)
    assert papr_proposal._slow_on_cpu(cpu, torch.bfloat16)
    monkeypatch.setitem(papr_proposal._MKLDNN_SUPPORTED, torch.bfloat16, lambda: True)
    assert not papr_proposal._slow_on_cpu(cpu, torch.bfloat16)
    assert not papr_proposal._slow_on_cpu(cpu, torch.float32)
    assert not papr_proposal._slow_on_cpu(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert papr_proposal._slow_on_cpu(cpu, torch.bfloat16)
