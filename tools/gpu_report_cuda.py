"""Registers, spills and shared memory of the extension's CUDA kernels, read from the built .so.

    python tools/gpu_report_cuda.py [path/to/_C.so] [--arch sm_80 sm_90]

Runs `cuobjdump --dump-resource-usage` (the toolkit's, or the copy triton ships in
triton/backends/nvidia/bin/), prints one row per kernel and architecture, and exits non-zero when
a kernel spills (LOCAL or STACK bytes > 0), an expected architecture is missing, or the extension
was built without CUDA. Needs no GPU.
"""
import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys


def find_tool(name):
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", name))
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "backends",
                                       "nvidia", "bin", name))
    candidates += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(on_path)
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def default_library():
    spec = importlib.util.find_spec("papr_kernels._C")
    return spec.origin if spec else None


def demangle(names):
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def short(name):
    name = re.sub(r"\(anonymous namespace\)::|papr::cuda::", "", name)
    return re.sub(r"\(.*\)$", "", name)


def parse(text):
    rows, arch = [], None
    func = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if func and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append({"arch": arch, "kernel": func, **{k: int(v) for k, v in fields.items()}})
            func = None
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", nargs="?", default=None)
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    args = parser.parse_args()
    lib = args.library or default_library()
    if not lib or not os.path.exists(lib):
        print("gpu_report_cuda: papr_kernels._C is not built (make install)", file=sys.stderr)
        return 2
    cuobjdump = find_tool("cuobjdump")
    if not cuobjdump:
        print("gpu_report_cuda: no cuobjdump (CUDA toolkit or triton) found", file=sys.stderr)
        return 2
    proc = subprocess.run([cuobjdump, "--dump-resource-usage", lib], capture_output=True, text=True)
    rows = parse(proc.stdout)
    if not rows:
        print(f"gpu_report_cuda: no CUDA kernels in {lib} (built without CUDA? FORCE_CUDA=1)\n"
              f"{proc.stderr.strip()}", file=sys.stderr)
        return 1
    names = demangle([r["kernel"] for r in rows])
    print(f"CUDA kernels of {lib} (cuobjdump: {cuobjdump})")
    header = f"{'arch':<6} {'kernel':<58} {'regs':>5} {'smem B':>7} {'stack B':>7} {'spill/local B':>13}"
    print(header)
    print("-" * len(header))
    failures = []
    for row, name in sorted(zip(rows, names), key=lambda rn: (rn[0]["arch"] or "", short(rn[1]))):
        local, stack = row.get("LOCAL", 0), row.get("STACK", 0)
        print(f"{row['arch'] or '?':<6} {short(name)[:58]:<58} {row.get('REG', 0):>5} "
              f"{row.get('SHARED', 0):>7} {stack:>7} {local:>13}")
        if local or stack:
            failures.append(f"{row['arch']} {short(name)} spills ({local} B local, {stack} B stack)")
    found = {r["arch"] for r in rows}
    failures += [f"no code for {a}" for a in args.arch if a not in found]
    for line in failures:
        print("FAIL:", line, file=sys.stderr)
    print(f"{len(rows)} kernels, architectures {', '.join(sorted(found))}: "
          f"{'zero spills' if not failures else 'FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
