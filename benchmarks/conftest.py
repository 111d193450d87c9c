"""pytest options of the benchmark suite (not collected by `make test`: testpaths is `tests`).

    pytest benchmarks/ --benchmark-only                 # the full suite (see `make bench`)
    pytest benchmarks/ --benchmark-only --bench-quick   # smallest shapes, few rounds (CI)
    pytest benchmarks/                                  # every case runs once, untimed
"""
import os
import shlex
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import papr_bench  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("papr_kernels benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="smallest shapes and few rounds: proves the suite runs (CI)")
    group.addoption("--bench-device", default=None, choices=["cpu", "cuda"],
                    help="device to benchmark (default: cuda when available, else cpu)")
    group.addoption("--bench-families", action="store_true", default=False,
                    help="test_e2e_gpu: the other families' models (FAMILY_MODELS) instead "
                         "of the ViTs, Swin-T and ConvNeXt-T")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pyproject's addopts disables pytest-benchmark for `make test`; asking for
    # --benchmark-only here means the user wants the timings.
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--bench-quick")


@pytest.fixture(scope="session")
def device(request):
    dev = request.config.getoption("--bench-device") or papr_bench.default_device()
    if dev == "cuda":
        import torch
        if not torch.cuda.is_available():
            pytest.skip("--bench-device cuda: no CUDA device here")
    return dev


def pytest_benchmark_update_machine_info(config, machine_info):
    dev = config.getoption("--bench-device") or papr_bench.default_device()
    machine_info["papr_kernels"] = papr_bench.machine_description(dev)
    machine_info["papr_kernels"]["quick"] = config.getoption("--bench-quick")
    # The report prints it beside the numbers (every result is dated with its command).
    machine_info["papr_kernels"]["command"] = "pytest " + shlex.join(config.invocation_params.args)
