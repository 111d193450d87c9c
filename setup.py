"""Build of papr_kernels. The C++/CUDA extension (csrc/) is added here by the extension issue;
until then the package is pure Python and runs on its "torch" backend."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["papr_kernels", "papr_kernels.*"]),
)
