#!/usr/bin/env bash
# GPU suite: on a machine with a CUDA GPU, everything a results commit needs, in one command.
#   1. the test suite with the kernels compiled for real (no TRITON_INTERPRET);
#   2. the quick sweep, then the full sweep (resumable: rerun this script after an interruption);
#   3. the plots and summary.md (written by the sweep), the traffic tables counted on the GPU;
# all under perf/results/<gpu name>/, with the versions and the date (env.txt, env.json).
#
#   make gpu-suite                      # or: bash perf/gpu_suite.sh
#   PY=python SWEEP_ARGS="--providers eager,compile,gam_triton" bash perf/gpu_suite.sh
# PY: the Python to use. Default: a python3 that already imports torch and gam_triton (an offline GPU
# image: `pip install --no-deps --no-build-isolation -e .` first), else .venv/bin/python (`make env`).
# SWEEP_ARGS: extra arguments for both sweeps. SKIP_TESTS=1 skips step 1.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then
    if python3 -c "import torch, gam_triton" >/dev/null 2>&1; then
        PY=python3
    else
        [ -x .venv/bin/python ] || make env || exit 1
        PY=.venv/bin/python
    fi
fi
unset TRITON_INTERPRET
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA GPU visible to $PY; on a CPU-only machine run 'make sweep' (CPU figures)." >&2
    exit 1
fi
OUT=$("$PY" -c "import sys; sys.path.insert(0, 'perf'); import common; print(common.machine().results_dir)")
mkdir -p "$OUT"
echo "gpu_suite: writing to $OUT"

{
    echo "date: $(date -Iseconds)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
    "$PY" -c "import platform, torch; print('python:', platform.python_version()); print('torch:', torch.__version__, '| cuda:', torch.version.cuda, '| cudnn:', torch.backends.cudnn.version()); print('gpu:', torch.cuda.get_device_name(0))"
    "$PY" -c "import triton; print('triton:', triton.__version__)" 2>/dev/null || echo "triton: none"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

tests_rc=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    echo "gpu_suite: [1/3] tests, kernels compiled for real"
    "$PY" -m pytest -q 2>&1 | tee "$OUT/tests.txt"
    tests_rc=${PIPESTATUS[0]}
fi

echo "gpu_suite: [2/3] sweep (quick first, then full; rows already measured are skipped)"
# shellcheck disable=SC2086
"$PY" perf/sweep.py --quick --out "$OUT" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep_quick.log"
# shellcheck disable=SC2086
"$PY" perf/sweep.py --full --out "$OUT" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep_full.log"
sweep_rc=${PIPESTATUS[0]}

echo "gpu_suite: [3/3] traffic tables counted on the GPU"
"$PY" perf/traffic.py --device cuda --mode forward --out "$OUT/traffic_forward.md" > /dev/null
"$PY" perf/traffic.py --device cuda --mode train --out "$OUT/traffic_train.md" > /dev/null

echo
echo "gpu_suite: done. tests exit code $tests_rc, sweep exit code $sweep_rc. Files in $OUT:"
ls -1 "$OUT"
echo "Commit them with: git add $OUT"
[ "$tests_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ]
