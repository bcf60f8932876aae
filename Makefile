# The two commands of the README: `make sweep` (the main job) and `make test`.
# Each creates and fills .venv first when it is missing (scripts/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: sweep test gpu-suite env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

# Perf sweep: on a GPU the full sweep, on a CPU-only machine the quick CPU sweep; CSV + PNGs.
sweep: env
	$(PY) perf/sweep.py $(SWEEP_ARGS)

# Tests: Triton kernels through the interpreter on the CPU (the GPU test file runs where CUDA is).
test: env
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS)

# On a GPU machine: tests compiled for real, full sweep, plots, under perf/results/<gpu-name>/.
gpu-suite:
	bash perf/gpu_suite.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
