#!/usr/bin/env bash
# Create and fill the project's virtual environment (default .venv) if it is missing or stale.
#  - A Python that already imports torch (a GPU machine with its CUDA build) is reused: the venv sees its
#    packages (--system-site-packages, and a .pth naming its site-packages when that Python is itself a venv,
#    as on GPU images whose python3 lives in a venv), so its torch and triton are kept.
#  - Where that Python also has triton, pandas, matplotlib and pytest, the project is installed with
#    `pip install --no-deps --no-build-isolation -e .` (setuptools >= 64 from that Python): no package registry
#    is asked for anything. Optional test packages that are missing are installed if a registry answers; if none
#    does, they are listed and the tests that need them skip.
#  - TRITON=3.4.0 (say) pins that Triton before the project is installed (the project asks for triton>=3.4).
#  - Otherwise torch==2.13.0 is installed first (a CPU build where the machine has one on disk), so the
#    project's torch range does not pull a multi-GB CUDA build onto a machine without a GPU; then the project,
#    editable, with its test and ultralytics extras, the installed torch pinned in the same command (ultralytics
#    pulls torchvision, whose wheel asks for a torch). Where that fails (no registry reachable), it says exactly
#    what is missing.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
# What the project needs to run and test (import names = pip names), and the test extra's optional packages.
CORE="torch pandas matplotlib pytest"
[ "$(uname -s)" = "Linux" ] && CORE="torch triton pandas matplotlib pytest"
EXTRAS="hypothesis nbformat nbclient ipykernel onnx onnxruntime onnxscript ultralytics cloudpickle"

missing() {  # missing PYTHON NAME... -> the names PYTHON cannot find
    "$1" - "${@:2}" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

torch_pin() {  # torch_pin PYTHON -> torch==<its torch>: what pip must keep (ultralytics' torchvision asks for a torch)
    echo "torch==$("$1" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
}

build_tools_ok() {  # setuptools >= 64 (and wheel below setuptools 70.1) for an install without build isolation
    "$1" - <<'EOF'
import importlib.util, sys
try:
    import setuptools
except ImportError:
    sys.exit(1)
v = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
sys.exit(0 if v >= (64,) and (v >= (70, 1) or importlib.util.find_spec("wheel")) else 1)
EOF
}

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        echo "setup_env: reusing the packages of $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        "$PYTHON" -m venv --system-site-packages "$VENV"
        # A venv's python: --system-site-packages gives its base interpreter's packages, not the venv's own.
        SITES=$("$PYTHON" -c "import site, sys; print(' '.join(site.getsitepackages()) if sys.prefix != sys.base_prefix else '')")
        if [ -n "$SITES" ]; then
            PURELIB=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
            for s in $SITES; do
                echo "import site; site.addsitedir('$s')"
            done > "$PURELIB/_reused_site_packages.pth"
        fi
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
if [ -n "${TRITON:-}" ]; then  # another Triton than the newest (make test-triton-versions): pinned before the project
    "$PY" -c "import torch" >/dev/null 2>&1 || "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q "triton==$TRITON"
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup_env: installing torch==2.13.0 (CPU set-up path)"
    if ! "$PY" -m pip install -q torch==2.13.0; then
        echo "setup_env: torch is missing and torch==2.13.0 could not be installed (no package registry or local" \
             "wheel reachable?). Use a Python that has torch: PYTHON=/path/to/python3 make env" >&2
        exit 1
    fi
fi

need_core=$(missing "$PY" $CORE)
if [ -z "$need_core" ] && ! build_tools_ok "$PY" && build_tools_ok "$PYTHON"; then
    # The venv's own bundled setuptools (older) shadows the reused Python's: drop it (no registry needed).
    "$PY" -m pip uninstall -q -y setuptools >/dev/null 2>&1 || true
fi
if [ -z "$need_core" ] && build_tools_ok "$PY"; then
    echo "setup_env: torch, triton, pandas, matplotlib and pytest found: installing the project without a registry"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    need_extras=$(missing "$PY" $EXTRAS)
    if [ -n "$need_extras" ]; then
        # shellcheck disable=SC2086
        if ! "$PY" -m pip install -q --retries 1 --timeout 10 $need_extras "$(torch_pin "$PY")" >/dev/null 2>&1; then
            echo "setup_env: no package registry reachable: optional test packages missing: $need_extras" \
                 "(the tests that need them skip)" >&2
        fi
    fi
else
    extras="test,ultralytics"
    [ -n "${TRITON:-}" ] && extras="test"  # other Tritons' venvs (make test-triton-versions): kernel tests only
    if ! "$PY" -m pip install -q -e ".[$extras]" "$(torch_pin "$PY")"; then
        what="$need_core"
        build_tools_ok "$PY" || what="$what setuptools>=64 (for an install without build isolation)"
        echo "setup_env: could not install the project (no package registry reachable?)." \
             "Missing from $VENV: ${what# }; optional test packages missing: $(missing "$PY" $EXTRAS)" >&2
        exit 1
    fi
fi
touch "$VENV/.installed"
