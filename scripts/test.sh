#!/usr/bin/env bash
# Installs what the tests need (idempotent on a machine that has it) and runs them.
# torch comes first and pinned: the CPU build of 2.13.0 is what these machines carry, and the test
# extra's range is satisfied by it, so pip downloads no CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "==> $*" >&2; }  # what the silent minutes are spent on, one line per step
# Installs into whichever python PY is: a virtualenv when one is active. Without one, say so (and
# how to make one) but go on, so the command works as written on a fresh machine.
if [ "$("$PY" -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or "CONDA_PREFIX" in os.environ))')" != 1 ]; then
  echo "note: no virtualenv is active: installing into $("$PY" -c 'import sys; print(sys.prefix)')'s packages" \
    "(to keep them apart: python3 -m venv .venv && . .venv/bin/activate, then run this again)" >&2
fi
step "installing torch 2.13.0 (the build pip's index offers: CPU, or CUDA and its nvidia wheels)"
"$PY" -m pip install -q "torch==2.13.0"
step "installing the build tools (scikit-build-core, pybind11, ninja)"
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.13" ninja
step "building and installing blob2gpu[test] (compiles the C++ core: a minute or two)"
"$PY" -m pip install -q --no-build-isolation ".[test]"
# The tests talk to a real Azurite (npm), installed into .azurite/ once.
if [ ! -x .azurite/node_modules/.bin/azurite-blob ]; then
  step "installing Azurite (npm) into .azurite/"
  npm install --no-save --no-audit --no-fund --loglevel=error --prefix .azurite azurite@3.37.0
fi
step "running the tests"
exec "$PY" -m pytest -q "$@"
