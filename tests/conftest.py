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


def _backend_param(name, device):
    reason = backends.unavailable_reason(name, device)
    if reason is None and device == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device here"
    marks = [pytest.mark.skip(reason=f"{name} on {device}: {reason}")] if reason else []
    return pytest.param((name, device), marks=marks, id=f"{name}-{device}")


@pytest.fixture(params=[_backend_param(*b) for b in BACKENDS])
def backend(request):
    """(backend name, device) of each backend under test."""
    return request.param
