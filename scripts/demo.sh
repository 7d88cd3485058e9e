#!/usr/bin/env bash
# Installs blob2gpu and runs the demo load: a generated sharded checkpoint loaded to the GPU when a
# CUDA driver is usable, else to the CPU, with the load report printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.13" ninja numpy
"$PY" -m pip install -q --no-build-isolation .
exec "$PY" -m blob2gpu demo "$@"
