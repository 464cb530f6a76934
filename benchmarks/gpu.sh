#!/usr/bin/env bash
# tsdia vs a bare Accelerate loop on a GPU machine, under DDP and DeepSpeed ZeRO-2: one table, < 8 minutes.
#
#   benchmarks/gpu.sh                        # from anywhere; runs in the repository root
#   PYTHON=/opt/venv/bin/python WHEELS=/path/to/wheels benchmarks/gpu.sh [gpu_overhead.py options]
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

"$PY" - <<'EOF' || fail "this needs a CUDA GPU visible to $PY (see the message above)"
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
exec timeout --signal=TERM 450 "$PY" benchmarks/gpu_overhead.py "$@"
