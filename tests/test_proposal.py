"""The proposal's `compiled` switch (issue 12: on a GPU the proposal is a large share of a pruned
model's time; torch.compile is the lever that keeps its output). Counted with dynamo's
CompileCounter backend, so no Inductor compile runs here."""
import io

import pytest
import torch
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
    torch.testing.assert_close(wrapped(_images()), reference_features)
    seen = []
    papr_proposal.create(lambda x: seen.append(x.is_contiguous()) or x[:, :2])(_images())
    assert seen == [True]
