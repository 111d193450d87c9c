# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with the pinned
# stack (torch comes from the local disk) and install this package into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
PKG_STAMP := $(VENV)/.papr-kernels-installed
PYTEST_ARGS ?=

.PHONY: venv install demo info test clean wheel wheel-smoke abi-audit torch-compat timm-compat gpu-report

venv: $(DEPS_STAMP)

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(PKG_STAMP)

$(PKG_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

info: install
	$(PY) -m papr_kernels info

demo: install
	$(PY) -m papr_kernels info
	$(PY) -m papr_kernels demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# C++/CUDA extension (setup.py documents FORCE_CUDA, TORCH_CUDA_ARCH_LIST, PAPR_SANITIZE).
# The wheel reuses the objects of `make install` (build/temp-papr-ext) when the flags match.
wheel: $(DEPS_STAMP)
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .
	@ls -l dist/papr_kernels-*.whl

wheel-smoke: wheel
	tools/wheel_smoke.sh

# The extension uses only torch's stable ABI and CPython's limited API (issue 16): the audit
# fails on any other libtorch or CPython symbol and prints the oldest torch the binary loads into;
# glibc_floor.py fails on a glibc / libstdc++ symbol version past manylinux_2_28.
abi-audit: install
	$(VENV)/bin/torch-abi-audit -v --check both papr_kernels
	$(PY) tools/glibc_floor.py papr_kernels/_C*.so   # loads on glibc >= 2.28, as torch's wheels

# The wheel built against the pinned torch, installed into a fresh venv with each of these torch
# versions (2.13.0: the CPU build on this machine's disk): the extension's tests pass there without
# a rebuild. `make torch-compat TORCH_COMPAT_VERSIONS="2.13.0 2.10.0"` adds the oldest torch the
# stable ABI admits (from PyPI: ~4 minutes and 7 GB more; passed 2026-12-03, not in CI for time).
TORCH_COMPAT_VERSIONS ?= 2.13.0
torch-compat: wheel
	for v in $(TORCH_COMPAT_VERSIONS); do TORCH_COMPAT_VERSION=$$v tools/torch_compat.sh || exit 1; done

# The patched-model tests again with the oldest timm pyproject.toml admits.
timm-compat: install
	tools/timm_compat.sh

# The sdist on aarch64 (Grace, Graviton), from this x86 machine: setup.py under an emulated
# aarch64 Python with torch 2.10, the extension's tests there, its scores against this host's bit
# for bit (tools/aarch64_check.sh: ~5 minutes; needs root and apt).
.PHONY: aarch64-check
aarch64-check: install
	tools/aarch64_check.sh

clean:
	rm -rf build dist *.egg-info papr_kernels/*.so $(PKG_STAMP)

# Ahead-of-time compile of every Triton kernel specialization for sm_80/sm_90 (no GPU needed):
# ~2 min on 2 cores; GPU_REPORT_ARGS=--quick compiles fp16 only.
GPU_REPORT_ARGS ?=

.PHONY: gpu-report
gpu-report: install
	$(PY) tools/gpu_report.py $(GPU_REPORT_ARGS)

# The lent GPU machine's stack (torch 2.11.0, triton 3.6.0: ../shared/FACTS.md) in a venv here:
# the whole suite and the Triton compile report with its versions (tools/device_stack.sh).
.PHONY: device-stack
device-stack: install
	GPU_REPORT_ARGS="$(GPU_REPORT_ARGS)" tools/device_stack.sh

# Benchmarks (issue 5): never part of `make test` (testpaths is `tests`). `make bench` runs the
# suite (prune kernels, hierarchical row ops, end to end), writes benchmarks/results/<machine>.csv,
# .md and .png (the raw .json stays out of git) and regenerates docs/performance.md from every CSV
# there. `make bench-quick` proves the suite runs (CI); it writes only under .benchmarks/.
BENCH_ARGS ?=

.PHONY: bench bench-quick

bench: install
	@mkdir -p benchmarks/results
	m=$$($(PY) benchmarks/papr_bench.py) && \
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.1 \
		--benchmark-warmup=off --benchmark-columns=median,iqr,rounds --benchmark-sort=name -p no:randomly \
		--benchmark-json=benchmarks/results/$$m.json $(BENCH_ARGS) && \
	$(PY) benchmarks/report.py benchmarks/results/$$m.json $(if $(BENCH_ARGS),,--command "make bench") --doc docs/performance.md

bench-quick: install
	@mkdir -p .benchmarks
	$(PY) -m pytest benchmarks --benchmark-only --bench-quick --benchmark-min-rounds=2 \
		--benchmark-max-time=0.01 --benchmark-warmup=off --benchmark-columns=median,rounds -q \
		--benchmark-json=.benchmarks/quick.json $(BENCH_ARGS)
	$(PY) benchmarks/report.py .benchmarks/quick.json --no-plot

# The C++ extension built with -fsanitize=address,undefined (CPU part only) into build/sanitize,
# then the cpp parity, property, bad-input, kernel and fused-glue tests run against it with the
# ASan runtime preloaded into python. Any ASan or UBSan report fails the run.
SANITIZE_DIR := build/sanitize
SANITIZE_TESTS ?= tests/test_parity.py tests/test_properties.py tests/test_errors.py tests/test_autograd.py tests/test_cpp.py \
	tests/test_rows.py tests/test_hierarchical_fused.py
.PHONY: sanitize
sanitize: $(DEPS_STAMP)
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	cp -r papr_kernels tests pyproject.toml $(SANITIZE_DIR)/ && find $(SANITIZE_DIR) -name '*.so' -delete
	PAPR_SANITIZE=1 FORCE_CUDA=0 PAPR_BUILD_TEMP=build/temp-sanitize \
		$(PY) setup.py -q build_ext --build-lib $(SANITIZE_DIR)
	ldd $(SANITIZE_DIR)/papr_kernels/_C*.so | grep -q libasan
	cd $(SANITIZE_DIR) && ASAN_OPTIONS=detect_leaks=0 \
		UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		PAPR_KERNELS_REQUIRE=cpp-cpu $(CURDIR)/$(PY) -c "import papr_kernels._C as c; \
		assert c.__file__.startswith('$(CURDIR)/$(SANITIZE_DIR)/'), c.__file__" && \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		PAPR_KERNELS_REQUIRE=cpp-cpu $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider -k "cpp" \
		$(SANITIZE_TESTS)
