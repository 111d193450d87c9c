import os

import torch

# Triton kernels run on CPU tensors only under the interpreter, which must be switched on before
# the first @triton.jit function is called.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
    settings.register_profile("long", max_examples=2000, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is only needed by the property tests
    pass

import pytest  # noqa: E402

from papr_kernels import backends  # noqa: E402

# Every backend the parity matrix, the bad-input list and the autograd tests run on: add a
# backend with one line. (name, device type); one that cannot run here is skipped with the reason.
BACKENDS = [
    ("torch", "cpu"),
    ("torch", "cuda"),
    ("triton", "cpu"),   # under TRITON_INTERPRET=1
    ("triton", "cuda"),
    ("cpp", "cpu"),
    ("cuda", "cuda"),
]


# Backends that must run here ("name-device", comma-separated): CI sets it so that a backend that
# fails to build or import fails the run instead of being skipped.
REQUIRED = set(filter(None, os.environ.get("PAPR_KERNELS_REQUIRE", "").split(",")))


def _unavailable_reason(name, device):
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here"
    return backends.unavailable_reason(name, device)


def _backend_param(name, device):
    reason = _unavailable_reason(name, device)
    skip = reason is not None and f"{name}-{device}" not in REQUIRED
    marks = [pytest.mark.skip(reason=f"{name} on {device}: {reason}")] if skip else []
    return pytest.param((name, device), marks=marks, id=f"{name}-{device}")


@pytest.fixture(params=[_backend_param(*b) for b in BACKENDS])
def backend(request):
    """(backend name, device) of each backend under test."""
    name, device = request.param
    reason = _unavailable_reason(name, device)
    if reason is not None:
        pytest.fail(f"required backend {name} on {device} cannot run: {reason}")
    return request.param
