"""The oldest Linux the extension loads on: the symbol versions its libraries require of glibc,
libstdc++ and libgcc (`objdump -p`, "Version References"), against manylinux_2_28, the floor of
torch's own wheels (glibc 2.28, GCC 8's libstdc++: RHEL 8, Ubuntu 20.04 and newer). Fails, naming
each library and version past the floor, when a build needs more.

    python tools/glibc_floor.py papr_kernels/_C.abi3.so [papr_kernels/_C_cuda.abi3.so ...]

OBJDUMP names another objdump (aarch64-linux-gnu-objdump for an aarch64 build).
"""
import os
import re
import subprocess
import sys

# manylinux_2_28 (PEP 600; auditwheel's policy): glibc 2.28, libstdc++ of GCC 8, libgcc_s.
FLOOR = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 25), "CXXABI": (1, 3, 11), "GCC": (8, 0, 0)}
_VERSION = re.compile(r"\b(GLIBCXX|GLIBC|CXXABI|GCC)_([0-9.]+)\b")


def required_versions(path):
    """{family: [version tuples]} from the library's version references."""
    objdump = os.environ.get("OBJDUMP", "objdump")
    text = subprocess.run([objdump, "-p", path], capture_output=True, text=True, check=True).stdout
    refs = text.split("Version References:", 1)[1] if "Version References:" in text else ""
    found = {}
    for family, version in _VERSION.findall(refs):
        found.setdefault(family, []).append(tuple(int(v) for v in version.strip(".").split(".")))
    return found


def _dotted(version):
    return ".".join(map(str, version))


def main(paths):
    if not paths:
        sys.exit(__doc__)
    too_new = []
    for path in paths:
        found = required_versions(path)
        newest = {family: max(versions) for family, versions in found.items()}
        print(path + ": " + ", ".join(f"{f}_{_dotted(v)}" for f, v in sorted(newest.items())))
        too_new += [f"{path}: {family}_{_dotted(v)}" for family, versions in found.items()
                    for v in versions if v > FLOOR[family]]
    if too_new:
        sys.exit("past manylinux_2_28 (glibc 2.28, GCC 8's libstdc++):\n  " + "\n  ".join(too_new))
    print("every library loads on manylinux_2_28 (glibc >= 2.28), as torch's wheels do")


if __name__ == "__main__":
    main(sys.argv[1:])
