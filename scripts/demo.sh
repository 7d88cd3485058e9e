#!/usr/bin/env bash
# Installs blob2gpu and runs the demo load: a generated sharded checkpoint loaded to the GPU when a
# CUDA driver is usable, else to the CPU, with the load report printed. `--model llama`: a
# transformers Llama cold-started to its first token instead (installs torch and transformers).
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
step "installing the build tools (scikit-build-core, pybind11, ninja) and numpy"
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.13" ninja numpy
extras="azure"
case " $* " in
  *" --model llama "*|*" --model=llama "*)  # a transformers model: torch first (the CPU build on disk)
    step "installing torch 2.13.0 (the build pip's index offers: CPU, or CUDA and its nvidia wheels)"
    "$PY" -m pip install -q torch==2.13.0
    extras="azure,transformers" ;;
esac
step "building and installing blob2gpu[$extras] (compiles the C++ core: a minute or two)"
"$PY" -m pip install -q --no-build-isolation ".[$extras]"
# The demo serves its checkpoint from a local Azurite when npm can install one; else local files.
# It goes where `blob2gpu emulator` finds it from any directory (tools/emulator.py).
azurite_dir=$("$PY" -c 'from blob2gpu.tools.emulator import user_azurite_dir; print(user_azurite_dir())')
if ! "$PY" -c 'import sys; from blob2gpu.tools.emulator import find_azurite; sys.exit(find_azurite() is None)' \
  && command -v npm >/dev/null; then
  step "installing Azurite (npm) into $azurite_dir"
  npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$azurite_dir" azurite@3.37.0 >&2 \
    || echo "azurite could not be installed: the demo reads local files" >&2
fi
step "running: blob2gpu demo $*"
exec "$PY" -m blob2gpu demo "$@"
