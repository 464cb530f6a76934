#!/usr/bin/env bash
# Every GPU check of tsdia, one table, < 8 minutes on one GPU:
#   1. gpu_overhead.py: tsdia vs a bare Accelerate loop, steps/s and peak GPU memory, bf16, DDP and
#      single-rank DeepSpeed ZeRO-2;
#   2. checkpoint_blocking.py --device cuda: how long an async checkpoint blocks the loop, vs the pure
#      device-to-host copy of the same state and vs a synchronous save;
#   3. gpu_resume.py: resume from async checkpoints is bitwise exact (deterministic algorithms on).
#
#   benchmarks/gpu.sh                        # from anywhere; runs in the repository root
#   PYTHON=/opt/venv/bin/python WHEELS=/path/to/wheels benchmarks/gpu.sh [gpu_overhead.py options]
#   benchmarks/gpu.sh --allow-cpu            # the plumbing on CPU with tiny sizes (not a measurement)
#
# Needs: a CUDA GPU, torch (CUDA build), accelerate, pyyaml, tqdm. tsdia itself need not be installed
# (src/ goes on PYTHONPATH). ZeRO-2 also needs deepspeed and transformers (accelerate's DeepSpeed plugin
# imports it): when they are missing and $WHEELS (default: benchmarks/wheels, then shared/wheels) holds
# their wheels, they are installed from there with `pip install --no-index` (no network needed).
# Without them the ZeRO-2 row says "skipped" and the DDP row is still measured.
# TensorBoard and WandB (offline) are used by tsdia when installed; the header line says which.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then
    PY=python3
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    echo "gpu.sh: no Python with torch found; set PYTHON=/path/to/python" >&2
    exit 2
fi

fail() {
    echo "gpu.sh: $*" >&2
    exit 2
}

ALLOW_CPU=0
for arg in "$@"; do [[ "$arg" == --allow-cpu ]] && ALLOW_CPU=1; done

[[ "$ALLOW_CPU" == 1 ]] || "$PY" - <<'EOF' || fail "this needs a CUDA GPU visible to $PY (see the message above)"
import sys
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA GPU "
          "(nvidia-smi? CUDA_VISIBLE_DEVICES?)", file=sys.stderr)
    sys.exit(1)
print(f"GPU: {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")
EOF

if ! "$PY" -c "import tsdia" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
for module in accelerate yaml tqdm tsdia; do
    "$PY" -c "import $module" 2>/dev/null || fail "cannot import $module with $PY (pip install it, or set PYTHON)"
done

if ! "$PY" -c "import deepspeed, transformers" 2>/dev/null; then
    WHEELS=${WHEELS:-}
    if [[ -z "$WHEELS" ]]; then
        for dir in benchmarks/wheels shared/wheels; do
            if [[ -z "$WHEELS" ]] && compgen -G "$dir/deepspeed-*" >/dev/null; then WHEELS=$dir; fi
        done
    fi
    if [[ -n "$WHEELS" ]]; then
        echo "installing deepspeed and transformers from $WHEELS (offline)"
        # --no-build-isolation: a deepspeed sdist then builds against the installed torch, offline.
        "$PY" -m pip install -q --no-index --no-build-isolation --find-links "$WHEELS" deepspeed transformers ||
            echo "gpu.sh: installing from $WHEELS failed; ZeRO-2 will be skipped" >&2
    else
        echo "deepspeed/transformers not installed and no wheels found: ZeRO-2 will be skipped"
    fi
fi

# DeepSpeed compiles nothing for ZeRO-2 with a torch optimizer; keep any JIT cache out of the home dir anyway.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/tsdia-torch-extensions}
OUT=$(mktemp -d -t tsdia-gpu-XXXXXX)
STARTED=$SECONDS
if [[ "$ALLOW_CPU" == 1 ]]; then  # tiny sizes: every part runs end to end on CPU in a few minutes
    OVERHEAD=(--d-model 64 --layers 2 --heads 4 --batch-size 8 --frames 50 --steps 10 --warmup 3
        --num-workers 1 --rounds 1 --budget-s 400 --hard-limit-s 430)  # DeepSpeed starts slowly on CPU
    OVERHEAD_LIMIT=450
    BLOCKING=(--device cpu --params-m 20 --rounds 2)
    RESUME=(--allow-cpu)
else
    OVERHEAD=(--budget-s 250 --hard-limit-s 270)
    OVERHEAD_LIMIT=285
    BLOCKING=(--device cuda --params-m 300 --rounds 3)
    RESUME=()
fi

part() {  # part NAME LIMIT_S SCRIPT ARGS...: run one check, its output in $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name ($*) ==="
    set +e  # a failed part shows as FAILED in the table; the others still run
    timeout --signal=TERM "$limit" "$PY" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    set -e
    echo "--- $name: exit $rc, $((SECONDS - STARTED)) s so far"
}

# Budgets on a GPU: 285 + 100 + 90 s, plus the checks above: under 8 minutes.
part overhead "$OVERHEAD_LIMIT" benchmarks/gpu_overhead.py "${OVERHEAD[@]}" "$@"
part checkpoint_blocking 100 benchmarks/checkpoint_blocking.py "${BLOCKING[@]}"
part exact_resume 90 benchmarks/gpu_resume.py "${RESUME[@]}"
echo
echo "=== summary ($((SECONDS - STARTED)) s; outputs in $OUT) ==="
"$PY" benchmarks/table.py "$OUT/overhead.txt" "$OUT/checkpoint_blocking.txt" "$OUT/exact_resume.txt"
