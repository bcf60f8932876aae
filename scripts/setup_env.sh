#!/usr/bin/env bash
# Create and fill the project's virtual environment (default .venv) if it is missing or stale.
#  - A Python that already imports torch (a GPU machine with its CUDA build) is reused through
#    --system-site-packages, so its torch and triton are kept.
#  - Otherwise torch==2.13.0 is installed first (a CPU build where the machine has one on disk), so the
#    project's torch range does not pull a multi-GB CUDA build onto a machine without a GPU.
# Then the project itself, editable, with its test extra.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        echo "setup_env: reusing the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup_env: installing torch==2.13.0 (CPU set-up path)"
    "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
touch "$VENV/.installed"
