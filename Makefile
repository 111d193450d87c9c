# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with the pinned
# stack (torch comes from the local disk) and install this package into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
PKG_STAMP := $(VENV)/.papr-kernels-installed
PYTEST_ARGS ?=

.PHONY: venv install demo info test clean

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

clean:
	rm -rf build dist *.egg-info papr_kernels/*.so $(PKG_STAMP)

# Ahead-of-time compile of every Triton kernel specialization for sm_80/sm_90 (no GPU needed):
# ~2 min on 2 cores; GPU_REPORT_ARGS=--quick compiles fp16 only.
GPU_REPORT_ARGS ?=

.PHONY: gpu-report
gpu-report: install
	$(PY) tools/gpu_report_triton.py $(GPU_REPORT_ARGS)

# Benchmarks (issue 5): never part of `make test` (testpaths is `tests`). `make bench` writes
# benchmarks/results/<machine>.{json,md,png} and regenerates README.md's performance section.
BENCH_ARGS ?=

.PHONY: bench bench-quick

bench: install
	@mkdir -p benchmarks/results
	m=$$($(PY) benchmarks/papr_bench.py) && \
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.1 \
		--benchmark-warmup=off --benchmark-columns=median,iqr,rounds --benchmark-sort=name -p no:randomly \
		--benchmark-json=benchmarks/results/$$m.json $(BENCH_ARGS) && \
	$(PY) benchmarks/report.py benchmarks/results/$$m.json $$(case $$m in cpu-*) echo --readme README.md;; esac)

bench-quick: install
	@mkdir -p .benchmarks
	$(PY) -m pytest benchmarks --benchmark-only --bench-quick --benchmark-min-rounds=2 \
		--benchmark-max-time=0.01 --benchmark-warmup=off --benchmark-columns=median,rounds -q \
		--benchmark-json=.benchmarks/quick.json $(BENCH_ARGS)
	$(PY) benchmarks/report.py .benchmarks/quick.json --no-plot
