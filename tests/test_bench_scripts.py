"""The GPU per-call benchmark (benchmarks/per_call_gpu.py) runs end to end in its CPU dry run, so
that a lent GPU, which is rare, gets a script that works: every provider timed forward and
forward + backward, and the tables built from the timings."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import per_call_gpu  # noqa: E402
from conftest import requires  # noqa: E402


@pytest.mark.parametrize("f_layout", ["contiguous", "channels_last"])
def test_per_call_gpu_dry_run_times_every_provider_and_reports_the_targets(f_layout):
    times = per_call_gpu.measure(torch.float32, 2, rounds=2, device="cpu", f_layout=f_layout)
    assert set(times) == {"floor", "user eager", "auto"}   # cuda / triton: on a GPU only
    for t in times.values():
        assert len(t["host"]) == 2 and min(t["host"]) > 0
        assert len(t["fwdbwd"]) == 2 and min(t["fwdbwd"]) > 0
        assert t["gpu"] is None                              # CUDA graphs: on a GPU only
    results = {("fp32", 2): times}
    table = per_call_gpu.table(results, "cpp")
    assert table.splitlines()[0].startswith("| dtype | B | floor GPU | user eager host / GPU | "
                                            "auto (cpp) host / GPU |")
    assert table.splitlines()[2].startswith("| fp32 | 2 | - | ")
    targets = per_call_gpu.targets(results).splitlines()[2]
    host_us = per_call_gpu._med(times["auto"]["host"]) * 1e6
    assert targets.startswith(f"| fp32 | 2 | {host_us:.1f} us (")


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
