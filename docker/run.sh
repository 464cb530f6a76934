#!/usr/bin/env bash
# Run a tsdia image with docker or podman (same engine choice and podman set-up as build.sh).
#
#   docker/run.sh                                   # the test suite in tsdia:cpu
#   docker/run.sh -k config                         # pytest arguments
#   docker/run.sh --exp /tmp/exp tsdia-train configs/example.yml training.checkpoint.save_dir=/experiments/run1
#   docker/run.sh --exp /tmp/exp configs/example.yml training.checkpoint.save_dir=/experiments/run1   # same
#   docker/run.sh bash                              # a shell (add -it via TSDIA_RUN_ARGS="-it")
#   docker/run.sh --image tsdia:gpu --gpus all ...  # the GPU image (docker with the NVIDIA toolkit)
#
# Options (before the command): --image IMG (default tsdia:cpu), --exp HOST_DIR (bind-mounted at
# /experiments, created if missing, so the experiment stays on the host), --gpus SPEC.
# Extra engine options: TSDIA_RUN_ARGS="...". The container is removed on exit (--rm).
# /dev/shm is 2 GB (TSDIA_SHM_SIZE) instead of the engine's 64 MB; --gpus uses the host's IPC.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=docker/engine.sh
source "$HERE/engine.sh"

image="tsdia:cpu" opts=() ipc_host=0
while [ $# -gt 0 ]; do
    case "$1" in
        --image) image="${2:?}"; shift ;;
        --image=*) image="${1#*=}" ;;
        --exp) mkdir -p "${2:?}"; opts+=(-v "$(cd "$2" && pwd):/experiments"); shift ;;
        --exp=*) mkdir -p "${1#*=}"; opts+=(-v "$(cd "${1#*=}" && pwd):/experiments") ;;
        --gpus) opts+=(--gpus "${2:?}" --ipc=host); ipc_host=1; shift ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
    shift
done

tsdia_engine_setup
engine="$TSDIA_ENGINE"
# The engines' default /dev/shm is 64 MB; DeepSpeed's shm_comm and DataLoader workers use it.
[ "$ipc_host" = 1 ] || opts+=(--shm-size "${TSDIA_SHM_SIZE:-2g}")
# No --init: both images start under tini already.
# shellcheck disable=SC2086 # word splitting of TSDIA_RUN_ARGS intended
exec "$engine" run --rm "${opts[@]}" ${TSDIA_RUN_ARGS:-} "$image" "$@"
