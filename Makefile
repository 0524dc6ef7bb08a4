# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
SHELL := /bin/bash
VENV ?= .venv
PYBIN := $(VENV)/bin/python
WORKDIR ?= runs/default
# Find a Python >= 3.12: pyenv's 3.12.1 where it is installed, else python3.12, else python3.
PYTHON ?= $(shell if PYENV_VERSION=3.12.1 python3 -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then echo "env PYENV_VERSION=3.12.1 python3"; elif command -v python3.12 >/dev/null && python3.12 -V >/dev/null 2>&1; then echo python3.12; else echo python3; fi)

.PHONY: setup demo test clean fits

# The GPU compiler (CUDA PJRT plugin wheels only, no CUDA libraries): tests/test_gpu_compile.py
# compiles every Pallas GPU kernel to a cubin for an H100 target on this CPU-only machine.
GPU_COMPILER ?= .gpu-compiler
# The TPU compiler (libtpu only): tests/test_compile_check.py compiles train steps for TPU slices,
# tests/test_tpu_compile.py the Pallas TPU kernels (splash, Mosaic) for v5e / v5p.
TPU_COMPILER ?= .tpu-compiler

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

$(GPU_COMPILER)/.installed: constraints.txt $(VENV)/.installed
	rm -rf $(GPU_COMPILER)
	$(PYBIN) -m pip install -q --no-deps -c constraints.txt --target $(GPU_COMPILER) jax-cuda13-plugin jax-cuda13-pjrt
	touch $@

$(TPU_COMPILER)/.installed: constraints.txt $(VENV)/.installed
	rm -rf $(TPU_COMPILER)
	$(PYBIN) -m pip install -q --no-deps -c constraints.txt --target $(TPU_COMPILER) libtpu
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PYBIN) -m sparsejax.demo --workdir $(WORKDIR)

test: $(VENV)/.installed $(GPU_COMPILER)/.installed $(TPU_COMPILER)/.installed
	$(VENV)/bin/lint-imports --no-cache
	$(PYBIN) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The fits table (docs/fits.md from benchmarks/results/fits.json): the rows of
# sparsejax/compile_check/fits_grid.py compiled for v5p-8 / v5p-256 / v5e-256 / 8 x H100 with both
# compilers; finished cells are skipped. e.g. make fits FITS_ARGS="--only 'dense:*' --jobs 2"
FITS_ARGS ?= --jobs 2
fits: $(VENV)/.installed $(GPU_COMPILER)/.installed $(TPU_COMPILER)/.installed
	$(PYBIN) -m sparsejax.compile_check.fits --tpu_compiler $(TPU_COMPILER) --gpu_compiler $(GPU_COMPILER) $(FITS_ARGS)

clean:
	rm -rf $(VENV) $(GPU_COMPILER) $(TPU_COMPILER) runs .pytest_cache
