#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (no network needed), build the extension, run the
# test suite against the REAL driver, then the GPU load benchmark, and print a short table last.
# Under 5 minutes on an H100/H200. Usage: bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/blob2gpu-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "== build"
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps . 2>&1 | grep -v "^WARNING: Running pip" | tail -5
build_rc=${PIPESTATUS[0]}
echo "build rc=$build_rc in $(( $(date +%s) - start )) s"

echo "== GPU tests (real driver)"
export BLOB2GPU_TEST_REAL_GPU=1
tests="tests/test_round_trip.py tests/test_dlpack_export.py tests/test_failures.py tests/test_leaks.py tests/test_gpu_consumers.py"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider $tests 2>&1 | tee "$OUT/tests.log" | tail -25
test_rc=${PIPESTATUS[0]}
# Tensor selections, chunk verification (CRC32C, SHA-256) and the checksum kernels on the real
# driver; their Azurite cases need npm and azure-storage-blob, which this machine lacks.
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_selection.py tests/test_integrity.py \
  tests/test_checksums.py -k "not blob and not cache and not publish and not wire and not md5" \
  2>&1 | tee -a "$OUT/tests.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || test_rc=1
summary=$(grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | paste -sd "+" -)

echo "== GPU benchmark"
gb=4; [ "${1:-}" = "--quick" ] && gb=1
timeout 150 "$PY" bench/bench_gpu_load.py --total-gb "$gb" --repeats 3 --json "$OUT/bench.json" \
  2>&1 | tee "$OUT/bench.log" | tail -12
bench_rc=${PIPESTATUS[0]}

echo
echo "== blob2gpu GPU check"
echo "build rc=$build_rc | tests rc=$test_rc ($summary) | bench rc=$bench_rc"
sed -n '/GB, /,$p' "$OUT/bench.log"
exit $(( build_rc || test_rc || bench_rc ))
