#!/usr/bin/env bash
# Every CPU benchmark, then ONE table (benchmark, ratio, goal, met?). See BENCHMARKS.md.
#
#   benchmarks/run.sh                 # about 6 minutes on 2 cores
#   QUICK=1 benchmarks/run.sh         # fewer repetitions, about 4 minutes
#   ONLY="tee_overhead resume_startup" benchmarks/run.sh    # a subset
#   SKIP="checkpoint_blocking" benchmarks/run.sh
#   KEEP=dir benchmarks/run.sh        # keep each benchmark's full output in dir
#
# Each benchmark measures tsdia against a baseline in the same invocation (interleaved runs, medians)
# and prints ratios, its goal ratio last; the table collects every `ratio ...` line.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-.venv/bin/python}
OUT=${KEEP:-$(mktemp -d -t tsdia-bench-run-XXXXXX)}
mkdir -p "$OUT"
QUICK=${QUICK:-0}

if [[ "$QUICK" == 1 ]]; then
    TRAINER_ARGS=(--runs 3 --steps 50)
    TEE_ARGS=(--runs 5)
    PREEMPT_ARGS=(--runs 2)
    RESUME_ARGS=(--runs 3)
    SUBMIT_ARGS=(--runs 7)
    BLOCKING_ARGS=(--rounds 2)
    SEEDING_ARGS=(--samples 1024 --epochs 1)
else
    TRAINER_ARGS=(--runs 3)
    TEE_ARGS=(--runs 7)
    PREEMPT_ARGS=(--runs 3)
    RESUME_ARGS=(--runs 4)
    SUBMIT_ARGS=(--runs 15)
    BLOCKING_ARGS=()
    SEEDING_ARGS=(--samples 2048 --epochs 2)
fi

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), " \
    "$(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
echo "outputs: $OUT"

wanted() {
    local name=$1
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return 1; fi
    if [[ " ${SKIP:-} " == *" $name "* ]]; then return 1; fi
    [[ -f "benchmarks/$name.py" ]]
}

FILES=()
run() {
    local name=$1
    shift
    wanted "$name" || return 0
    local start=$SECONDS
    echo
    echo "=== $name $* ==="
    "$PY" "benchmarks/$name.py" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "--- $name: exit $rc, $((SECONDS - start)) s"
    FILES+=("$OUT/$name.txt")
}

TOTAL_START=$SECONDS
run trainer_overhead "${TRAINER_ARGS[@]}"
run tee_overhead "${TEE_ARGS[@]}"
run preemption_reaction "${PREEMPT_ARGS[@]}"
run resume_startup "${RESUME_ARGS[@]}"
run submit_latency "${SUBMIT_ARGS[@]}"
run checkpoint_blocking "${BLOCKING_ARGS[@]}"
run dataloader_seeding "${SEEDING_ARGS[@]}"

echo
echo "=== summary ($((SECONDS - TOTAL_START)) s; load average now $(cut -d' ' -f1-3 /proc/loadavg)) ==="
"$PY" benchmarks/table.py "${FILES[@]}"
