# The two commands of the README: `make sweep` (the main job) and `make test`.
# Each creates and fills .venv first when it is missing (scripts/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: sweep test test-triton-versions gpu-check gpu-suite compile-check env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

# Perf sweep (perf/bench.py, then perf/report.py): on a GPU the full sweep, on a CPU-only machine the quick CPU sweep;
# results.csv + PNGs + summary.md in perf/results/<device>/.
sweep: env
	$(PY) perf/bench.py $(SWEEP_ARGS)

# Tests: Triton kernels through the interpreter on the CPU (the GPU test file runs where CUDA is).
test: env
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The other Triton versions users run (CI: 3.4, the oldest the package promises, and 3.6, the GPU machine's), each
# in its own environment .venv-triton-<version>: the compile check (CI subset, sm_90, cold) and one smoke test per
# kernel under the interpreter (the version logic lives in the heuristics, which the compile check covers).
TRITON_VERSIONS ?= 3.4.0 3.6.0
VERSION_TESTS ?= tests/test_compile_check.py tests/test_ops.py::test_channel_gate_gradients \
	tests/test_ops.py::test_final_gate_mixed_dtype_promotes tests/test_ops.py::test_bn_relu_values_and_grads \
	tests/test_train_kernels.py::test_two_identical_steps_are_bitwise_equal tests/test_conv.py::test_module_triton_convs_c192
test-triton-versions:
	@for v in $(TRITON_VERSIONS); do \
	    TRITON=$$v bash scripts/setup_env.sh .venv-triton-$$v || exit 1; \
	    echo "== compile check (sm_90) and kernel smoke tests on Triton $$v"; \
	    COMPILE_CHECK_ARCHS=90 TRITON_INTERPRET=1 .venv-triton-$$v/bin/pytest -q $(VERSION_TESTS) $(PYTEST_ARGS) \
	        || exit 1; \
	done

# Every binary the module launches over its whole space (perf/compile_check.py), compiled cold for sm_80/sm_90/sm_100
# without a GPU: registers, spills, shared memory, CTAs per SM, tensor cores and issue 22's static figures ->
# perf/compile/report.{md,csv} (not committed). COMPILE_ARGS="--subset ci --archs 90 --check --targets waves,...".
COMPILE_ARGS ?=
compile-check: env
	env -u TRITON_INTERPRET $(PY) perf/compile_check.py $(COMPILE_ARGS)

# A short GPU lease (perf/gpu_check.sh): the GPU-marked tests, tuning the headline shapes, perf/bench.py under a budget
# and perf/report.py, each under its own timeout (8 minutes in all), into perf/results/<gpu-name>/<date>/ and one
# tar.gz. Runs with a python3 that already has torch, Triton and the project (`pip install --no-deps
# --no-build-isolation -e .`; no network), else with .venv. GPU_CHECK_ARGS="--rehearse --out DIR": every step on the
# CPU (interpreter, tiny shapes, about a minute; not performance figures).
GPU_CHECK_ARGS ?=
GPU_PY ?= $(shell python3 -c "import torch, gam_triton" >/dev/null 2>&1 && echo python3 || echo $(PY))
gpu-check:
	@command -v $(GPU_PY) >/dev/null 2>&1 || { echo "gpu-check: $(GPU_PY) not found: run 'pip install --no-deps \
	--no-build-isolation -e .' with a python3 that has torch and Triton, or 'make env'" >&2; exit 2; }
	PY=$(GPU_PY) bash perf/gpu_check.sh $(GPU_CHECK_ARGS)

# A long GPU session: every test with the kernels compiled for real, then the full sweep.
gpu-suite:
	env -u TRITON_INTERPRET $(GPU_PY) -m pytest -q && env -u TRITON_INTERPRET $(GPU_PY) perf/bench.py

clean:
	rm -rf $(VENV) .venv-triton-* build *.egg-info .pytest_cache
