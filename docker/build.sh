#!/usr/bin/env bash
# Build a tsdia image with whichever engine works here: docker if its daemon answers, else podman
# (installed and configured on the fly on a bare Debian host, see docker/engine.sh).
#
#   docker/build.sh [cpu|gpu] [--tag TAG] [--target STAGE] [--no-cache] [--build-arg K=V]...
#
#   cpu  (default) docker/Dockerfile.cpu: Debian 12 + CPU torch + tsdia[dev] + tests + Slurm.
#        Tag tsdia:cpu. On a registry-less host the debian:bookworm base is made with debootstrap.
#   gpu  docker/Dockerfile: CUDA PyTorch base (needs a registry) + DeepSpeed + tsdia. Tag tsdia:gpu.
#        e.g. --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
#
# Idempotent: reruns reuse the base image and every unchanged layer (a change under src/ rebuilds
# only the last layer). The build context is a staging folder (build/docker/context-<flavor>)
# holding only what the image needs, so nothing else in the repository invalidates the cache.
#
# Environment: TSDIA_ENGINE=docker|podman, TSDIA_TORCH_WHEEL=<path to a CPU torch wheel>,
#              TSDIA_TORCH_VERSION (default 2.13.0), TSDIA_CA_BUNDLE (default the system bundle).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=docker/engine.sh
source "$HERE/engine.sh"
REPO="$TSDIA_REPO_ROOT"

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

flavor=cpu tag="" target="" extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        cpu|gpu) flavor="$1" ;;
        --tag|-t) tag="${2:?--tag needs a value}"; shift ;;
        --tag=*) tag="${1#*=}" ;;
        --target) target="${2:?--target needs a value}"; shift ;;
        --target=*) target="${1#*=}" ;;
        --no-cache) extra+=(--no-cache) ;;
        --build-arg) extra+=(--build-arg "${2:?--build-arg needs K=V}"); shift ;;
        --build-arg=*) extra+=(--build-arg "${1#*=}") ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
    shift
done
tag="${tag:-tsdia:$flavor}"
case "$flavor" in
    cpu) dockerfile="$HERE/Dockerfile.cpu" ;;
    gpu) dockerfile="$HERE/Dockerfile" ;;
esac

t_start=$SECONDS
tsdia_engine_setup
engine="$TSDIA_ENGINE"
tsdia_log "engine: $engine${CONTAINERS_CONF:+ (CONTAINERS_CONF=$CONTAINERS_CONF)}"

# --- the CPU torch wheel -------------------------------------------------------------------------
# PyPI's torch for Linux x86_64 is the CUDA build (+3 GB of nvidia wheels). Use a CPU wheel:
# TSDIA_TORCH_WHEEL, else one lying in pip's find-links (/opt/wheels on this kind of machine),
# else download it from PyTorch's CPU index, else `pip download torch==VER` as pip is configured.
find_torch_wheel() {
    local ver="${TSDIA_TORCH_VERSION:-2.13.0}" arch dirs=() links=() d w dl
    arch="$(uname -m)"
    if [ -n "${TSDIA_TORCH_WHEEL:-}" ]; then
        [ -f "$TSDIA_TORCH_WHEEL" ] || tsdia_die "TSDIA_TORCH_WHEEL=$TSDIA_TORCH_WHEEL: no such file"
        echo "$TSDIA_TORCH_WHEEL"; return
    fi
    dirs+=(/opt/wheels)
    [ -n "${PIP_FIND_LINKS:-}" ] && read -r -a links <<<"$PIP_FIND_LINKS" && dirs+=("${links[@]}")
    if command -v python3 >/dev/null; then
        # shellcheck disable=SC2207
        dirs+=($(python3 -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | sed 's#^file://##'))
    fi
    for d in "${dirs[@]}"; do
        for w in "$d"/torch-"$ver"+cpu-cp311-cp311-*"$arch".whl; do
            [ -f "$w" ] && { echo "$w"; return; }
        done
    done
    dl="$TSDIA_STATE_DIR/wheel-download"
    mkdir -p "$dl"
    for w in "$dl"/torch-"$ver"*-cp311-cp311-*"$arch".whl; do
        [ -f "$w" ] && { echo "$w"; return; }
    done
    tsdia_log "no local CPU torch wheel: downloading torch==$ver for cp311/$arch"
    python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.11 \
            --platform "manylinux_2_28_$arch" --index-url https://download.pytorch.org/whl/cpu \
            -d "$dl" "torch==$ver" >&2 \
        || python3 -m pip download -q --no-deps -d "$dl" "torch==$ver" >&2 \
        || tsdia_die "could not get a torch $ver wheel; set TSDIA_TORCH_WHEEL=/path/to/torch-...-cp311-...whl"
    for w in "$dl"/torch-"$ver"*-cp311-cp311-*.whl; do
        [ -f "$w" ] && { echo "$w"; return; }
    done
    tsdia_die "pip download gave no cp311 torch wheel in $dl"
}

