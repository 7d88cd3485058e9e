#!/usr/bin/env bash
# The wheel as users get it: build it (scripts/build_wheel.sh, unless a wheel is given), install
# it into a fresh virtual environment that has no compiler, CMake or pybind11 on its PATH (the
# wheel, torch and the Azure SDK only; `node` is the one other program there, for Azurite) and run
# scripts/smoke_test.py in it: import, `blob2gpu --version`, a load from a real Azurite into torch,
# a load over the fake CUDA driver (built here first by the test tooling, with the compiler that
# the smoke environment lacks).
# Usage: scripts/wheel_smoke.sh [WHEEL]   (PYTHON picks the interpreter; CI's is python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ $# -ge 1 ]; then
  wheel=$1
else
  scripts/build_wheel.sh
  tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheel=$(ls -t dist/blob2gpu-*-"$tag"-"$tag"-manylinux_2_28_"$(uname -m)".whl | head -1)
fi
fake_driver=$("$PY" tests/fake_cuda/build.py)
if [ ! -x .azurite/node_modules/.bin/azurite-blob ]; then
  npm install --no-save --no-audit --no-fund --loglevel=error --prefix .azurite azurite@3.37.0
fi
node=$(command -v node) || { echo "wheel_smoke: node is needed for Azurite"; exit 1; }

env_dir=build/smoke
rm -rf "$env_dir" && mkdir -p "$env_dir/bin"
"$PY" -m venv "$env_dir/venv"  # not --system-site-packages: it sees only what it installs
ln -s "$node" "$env_dir/bin/node"
# torch first and pinned (the CPU build these machines carry), as scripts/test.sh does.
pip_install() { "$env_dir/venv/bin/python" -m pip install -q --no-compile "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip_install "torch==2.13.0"
pip_install "$wheel" "azure-storage-blob>=12.19"
"$env_dir/venv/bin/python" -m pip show -q blob2gpu >/dev/null
echo "== smoke test of $(basename "$wheel") in $env_dir/venv"
env -u CC -u CXX -u CMAKE_ARGS -u PYTHONPATH -u BLOB2GPU_CUDA_DRIVER \
  PATH="$PWD/$env_dir/venv/bin:$PWD/$env_dir/bin" \
  "$env_dir/venv/bin/python" scripts/smoke_test.py --fake-driver "$fake_driver" --require-no-toolchain
