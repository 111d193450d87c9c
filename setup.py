"""Build of papr_kernels and its C++/CUDA extension (csrc/): `papr_kernels._C` (the op schemas and
CPU kernels) and, with CUDA, `papr_kernels._C_cuda` (the CUDA kernels; a separate library because
it links libtorch_cuda and the CUDA runtime, which a CPU-only torch lacks).

Both use only PyTorch's stable ABI (torch/csrc/stable, torch/headeronly, built with
TORCH_TARGET_VERSION = 2.10) and CPython's limited API (abi3, Python >= 3.10): one wheel loads into
every torch >= 2.10 and every CPython >= 3.10, whatever torch it was built with.

Switches (environment variables):
  FORCE_CUDA=1     build the CUDA kernels too (needs nvcc); FORCE_CUDA=0 never builds them.
                   Unset: CUDA is built when torch is a CUDA build and nvcc is found.
  CUDA_HOME        the CUDA toolkit; unset, it is found from nvcc on PATH (following a wrapper
                   script to the real toolkit, the folder whose lib64 holds libcudart.so), else
                   /usr/local/cuda*.
  TORCH_CUDA_ARCH_LIST   default "8.0;9.0+PTX": SASS for A100 (sm_80) and H100/H200 (sm_90), plus
                   PTX of compute_90, which the driver JIT-compiles on newer GPUs (Blackwell, ...).
  PAPR_SANITIZE=1  host code with -fsanitize=address,undefined (`make sanitize`).
  PAPR_NO_EXTENSION=1   pure-Python install (the "torch" backend only).
  MAX_JOBS         parallel compile jobs (ninja).
  PAPR_BUILD_TEMP  object folder (default build/temp-papr-ext, kept for incremental rebuilds).
The package imports and runs on its "torch" backend when the extension is missing.

The extension records what it was built for (torch version, CUDA toolkit, GPU architectures,
whether PTX is embedded): `papr_kernels.ops.extension.build_info()` reads it back from the
binary itself, so it is right for an editable install and a wheel alike.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest torch whose stable ABI the extension may use (TORCH_TARGET_VERSION), and the oldest
# CPython whose limited API it may use (Py_LIMITED_API, set by torch's build for py_limited_api).
STABLE_ABI_TARGET = "2.10"
STABLE_ABI_TARGET_HEX = "0x020a000000000000"
LIMITED_API = "cp310"


def _has_cudart(home):
    return any(glob.glob(os.path.join(home, sub, "libcudart.so*"))
               for sub in ("lib64", "lib", "targets/x86_64-linux/lib"))


def _find_cuda_home():
    """The real toolkit folder, or None. torch guesses it from nvcc's parent folder, which is
    wrong when nvcc on PATH is a wrapper script (as on the project's machines)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, "rb") as fh:
                head = fh.read(4096)
            if head.startswith(b"#!"):
                for path in re.findall(rb"(/[^\s'\"]+)/bin/nvcc", head):
                    candidates.insert(0, path.decode())
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and _has_cudart(home):
            return home
    return None


def _nvcc_version(cuda_home):
    """"13.0" from `nvcc --version` of the toolkit, or None."""
    try:
        text = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                              capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else None


def _arch_info(cpp_extension):
    """(archs, ptx) that nvcc is asked for: torch's own -gencode flags for TORCH_CUDA_ARCH_LIST,
    e.g. (["8.0", "9.0"], True) for "8.0;9.0+PTX"."""
    flags = cpp_extension._get_cuda_arch_flags()
    archs, ptx = [], False
    for flag in flags:
        for kind, num, suffix in re.findall(r"code=(sm|compute)_(\d+)([a-z]?)", flag):
            if kind == "compute":
                ptx = True
            else:
                arch = f"{num[:-1]}.{num[-1]}{suffix}"
                if arch not in archs:
                    archs.append(arch)
    return archs, ptx


def _build_info_define(info):
    """A -D flag carrying `info` as JSON, spelled as a list of byte values (csrc/module.cpp turns it
    back into a string): no quoting survives the trip through ninja and the shell otherwise."""
    data = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
    return "-DPAPR_BUILD_INFO_BYTES=" + ",".join(str(b) for b in data)


def _extension():
    if os.environ.get("PAPR_NO_EXTENSION") == "1":
        print("papr_kernels build: PAPR_NO_EXTENSION=1, pure-Python install (torch backend only)")
        return [], {}
    force = os.environ.get("FORCE_CUDA")
    cuda_home = _find_cuda_home()  # also quiets torch's wrong guess when FORCE_CUDA=0
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    import torch
    from torch.utils import cpp_extension

    if force == "1":
        if cuda_home is None:
            sys.exit("papr_kernels build: FORCE_CUDA=1 but no CUDA toolkit (nvcc + libcudart) found")
        with_cuda = True
    elif force == "0":
        with_cuda = False
    else:
        with_cuda = torch.version.cuda is not None and cuda_home is not None

    sanitize = os.environ.get("PAPR_SANITIZE") == "1"
    # Threads come from torch::stable::parallel_for (torch's own pool): no -fopenmp here.
    # -ffp-contract=off: no a*b+c fused into an FMA (GCC fuses by default where the target has
    # FMA: aarch64 hosts such as Grace), so the scores stay those of cuda (--fmad=false) and triton.
    cxx = ["-O3", "-fno-strict-aliasing", "-ffp-contract=off",
           f"-DTORCH_TARGET_VERSION={STABLE_ABI_TARGET_HEX}"]
    link = []
    if sanitize:
        cxx += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        link += ["-fsanitize=address,undefined"]
    sources = ["csrc/module.cpp", "csrc/ops/prune.cpp", "csrc/ops/rows.cpp",
               "csrc/cpu/prune_cpu.cpp", "csrc/cpu/rows_cpu.cpp"]
    info = {"torch": torch.__version__, "cuda": None, "archs": [], "ptx": False,
            "sanitize": sanitize, "stable_abi": STABLE_ABI_TARGET, "python_abi": LIMITED_API}
    if with_cuda:
        info["archs"], info["ptx"] = _arch_info(cpp_extension)
        info["cuda"] = _nvcc_version(cuda_home) or torch.version.cuda
    # csrc/compat first on the include path: its <sys/single_threaded.h> keeps the binary off
    # glibc 2.32 (the header says why).
    compat = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "compat")]
    exts = [cpp_extension.CppExtension(
        "papr_kernels._C", sources, py_limited_api=True, extra_link_args=link, include_dirs=compat,
        extra_compile_args={"cxx": cxx + [_build_info_define(info)]})]
    if with_cuda:
        cuda_sources = ["csrc/cuda/module.cpp", "csrc/cuda/prune_cuda.cpp",
                        "csrc/cuda/prune_kernels.cu", "csrc/cuda/rows_cuda.cpp",
                        "csrc/cuda/rows_kernels.cu"]
        # --fmad=false: no FMA contraction, so scores are bit-identical to the CPU kernel's.
        # USE_CUDA: declares the stable shim's aoti_torch_get_current_cuda_stream.
        exts.append(cpp_extension.CUDAExtension(
            "papr_kernels._C_cuda", cuda_sources, py_limited_api=True, extra_link_args=link,
            include_dirs=compat,
            extra_compile_args={"cxx": cxx + ["-DUSE_CUDA"],
                                "nvcc": ["-O3", "--fmad=false", "-lineinfo"]}))
    print("papr_kernels build configuration:")
    print(f"  torch            {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"  CUDA kernels     {'yes' if with_cuda else 'no'} (FORCE_CUDA={force or 'unset'})")
    print(f"  CUDA_HOME        {cuda_home or 'not found'}")
    if torch.version.cuda and not with_cuda and force != "0":
        print("  (a CUDA torch but no CUDA toolkit found: CPU kernels only; set CUDA_HOME to a "
              "toolkit or FORCE_CUDA=1 to build the CUDA kernels)")
    if with_cuda:
        print(f"  arch list        {os.environ['TORCH_CUDA_ARCH_LIST']} -> SASS "
              f"{', '.join(info['archs'])}{', PTX' if info['ptx'] else ''} (nvcc {info['cuda']})")
    print(f"  ABI              torch stable ABI >= {STABLE_ABI_TARGET}, CPython {LIMITED_API} (abi3)")
    print(f"  sanitizers       {'address,undefined' if sanitize else 'off'}")
    print(f"  MAX_JOBS         {os.environ.get('MAX_JOBS', 'default')}")
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """Objects in build/ (not pip's temporary folder): ninja rebuilds only what changed, and
        `make wheel` after `make install` reuses the objects instead of compiling twice."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.environ.get("PAPR_BUILD_TEMP") or os.path.join(
                ROOT, "build", "temp-papr-ext")

        def run(self):
            super().run()
            if self.inplace and not with_cuda:   # an earlier build's CUDA kernels: not this one's
                for stale in glob.glob(os.path.join(ROOT, "papr_kernels", "_C_cuda.*so")):
                    os.remove(stale)
                    print(f"papr_kernels build: removed {stale} (built without CUDA kernels)")

    return exts, {"build_ext": BuildExt}


ext_modules, cmdclass = _extension()

setup(
    packages=find_packages(include=["papr_kernels", "papr_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # An abi3 wheel (cp310-abi3): its libraries use only CPython's limited API.
    options={"bdist_wheel": {"py_limited_api": LIMITED_API}} if ext_modules else {},
)
