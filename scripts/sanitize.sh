#!/usr/bin/env bash
# Builds the core with AddressSanitizer + UBSan (CMake option BLOB2GPU_SANITIZE) and runs the tests
# that drive it hardest against that build: the header parser, every round trip, the CUDA path over
# the fake driver, failures, integrity, the native range reader (sockets, TLS, hostile answers)
# and the loads that read through it (faults mid-body, reads broken off when a load stops).
# Usage: scripts/sanitize.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
build=build/asan
pkg=build/asan-pkg
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBLOB2GPU_SANITIZE=ON \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$build" -j 2
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r python/blob2gpu "$pkg/"
cp "$build"/_core*.so "$pkg/blob2gpu/"
runtime="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# Python itself is not instrumented: leak reports would be its own; stop on any real finding.
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
LD_PRELOAD="$runtime" PYTHONPATH="$pkg" "$PY" -m pytest -q -p no:cacheprovider \
  tests/unit/test_header_validation.py tests/integration/test_round_trip.py tests/fake_driver/test_cuda_pipeline.py \
  tests/integration/test_failures.py tests/integration/test_integrity.py tests/integration/test_dlpack_export.py \
  tests/integration/test_selection.py tests/unit/test_checksums.py \
  tests/integration/test_native_range_reader.py tests/integration/test_native_loads.py \
  tests/integration/test_blob_faults.py "$@"
