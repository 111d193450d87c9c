"""Build of papr_kernels and its C++/CUDA extension `papr_kernels._C` (csrc/).

Switches (environment variables):
  FORCE_CUDA=1     build the CUDA kernels too (needs nvcc); FORCE_CUDA=0 never builds them.
                   Unset: CUDA is built when torch is a CUDA build and nvcc is found.
  CUDA_HOME        the CUDA toolkit; unset, it is found from nvcc on PATH (following a wrapper
                   script to the real toolkit, the folder whose lib64 holds libcudart.so), else
                   /usr/local/cuda*.
  TORCH_CUDA_ARCH_LIST   default "8.0;9.0" (A100, H100).
  PAPR_SANITIZE=1  host code with -fsanitize=address,undefined (`make sanitize`).
  PAPR_NO_EXTENSION=1   pure-Python install (the "torch" backend only).
  MAX_JOBS         parallel compile jobs (ninja).
  PAPR_BUILD_TEMP  object folder (default build/temp-papr-ext, kept for incremental rebuilds).
The package imports and runs on its "torch" backend when the extension is missing.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _extension():
    if os.environ.get("PAPR_NO_EXTENSION") == "1":
        print("papr_kernels build: PAPR_NO_EXTENSION=1, pure-Python install (torch backend only)")
        return [], {}
    force = os.environ.get("FORCE_CUDA")
    cuda_home = _find_cuda_home()  # also quiets torch's wrong guess when FORCE_CUDA=0
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
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
    # -fopenmp: torch is an OpenMP build, and at::parallel_for is a header template that runs
    # serially in code compiled without it (INTRA_OP_PARALLEL is only defined under _OPENMP).
    # libgomp.so.1 resolves to the copy torch already loaded.
    cxx = ["-O3", "-fno-strict-aliasing", "-fopenmp"]
    link = ["-fopenmp"]
    if sanitize:
        cxx += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        link += ["-fsanitize=address,undefined"]
    sources = ["csrc/ops.cpp", "csrc/cpu/prune_cpu.cpp", "csrc/cpu/rows_cpu.cpp"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if with_cuda:
        sources += ["csrc/cuda/prune_cuda.cpp", "csrc/cuda/prune_kernels.cu",
                    "csrc/cuda/rows_cuda.cpp", "csrc/cuda/rows_kernels.cu"]
        # --fmad=false: no FMA contraction, so scores are bit-identical to the CPU kernel's.
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--fmad=false", "-lineinfo"]
        kwargs["extra_compile_args"]["cxx"] = cxx + ["-DPAPR_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension("papr_kernels._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("papr_kernels._C", sources, **kwargs)
    print("papr_kernels build configuration:")
    print(f"  torch            {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"  CUDA kernels     {'yes' if with_cuda else 'no'} (FORCE_CUDA={force or 'unset'})")
    print(f"  CUDA_HOME        {cuda_home or 'not found'}")
    if with_cuda:
        print(f"  arch list        {os.environ['TORCH_CUDA_ARCH_LIST']}")
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

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extension()

setup(
    packages=find_packages(include=["papr_kernels", "papr_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
