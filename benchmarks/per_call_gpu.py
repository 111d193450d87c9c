"""Per-call cost of `prune` on a CUDA GPU (issue 14): host and GPU time of every backend, one run.

    PYTHONPATH=. python benchmarks/per_call_gpu.py [--batches 1 64 256 1024] [--dtypes bf16 fp32]
                                                  [--rounds 11] [--device cuda]
                                                  [--f-layout contiguous|channels_last]

ViT-B/16-224 (x B x 197 x 768, f B x 1024 x 7 x 7, contiguous or channels_last as the proposal
returns it: both kernels read either layout without a copy), z = 0.5. For each dtype and B, interleaved
round by round in one process, for the floor (`papr_bench.floor_fwd`: a clone of the
output-sized block plus one read of f), the PaPr a user writes in eager PyTorch
(`papr_bench.user_prune`), `prune` on each CUDA backend and `prune` with the automatic choice:

- host: calls issued back to back, then one synchronize; wall time / call (what a Python loop
  sees: the host's cost, or the GPU's where the GPU is the slower side); the targets table also
  gives the host's own cost (time / call until the last call returned, before the synchronize)
  and judges the host targets by it;
- GPU: a CUDA graph of 20 calls replayed, CUDA-event time / call (no host cost);
- fwd+bwd host: the same as host for `out = fn(x, f); out.backward(ones)` (x requires grad; the
  floor: its forward plus `papr_bench.floor_bwd`).

Medians over the rounds, then the issue's targets for the automatic backend. A provider whose
graph capture fails gets "-" and its error is printed. `--device cpu` is a dry run of the script
itself (host columns only): timings are reported, never asserted.
"""
import argparse
import os
import statistics
import sys
from typing import Callable, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import papr_bench as pb  # noqa: E402
import papr_kernels  # noqa: E402

Z = 0.5
GRAPH_CALLS = 20
SHAPE = pb.SHAPES[pb.HEADLINE]
KEPT_TOKENS = SHAPE.prefix + papr_kernels.keep_count(SHAPE.num_tokens, Z, SHAPE.prefix)


def forward_providers(device: str) -> Dict[str, Callable]:
    """{name: fn(x, f)}: floor, user eager, each CUDA backend, auto."""
    fns = {"floor": lambda x, f: pb.floor_fwd(x, f, KEPT_TOKENS),
           "user eager": lambda x, f: pb.user_prune(x, f, Z)}
    for name in papr_kernels.available_backends(device):
        if device == "cuda" and name in ("cuda", "triton"):
            fns[name] = lambda x, f, name=name: papr_kernels.prune(x, f, Z, backend=name)
    fns["auto"] = lambda x, f: papr_kernels.prune(x, f, Z)
    return fns


def with_backward(name: str, fn: Callable) -> Callable:
    """fn(x, f) -> a callable of forward + backward (x requiring grad), each from no gradient
    (as after `optimizer.zero_grad()`): accumulating into x.grad would add a pass over x."""
    def run(x, f, grad):
        if name == "floor":
            out, _ = fn(x, f)
            return pb.floor_bwd(grad, SHAPE.num_tokens)
        x.grad = None
        fn(x, f).backward(grad)
    return run


