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
from torch import nn  # noqa: E402

import papr_kernels  # noqa: E402
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


# ---------------------------------------------------------------------------------------------
# The one answer to "can this backend run here" for every test file: `requires(name, device)`
# marks a test (or a module, `pytestmark = requires(...)`, or one parameter) as needing backend
# `name` on `device` tensors. papr_kernels.backends.unavailable_reason decides (it already says
# "no CUDA device here"); a test whose backend cannot run is skipped with that reason, or fails
# when PAPR_KERNELS_REQUIRE names the backend. Import it: `from conftest import requires`.


def requires(name, device):
    """A mark: the test needs backend `name` (a name of papr_kernels.backends) on `device`."""
    return pytest.mark.requires_backend(name, device)


def backend_params(*which):
    """pytest.params of BACKENDS, each (name, device) with its `requires` mark and the id
    "name-device"; only those whose name or "name-device" is in `which`, when given."""
    return [pytest.param((name, device), marks=requires(name, device), id=f"{name}-{device}")
            for name, device in BACKENDS
            if not which or name in which or f"{name}-{device}" in which]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_backend(name, device): needs that backend here (conftest.requires); "
        "skipped when it cannot run, failed when PAPR_KERNELS_REQUIRE names it")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires_backend"):
        name, device = mark.args
        reason = backends.unavailable_reason(name, device)
        if reason is None:
            continue
        if f"{name}-{device}" in REQUIRED:
            pytest.fail(f"required backend {name} on {device} cannot run: {reason}",
                        pytrace=False)
        pytest.skip(f"{name} on {device}: {reason}")


@pytest.fixture(params=backend_params())
def backend(request):
    """(backend name, device) of each backend under test (BACKENDS); parametrize it indirectly
    with backend_params(...) for a subset."""
    return request.param


def run_in_threads(fn, inputs, repeats):
    """[fn(x) for x in inputs], each input in its own thread, all started together and each
    calling `fn` `repeats` times (the last result kept); a thread's exception is raised here."""
    import threading

    results, errors = [None] * len(inputs), []
    barrier = threading.Barrier(len(inputs))

    def work(i):
        try:
            barrier.wait()
            for _ in range(repeats):
                results[i] = fn(inputs[i])
        except Exception as exc:  # raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class Prune(nn.Module):
    """`prune` with fixed arguments as a module (what export and ONNX take), returning indices."""

    def __init__(self, z, **kwargs):
        super().__init__()
        self.z, self.kwargs = z, kwargs

    def forward(self, x, f):
        return papr_kernels.prune(x, f, self.z, return_indices=True, **self.kwargs)
