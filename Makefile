# pyinf developer entry points.  `make test` is what CI runs (via .ci/run).
#
#   make venv     create .venv (with --system-site-packages so a machine's
#                 preinstalled torch/triton are reused)
#   make install  install the dependencies once (stamp file), then build and
#                 install pyinf itself (non-editable) every time
#   make test     install, then run pytest against the INSTALLED package
#   make demo     install, then `python -m pyinf demo`
#   make bench    install, then pytest-benchmark on bench/ (JSON in bench/results/)
#   make clean    remove build outputs and the venv

SHELL   := /bin/bash
PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.pyinf-deps.stamp
# torch is pinned to the exact release whose CPU wheel lies on local disk;
# never ask for a looser range (it would pull a multi-GB CUDA build).
TORCH_PIN := torch==2.13.0
DEPS    := pybind11 numpy pandas pytest pytest-benchmark hypothesis setuptools wheel transformers peft tqdm scikit-learn matplotlib

.PHONY: venv install deps test demo bench clean

venv: $(PY)

$(PY):
	$(PYTHON3) -m venv --system-site-packages $(VENV)

deps: $(STAMP)

$(STAMP): Makefile | $(PY)
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
	    echo "torch already importable: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
	    $(PIP) install "$(TORCH_PIN)"; \
	fi
	@if $(PY) -c "import triton" >/dev/null 2>&1; then \
	    echo "triton already importable: $$($(PY) -c 'import triton; print(triton.__version__)')"; \
	else \
	    $(PIP) install triton; \
	fi
	$(PIP) install $(DEPS)
	touch $@

# Non-editable install: tests must import the installed package, not ./pyinf.
install: $(STAMP)
	$(PIP) install --no-build-isolation --no-deps .

# A broken C++ build must not hide behind the PyTorch fallback in tests.
test: export PYINF_REQUIRE_NATIVE = 1
test: install
	cd tests && TRITON_INTERPRET=1 ../$(PY) -m pytest -q --import-mode=importlib \
	    -p no:cacheprovider

demo: install
	$(PY) -m pyinf demo

# Benchmarks run the kernels natively (GPU ones skip themselves without CUDA).
bench: install
	mkdir -p bench/results
	cd bench && ../$(PY) -m pytest -q -s --import-mode=importlib \
	    -p no:cacheprovider \
	    --benchmark-json=results/bench-$$(date +%Y%m%d-%H%M%S).json

clean:
	rm -rf build dist *.egg-info pyinf/_C*.so .pytest_cache .benchmarks $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