class GraphTimer:
    """A CUDA graph of GRAPH_CALLS calls of fn; `time()` replays it: seconds per call."""

    def __init__(self, fn: Callable):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up off the capture stream (allocator, kernels)
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(GRAPH_CALLS):
                fn()
        self.graph.replay()
        torch.cuda.synchronize()

    def time(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / GRAPH_CALLS


def measure(dtype: torch.dtype, batch: int, rounds: int, device: str,
            f_layout: str = "contiguous") -> Dict[str, Dict]:
    """{provider: {"host": [s], "gpu": [s] or None, "fwdbwd": [s], "issue": [s],
    "fwdbwd_issue": [s]}}, rounds interleaved (issue: the host's own time of host / fwdbwd)."""
    x, f = pb.inputs(SHAPE, dtype, batch, device)
    f = pb.with_f_layout(f, f_layout)
    x_grad = x.detach().clone().requires_grad_(True)
    grad = torch.ones(batch, KEPT_TOKENS, SHAPE.channels, dtype=dtype, device=device)
    fwd, both, graphs = {}, {}, {}
    for name, fn in forward_providers(device).items():
        fwd[name] = lambda fn=fn: fn(x, f)
        both[name] = lambda name=name, fn=fn: with_backward(name, fn)(x_grad, f, grad)
        graphs[name] = None
        if device == "cuda":
            try:
                graphs[name] = GraphTimer(fwd[name])
            except Exception as exc:  # reported, and the rest of the run goes on
                print(f"B = {batch} {dtype}: no CUDA graph of {name}: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}")
                torch.cuda.synchronize()
    for name in fwd:   # compiles, autograd and allocator set-up: out of the blocks' sizing
        for _ in range(3):
            fwd[name]()
            both[name]()
    calls = {name: (pb.calls_per_block(fwd[name], 2e-3, device),
                    pb.calls_per_block(both[name], 2e-3, device))
             for name in fwd}
    times = {name: {"host": [], "gpu": [] if graphs[name] else None, "fwdbwd": [], "issue": [],
                    "fwdbwd_issue": []} for name in fwd}
    for _ in range(rounds):
        for name in fwd:
            for kind, fn, n in (("", fwd[name], calls[name][0]), ("fwdbwd", both[name],
                                                                  calls[name][1])):
                issue, wall = pb.issue_and_wall_per_call(fn, n, device)
                times[name][kind or "host"].append(wall)
                times[name][f"{kind}_issue" if kind else "issue"].append(issue)
            if graphs[name]:
                times[name]["gpu"].append(graphs[name].time())
    return times


def _med(values: Optional[list]) -> Optional[float]:
    return statistics.median(values) if values else None


def _us(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def table(results: Dict[tuple, Dict], auto_name: str) -> str:
    names = [n for n in next(iter(results.values())) if n != "floor"]
    head = ["dtype", "B", "floor GPU"] + [f"{n} host / GPU" for n in names] + \
        ["fwd+bwd host: " + " / ".join(["floor"] + names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dtype, batch), t in results.items():
        cells = [dtype, str(batch), _us(_med(t["floor"]["gpu"]))]
        cells += [f"{_us(_med(t[n]['host']))} / {_us(_med(t[n]['gpu']))}" for n in names]
        cells.append(" / ".join(_us(_med(t[n]["fwdbwd"])) for n in ["floor"] + names))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("auto host", f"auto ({auto_name}) host")


def _host_cell(times: Dict, alone: str, wall: str, limit: Optional[float]) -> str:
    """"<host alone> us, <with the GPU> us (met)": the target judged on the host's own time."""
    host = _med(times[alone])
    met = "" if limit is None else f" ({'met' if host <= limit else 'not met'})"
    return f"{_us(host)} us, {_us(_med(times[wall]))} us{met}"


def targets(results: Dict[tuple, Dict]) -> str:
    """The issue's Done-when for the automatic backend, case by case."""
    lines = ["| dtype | B | auto host fwd (<= 25 us, B <= 64): host alone, with the GPU | "
             "auto host fwd+bwd (<= 80 us, B <= 64): host alone, with the GPU | "
             "auto GPU / floor GPU (<= 2x at B <= 64, <= 1.2x at B >= 256) |",
             "|---|---|---|---|---|"]
    for (dtype, batch), t in results.items():
        gpu, floor = _med(t["auto"]["gpu"]), _med(t["floor"]["gpu"])
        small = batch <= 64
        limit = 2.0 if small else 1.2 if batch >= 256 else None
        ratio = gpu / floor if gpu and floor else None
        cells = [
            _host_cell(t["auto"], "issue", "host", 25e-6 if small else None),
            _host_cell(t["auto"], "fwdbwd_issue", "fwdbwd", 80e-6 if small else None),
            "-" if ratio is None else f"{ratio:.2f}x" + (
                f" ({'met' if ratio <= limit else 'not met'})" if limit else "")]
        lines.append(f"| {dtype} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(pb.DTYPES))
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--f-layout", default="contiguous", choices=list(pb.F_LAYOUTS))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("per_call_gpu.py: no CUDA device here (--device cpu: a dry run)")
    auto_name = papr_kernels.backends.pick(None, args.device)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "no GPU (dry run)"
    print(f"{gpu}; torch {torch.__version__}; ViT-B/16-224, f {args.f_layout}, z = {Z}; "
          f"auto backend: {auto_name}; "
          f"medians of {args.rounds} interleaved rounds; microseconds per call\n")
    results = {}
    for d in args.dtypes:
        for b in args.batches:   # each row as soon as it is measured: a timeout keeps them
            results[(d, b)] = measure(pb.DTYPES[d], b, args.rounds, args.device, args.f_layout)
            print("measured: " + table({(d, b): results[(d, b)]}, auto_name).splitlines()[2],
                  flush=True)
    print("\n" + table(results, auto_name) + "\n\n" + targets(results))


if __name__ == "__main__":
    main()
