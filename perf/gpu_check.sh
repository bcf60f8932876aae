#!/usr/bin/env bash
# make gpu-check: a short GPU lease's evidence, four existing commands each under its own timeout (8 minutes in all):
# tests (pytest -m "gpu or gpu_check", kernels compiled for real), tune (python -m gam_triton.tune, the headline
# shapes in bf16, and C512 20x20 in fp32, where the FMA backward is timed against PyTorch's GEMMs), bench (perf/bench.py --quick --budget), report (perf/report.py); into one folder (default
# perf/results/<gpu name>/<date>/, steps.txt: each step's exit status), packed as <folder>.tar.gz at the end.
#   bash perf/gpu_check.sh [--rehearse] [--out DIR]   (PY=python3 by default; --rehearse: every step on the CPU)
set -u; cd "$(dirname "$0")/.."; PY=${PY:-python3}; REHEARSE=0; OUT=""
while [ $# -gt 0 ]; do
    case "$1" in --rehearse) REHEARSE=1 ;; --out) OUT=${2:?--out needs a folder}; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (--rehearse, --out DIR)" >&2; exit 2 ;; esac; shift; done
if [ "$REHEARSE" = 1 ]; then
    export TRITON_INTERPRET=1; T=(600 300 600 300); SHAPES=("16 4 fp32"); BATCH=2  # timeouts: hangs only
    BENCH=(--rehearse --budget 150)  # about 30 s of it on a quiet machine; a busy one is not cut short
    LABEL="REHEARSAL on the CPU (TRITON_INTERPRET=1, tiny shapes): it checks every step runs; NOT performance figures"
    K="not compile and not train and not conv and not half and not autocast and not block and not bwd"
else
    unset TRITON_INTERPRET; T=(140 70 200 40); BATCH=16; K=""
    SHAPES=("128 80 bf16" "256 40 bf16" "512 20 bf16" "512 20 fp32")  # fp32 C512: FMA backward vs GEMMs
    BENCH=(--quick --budget 180); LABEL="GPU run ($(date -u +%FT%TZ))"
fi
[ -n "$OUT" ] || OUT=$($PY -c "import sys, time; sys.path.insert(0, 'perf'); import bench
print(bench.machine().results_dir + time.strftime('/%Y%m%dT%H%MZ', time.gmtime()))")
mkdir -p "$OUT" && echo "# $LABEL" > "$OUT/steps.txt"
step() {  # step NAME SECONDS COMMAND...: its output in NAME.txt (the label first), its exit status in steps.txt
    local name=$1 t=$2; shift 2
    { echo "# $LABEL"; echo "# $*"; } > "$OUT/$name.txt"
    timeout -k 10 "$t" "$@" >> "$OUT/$name.txt" 2>&1
    local rc=$?; echo "$name: exit $rc$([ $rc = 124 ] && echo " (timed out after $t s)")" | tee -a "$OUT/steps.txt"
}
{ echo "# $LABEL"; nvidia-smi | head -12; $PY -m pip list 2>/dev/null | grep -E "^(torch|triton)"; } >"$OUT/env.txt"
X=$([ "$REHEARSE" = 0 ] && $PY -c "import xdist" 2>/dev/null && echo "-n 4"); export PY K X BATCH
step tests "${T[0]}" bash -c 'GAM_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider $X -m "gpu or gpu_check" \
    -k "not runs_on${K:+ and ($K)}" tests; rc=$?; $PY -m pytest -q -p no:cacheprovider -k runs_on tests/test_gpu.py; \
    r2=$?; exit $(( rc ? rc : r2 ))'  # heuristic choices (tuning every test shape takes long), then the tuner
export GAM_TRITON_CACHE_DIR="$OUT/tuning"   # the tuned choices travel with the results; the bench runs on them
step tune "${T[1]}" bash -c 'for s in "$@"; do set -- $s; echo "== C$1 $2x$2 $3"; $PY -m gam_triton.tune --channels $1 \
    --sizes $2 --batch $BATCH --dtype $3 --layout channels_last --group --no-sigmoid --shuffle 4 --train || exit
    done' _ "${SHAPES[@]}"
step bench "${T[2]}" $PY perf/bench.py "${BENCH[@]}" --out "$OUT" --no-plot
step report "${T[3]}" $PY perf/report.py "$OUT"
tar -czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "gpu-check: $OUT.tar.gz"
