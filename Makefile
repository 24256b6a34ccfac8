# pyinf developer entry points.  `make test` is what CI runs (via .ci/run).
#
#   make install  .venv with torch (CPU 2.13.0 unless one is importable), then
#                 `pip install ".[all,test]"`: pyinf, pyinf._C and every extra, as a
#                 user installs it (isolated build from pyproject.toml, non-editable)
#   make test     install, then pytest against the INSTALLED package, including
#                 the sm_90 compile check against the installed Triton and 3.6.0
#   make demo     install, then the installed `pyinf demo` (never the source tree)
#   make bench    install, then pytest-benchmark on bench/ (JSON in bench/results/)
#   make compile-check   the sm_90 compile table of every Triton kernel (bench/results/)
#   make clean    remove build outputs and the venvs

SHELL   := /bin/bash
PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.pyinf-torch.stamp
# torch is pinned to the exact release whose CPU wheel lies on local disk;
# never ask for a looser range (it would pull a multi-GB CUDA build).
TORCH_PIN := torch==2.13.0
# A second venv with the GPU machines' Triton, for the sm_90 compile check.
TRITON36     := .venv-triton36
TRITON36_PY  := $(TRITON36)/bin/python
TRITON36_PIN := triton==3.6.0

.PHONY: venv install test demo bench compile-check triton36 clean

venv: $(PY)

# --system-site-packages: a GPU machine's own torch and triton are reused.
$(PY):
	$(PYTHON3) -m venv --system-site-packages $(VENV)

$(STAMP): | $(PY)
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
	    echo "torch already importable: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
	    $(PIP) install "$(TORCH_PIN)"; \
	fi
	touch $@

# Every time: build pyinf (and pyinf._C) from pyproject.toml in an isolated
# environment and install it with all its extras, as `pip install` does for a user.
# PYINF_REQUIRE_NATIVE=1: a failed C++ build is an error here, never a fallback.
install: $(STAMP)
	PYINF_REQUIRE_NATIVE=1 $(PIP) install ".[all,test]"
	cd / && $(CURDIR)/$(PY) -c "import pyinf._C, pyinf.backends as b; print('pyinf installed; CPU backend:', b.describe())"

$(TRITON36_PY):
	$(PYTHON3) -m venv $(TRITON36)
	$(TRITON36_PY) -m pip install "$(TORCH_PIN)" "$(TRITON36_PIN)" numpy

triton36: $(TRITON36_PY)

test: export PYINF_REQUIRE_NATIVE = 1
test: export PYINF_TRITON36_PYTHON = $(CURDIR)/$(TRITON36_PY)
test: install triton36
	cd tests && TRITON_INTERPRET=1 ../$(PY) -m pytest -q --import-mode=importlib \
	    -p no:cacheprovider

# The installed console script: the source tree is never on its sys.path.
demo: install
	$(VENV)/bin/pyinf demo

# Benchmarks run the kernels natively (GPU ones skip themselves without CUDA).
bench: install
	mkdir -p bench/results
	cd bench && ../$(PY) -m pytest -q -s --import-mode=importlib \
	    -p no:cacheprovider \
	    --benchmark-json=results/bench-$$(date +%Y%m%d-%H%M%S).json

# The sm_90 compile table (bench/results/): installed Triton, Triton 3.6.0, both merged.
compile-check: install triton36
	v=$$($(PY) -c "import triton; print(triton.__version__)"); \
	$(PY) bench/compile_sm90.py --json bench/results/compile-sm90-triton$$v.json && \
	$(TRITON36_PY) bench/compile_sm90.py --kernels kernels --json bench/results/compile-sm90-triton3.6.0.json && \
	$(PY) bench/compile_sm90.py --merge bench/results/compile-sm90-triton3.6.0.json \
	    bench/results/compile-sm90-triton$$v.json --markdown bench/results/compile-sm90.md

clean:
	rm -rf build dist *.egg-info pyinf/_C*.so pyinf/_build_info.json .pytest_cache .benchmarks $(VENV) $(TRITON36)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
