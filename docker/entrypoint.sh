#!/bin/sh
# Entry point of the tsdia images (docker/Dockerfile.cpu, docker/Dockerfile).
#   (no arguments)          run the test suite:  python -m pytest -q tests
#   -k expr, --flag, ...    the same with extra pytest arguments
#   tests/... [pytest args] pytest on those tests:  python -m pytest -q tests/test_x.py -k expr
#   CONFIG.yml [overrides]  train:  tsdia-train CONFIG.yml [overrides]
#   --config CONFIG ...     train:  tsdia-train --config CONFIG ... (also -c CONFIG)
#   any other command       exec it, e.g.  tsdia-train configs/example.yml training.checkpoint.save_dir=/experiments/run1
set -e
if [ $# -eq 0 ]; then
    exec python -m pytest -q tests
fi
case "$1" in
    -c | --config | --config=*) exec tsdia-train "$@" ;;
    -*) exec python -m pytest -q tests "$@" ;;
    tests | tests/*) exec python -m pytest -q "$@" ;;
    *.yml | *.yaml) exec tsdia-train "$@" ;;
esac
exec "$@"
