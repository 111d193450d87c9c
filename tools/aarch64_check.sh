#!/usr/bin/env bash
# The package on 64-bit Arm Linux (aarch64: Grace in GH200 servers, Graviton), checked from this
# x86-64 machine. setup.py runs under an emulated aarch64 Python 3.11 (qemu-user) with the oldest
# torch the package supports, 2.10.0 (PyPI's CPU-only aarch64 wheel), and builds the extension
# with GCC's aarch64 cross compiler; then the extension's tests run on it, emulated. What an Arm
# user building from the sdist on their torch meets: x86-only code outside its guards
# (intrinsics, target attributes), APIs newer than torch 2.10's headers, and any result that
# depends on the architecture (the cpp kernel must keep the reference's tokens there too).
#
# Needs root and Debian's apt: installs g++-aarch64-linux-gnu and qemu-user-static when missing,
# and extracts Debian's arm64 Python 3.11 packages into build/aarch64/root (dpkg's arm64
# architecture is added for that download and removed after it). No binfmt_misc: the Python
# below is a script that runs the interpreter under qemu, and is its own sys.executable, so
# the tests' subprocesses run emulated too. About 6 minutes on 2 cores, the emulated tests most
# of it; AARCH64_CLEAN=1 removes build/aarch64 (~1 GB) afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W="$ROOT/build/aarch64"
TORCH_VERSION="${AARCH64_TORCH_VERSION:-2.10.0}"
HOST_PY="$ROOT/.venv/bin/python"   # its pip fetches the aarch64 wheels; its ninja runs the build
SYSROOT="$W/root"
SITE="$SYSROOT/usr/lib/python3/dist-packages"   # on the emulated Python's sys.path
PY="$W/bin/python3.11"
pin() { grep -E "^$1==" "$ROOT/requirements.txt"; }
[ "${AARCH64_CLEAN:-0}" = 1 ] && trap 'rm -rf "$W"' EXIT

# 1. The cross compiler and the emulator.
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -q >/dev/null   # a fresh machine may have no package lists yet
  apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static >/dev/null
fi

# 2. Debian's arm64 Python 3.11 (this machine's Debian release), unpacked, not installed.
ARM64_DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev
  libc6 libexpat1 zlib1g libssl3 libffi8 libbz2-1.0 liblzma5 libsqlite3-0 libstdc++6 libgcc-s1
  libgomp1 libuuid1 libcrypt1 libnsl2 libtirpc3 libncursesw6 libtinfo6 libreadline8 libzstd1
  libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 libdb5.3"
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  rm -rf "$W" && mkdir -p "$W/debs"
  added_arch=0
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64 && added_arch=1
  fi
  apt-get update -q >/dev/null
  (cd "$W/debs" && apt-get download -q $(printf '%s:arm64 ' $ARM64_DEBS) >/dev/null)
  if [ "$added_arch" = 1 ]; then dpkg --remove-architecture arm64 && apt-get update -q >/dev/null; fi
  for deb in "$W"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  rm -rf "$W/debs"
fi
mkdir -p "$W/bin" "$SITE"
cat > "$PY" <<EOF
#!/bin/bash
export QEMU_LD_PREFIX="$SYSROOT" PYTHONHOME="$SYSROOT/usr"
exec qemu-aarch64-static -0 "\$0" "$SYSROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$PY"

# 3. torch and the test stack, aarch64 wheels into the emulated Python's site-packages.
if [ ! -f "$SITE/.installed-torch-$TORCH_VERSION" ]; then
  AARCH64=(--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64
           --python-version 3.11 --implementation cp --only-binary=:all:)
  "$HOST_PY" -m pip install -q --upgrade --target "$SITE" "${AARCH64[@]}" --no-deps "torch==$TORCH_VERSION"
  # hypothesis has native code since 6.16x; the pinned 6.170.15 has no aarch64 wheel, 6.170.17 has.
  "$HOST_PY" -m pip install -q --upgrade --target "$SITE" "${AARCH64[@]}" "$(pin numpy)" \
    hypothesis==6.170.17 sympy networkx filelock typing_extensions fsspec
  # Pure-Python packages (the host's tags serve): the pinned test stack and the build's.
  "$HOST_PY" -m pip install -q --upgrade --target "$SITE" --no-deps "$(pin pytest)" \
    "$(pin pytest-benchmark)" py-cpuinfo iniconfig packaging pluggy pygments "$(pin setuptools)" \
    "$(pin wheel)"
  touch "$SITE/.installed-torch-$TORCH_VERSION"
fi

# 4. The checkout's files (tracked and new, not ignored) copied, and setup.py run there, emulated:
# torch 2.10's cpp_extension, this Python's sysconfig (its compiler is aarch64-linux-gnu-gcc) and
# CXX name the cross compiler; Debian's Python.h path is the host's, so the arm64 headers go first
# on the include path.
rm -rf "$W/src" && mkdir -p "$W/src"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$W/src"
cd "$W/src"
PATH="$ROOT/.venv/bin:$PATH" CXX=aarch64-linux-gnu-g++ FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
  CPLUS_INCLUDE_PATH="$SYSROOT/usr/include/python3.11:$SYSROOT/usr/include" \
  "$PY" setup.py -q build_ext --inplace > "$W/build.log" 2>&1 || {
    echo "aarch64 build failed ($W/build.log); its errors, then its end:"
    grep -E "error" "$W/build.log" | head -n 20; tail -n 15 "$W/build.log"; exit 1; }
readelf -h papr_kernels/_C.abi3.so | grep -q "AArch64" || { echo "not an aarch64 build"; exit 1; }
OBJDUMP=aarch64-linux-gnu-objdump "$HOST_PY" "$ROOT/tools/glibc_floor.py" papr_kernels/_C.abi3.so

# 5. Emulated: the extension loads into torch 2.10 on aarch64, and its tests pass there (the
# selection of tools/torch_compat.sh; no triton, no GPU, and no Inductor: its C++ build would run
# the cross compiler with -march=native).
"$PY" - "$TORCH_VERSION" <<'PYEOF'
import platform, sys, torch, papr_kernels
from papr_kernels.ops import extension
assert platform.machine() == "aarch64" and torch.__version__.split("+")[0] == sys.argv[1]
info = extension.build_info()
assert info is not None, extension.unavailable_reason("cpu")
print(f"aarch64 (emulated): torch {torch.__version__} loaded the extension built against torch "
      f"{info['torch']}; prune on cpu runs: {papr_kernels.backends.pick(None, 'cpu')}")
PYEOF
PAPR_KERNELS_REQUIRE=cpp-cpu "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra \
  -k "(cpp or extension or build_info) and not test_info_says and not cuda and not triton and not inductor" \
  tests/test_cpp.py tests/test_parity.py tests/test_rows.py tests/test_errors.py tests/test_autograd.py

# 6. The same bits on both architectures: the cpp kernel's channel means and patch rankings on
# this host (x86-64, AVX2 where it has it) against the emulated aarch64 build's.
PYTHONPATH="$ROOT" "$HOST_PY" "$ROOT/tools/cross_arch_scores.py" write "$W/scores.pt"
PYTHONPATH="$W/src" "$PY" "$W/src/tools/cross_arch_scores.py" check "$W/scores.pt"
