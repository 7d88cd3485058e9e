#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (no network needed), build the extension, run the
# test suite against the REAL driver, then the GPU load benchmark, and print a short table last.
# Under 5 minutes on an H100/H200. Usage: bash bench/gpu_check.sh [--quick]
#
# bash bench/gpu_check.sh --blob: build, then the Azure Blob benchmark on that host's own cores
# and its GPU (bench_blob_load.py --gpu: Azurite, curl or its stand-in, the SDK baselines and
# blob2gpu on cpu and cuda), about 3 minutes. It needs .devbundle/ (bench/device_bundle.sh, run
# where there is network) carried along: node with a pruned Azurite, and the azure wheels.
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

if [ "${1:-}" = "--blob" ]; then
  echo "== Blob benchmark (Azurite and the loaders on this host's $(nproc) cores, the real GPU)"
  [ -f .devbundle/azurite-node.tar.xz ] || { echo "no .devbundle: run bench/device_bundle.sh and carry it"; exit 1; }
  mkdir -p /tmp/blob2gpu-azurite /tmp/blob2gpu-site
  tar -C /tmp/blob2gpu-azurite -xJf .devbundle/azurite-node.tar.xz || exit 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/blob2gpu-site .devbundle/wheels/*.whl 2>&1 | grep -v "^WARNING" | tail -3
  export PYTHONPATH=/tmp/blob2gpu-site${PYTHONPATH:+:$PYTHONPATH}
  export AZURITE_BLOB=/tmp/blob2gpu-azurite/azurite-blob
  timeout 420 "$PY" bench/bench_blob_load.py --gpu --repeats 3 --wait-idle 5 \
    --json "$OUT/blob.json" 2>&1 | tee "$OUT/blob.log" | tail -40
  blob_rc=${PIPESTATUS[0]}
  echo
  echo "== blob2gpu Blob check"
  echo "build rc=$build_rc | blob bench rc=$blob_rc"
  sed -n '/^checkpoint: /,/^whole run/p' "$OUT/blob.log"
  exit $(( build_rc || blob_rc ))
fi

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