# --- the staging build context -------------------------------------------------------------------
# One build at a time per flavor (parallel test workers): the context is rewritten below.
mkdir -p "$TSDIA_STATE_DIR"
if command -v flock >/dev/null; then
    exec 8>"$TSDIA_STATE_DIR/build-$flavor.lock"
    flock -w 1800 8 || tsdia_die "another build.sh $flavor holds $TSDIA_STATE_DIR/build-$flavor.lock"
fi
ctx="$TSDIA_STATE_DIR/context-$flavor"
needs_source=1
case "$target" in system|torch|deps) needs_source=0 ;; esac
if [ "$needs_source" = 1 ]; then
    for p in pyproject.toml src; do
        [ -e "$REPO/$p" ] || tsdia_die "$REPO/$p is missing: the image installs the tsdia package (use --target torch for a deps-only image)"
    done
fi
mkdir -p "$ctx"
find "$ctx" -mindepth 1 -maxdepth 1 ! -name wheels -exec rm -rf {} +
mkdir -p "$ctx/docker" "$ctx/src" "$ctx/tests" "$ctx/configs" "$ctx/slurm"
present=()
for p in pyproject.toml README.md src tests configs slurm; do
    [ -e "$REPO/$p" ] && present+=("$p")
done
if [ ${#present[@]} -gt 0 ]; then
    tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
        --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache -cf - "${present[@]}" | tar -C "$ctx" -xf -
fi
[ -e "$ctx/README.md" ] || : >"$ctx/README.md"
[ -e "$ctx/pyproject.toml" ] || : >"$ctx/pyproject.toml"
cp "$HERE/entrypoint.sh" "$HERE/pyproject_deps.py" "$ctx/docker/"

build_args=()
if [ "$flavor" = cpu ]; then
    wheel="$(find_torch_wheel)"
    wname="$(basename "$wheel")"
    mkdir -p "$ctx/wheels"
    find "$ctx/wheels" -mindepth 1 ! -name "$wname" -delete
    if [ ! -f "$ctx/wheels/$wname" ] || ! cmp -s "$wheel" "$ctx/wheels/$wname"; then
        rm -f "$ctx/wheels/$wname"
        ln "$wheel" "$ctx/wheels/$wname" 2>/dev/null || cp "$wheel" "$ctx/wheels/$wname"
    fi
    build_args+=(--build-arg "TORCH_WHEEL=$wname")
    tsdia_log "torch wheel: $wheel"
fi

# --- build -----------------------------------------------------------------------------------------
# The host's CA bundle as a build secret: pip inside the build trusts what the host trusts
# (needed behind a TLS-intercepting proxy), and the bundle never lands in a layer.
ca="${TSDIA_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
[ -s "$ca" ] && build_args+=(--secret "id=hostca,src=$ca")
[ -n "$target" ] && build_args+=(--target "$target")

if [ "$engine" = podman ]; then
    [ "$flavor" = cpu ] && tsdia_ensure_base_image
    cmd=(podman build --layers -f "$dockerfile" -t "$tag")
else
    export DOCKER_BUILDKIT=1   # RUN --mount and --secret need BuildKit
    cmd=(docker build -f "$dockerfile" -t "$tag")
fi
cmd+=("${build_args[@]}" "${extra[@]}" "$ctx")
tsdia_log "${cmd[*]}"
t_build=$SECONDS
"${cmd[@]}"
# Old layers that no image uses any more (left by rebuilds) would pile up under /var/lib/containers.
[ "$engine" = podman ] && podman image prune -f >/dev/null
size="$("$engine" image inspect --format '{{.Size}}' "$tag" 2>/dev/null || echo 0)"
tsdia_log "built $tag in $((SECONDS - t_build)) s (total $((SECONDS - t_start)) s), $((size / 1000000)) MB"
