#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (no network needed), build the extension, run the
# test suite against the REAL driver (with the O_DIRECT cuda case), check pinning the staging ring
# (and whether `ulimit -l` matters to it), run the GPU load benchmark, compare vLLM's weight
# loading (default loader vs blob2gpu, local files; bench/vllm_check.sh) where vLLM's CUDA build is
# importable and the budget has time left, and print a short table last. Within 5 minutes on an
# H100/H200.
#
#   bash bench/gpu_check.sh [--quick]    the check (--quick: a 1 GB benchmark instead of 4 GB)
#   bash bench/gpu_check.sh --check-only only say, in one line, what this host lacks
#   bash bench/gpu_check.sh --blob       build, then the Azure Blob benchmark on that host's cores
#                                        and its GPU (bench_blob_load.py --gpu), about 3 minutes
#   bash bench/gpu_check.sh --vllm       build, then only the vLLM comparison (1 GB, one repeat,
#                                        at most VLLM_CHECK_TIMEOUT s, default 150)
#
# What it needs: python3 (3.10+), a C++ compiler, cmake, make or ninja, and the Python packages
# pybind11, scikit-build-core, pytest, numpy, safetensors, hypothesis and torch (a CUDA build). It
# checks them first. The host has no network: what is missing is installed from .devbundle/tools
# (bench/device_bundle.sh, run where there is network, then carried along) when it is there;
# otherwise one line says what is missing. Everything is installed into a venv that sees the
# system's packages (torch, and vLLM where the host has it: its CUDA build is several GB and is not
# bundled), so a PEP 668 "externally managed" Python is never written to.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
BUDGET_S=${BUDGET_S:-290}  # the whole run, build included
START=$(date +%s)
OUT=${OUT:-/tmp/blob2gpu-gpu-check}
VENV=${VENV:-$OUT/venv}
WHEELS=.devbundle/tools
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# A step's timeout: its own cap, or what is left of the budget (at least 10 s).
cap() { local l; l=$(left); (( l < $1 )) && echo $(( l > 10 ? l : 10 )) || echo "$1"; }

# -- what the host has ----------------------------------------------------------------------------
BASE_PY=${PYTHON:-python3}
MODULES="pybind11 scikit_build_core pytest numpy safetensors hypothesis torch"
missing_tools() {
  local miss=()
  command -v "$BASE_PY" >/dev/null 2>&1 || { echo "python3"; return; }
  "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || miss+=("python>=3.10")
  command -v "${CXX:-c++}" >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || miss+=("a C++ compiler")
  command -v make >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 || miss+=("make-or-ninja")
  echo "${miss[@]}"
}
# Python modules (and cmake, which may be a wheel) the interpreter $1 cannot import.
missing_modules() {
  "$1" - "$MODULES" <<'PY'
import importlib.util, shutil, sys
names = sys.argv[1].split()
miss = [n for n in names if importlib.util.find_spec(n) is None]
if shutil.which("cmake") is None and importlib.util.find_spec("cmake") is None:
    miss.append("cmake")
print(" ".join(n.replace("_", "-") for n in miss))
PY
}

tools=$(missing_tools)
mods=""
[ -z "$tools" ] && mods=$(missing_modules "$BASE_PY")
if [ "$MODE" = "--check-only" ]; then
  if [ -n "$tools$mods" ]; then
    bundle="run bench/device_bundle.sh where there is network and carry .devbundle/tools"
    [ -d "$WHEELS" ] && bundle="installable from .devbundle/tools: run without --check-only"
    echo "gpu_check: missing: $tools${tools:+ }$mods ($bundle)"
    exit 1
  fi
  echo "gpu_check: $("$BASE_PY" --version), $(${CXX:-c++} --version | head -1), everything it needs is here"
  exit 0
fi
[ -z "$tools" ] || { echo "gpu_check: missing: $tools (install them on the host)"; exit 1; }

# -- a venv over the system's packages ------------------------------------------------------------
echo "== environment: $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  # Without ensurepip (Debian's python3 without python3-venv) the venv borrows the system's pip.
  "$BASE_PY" -m venv --system-site-packages "$VENV" 2>/dev/null ||
    "$BASE_PY" -m venv --system-site-packages --without-pip "$VENV"
fi
PY=$VENV/bin/python
"$PY" -m pip --version >/dev/null 2>&1 || { echo "gpu_check: missing: pip (neither the venv nor the system has it)"; exit 1; }
mods=$(missing_modules "$PY")
if [ -n "$mods" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_check: missing: $mods (run bench/device_bundle.sh where there is network and carry .devbundle/tools)"; exit 1; }
  echo "installing from $WHEELS: $mods"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" $mods
  mods=$(missing_modules "$PY")
  [ -z "$mods" ] || { echo "gpu_check: missing after installing the bundle: $mods"; exit 1; }
fi

echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "== build"
build_start=$(date +%s)
set +e
"$PY" -m pip install -q --no-build-isolation --no-deps . 2>&1 | grep -v "^WARNING: Running pip" | tail -5
build_rc=${PIPESTATUS[0]}
set -e
echo "build rc=$build_rc in $(( $(date +%s) - build_start )) s"
[ "$build_rc" = 0 ] || { echo "gpu_check: the build failed; nothing else runs"; exit 1; }
"$PY" -c "import blob2gpu._core" || { echo "gpu_check: the built module does not import"; exit 1; }

if [ "$MODE" = "--blob" ]; then
  set +e
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

if [ "$MODE" = "--vllm" ]; then
  echo "== vLLM: default loader vs blob2gpu, local files"
  OUT=$OUT bash bench/vllm_check.sh "$PY"
  exit $?
fi

# From here every step runs and the table says how each went.
set +e
echo "== pinning the staging ring (does RLIMIT_MEMLOCK apply to cuMemHostAlloc?)"
probe='import blob2gpu._core as c; print("pinned" if c.pinned_probe(0, 8 * 32 << 20) else "refused (out of memory)")'
memlock=$(ulimit -l)
pin_now=$("$PY" -c "$probe" 2>&1 | tail -1)
pin_64k=$( (ulimit -S -l 64 && "$PY" -c "$probe") 2>&1 | tail -1)
echo "ulimit -l $memlock: 256 MiB ring $pin_now | ulimit -l 64 (Docker's default): $pin_64k"

echo "== GPU tests (real driver)"
export BLOB2GPU_TEST_REAL_GPU=1
# On the repo's disk, not a tmpfs /tmp: the O_DIRECT case needs a filesystem that takes O_DIRECT.
basetemp=$PWD/.gpu-check-tmp
rm -rf "$basetemp"
tests="tests/integration/test_round_trip.py tests/integration/test_dlpack_export.py tests/integration/test_failures.py tests/fake_driver/test_leaks.py
  tests/fake_driver/test_gpu_consumers.py tests/fake_driver/test_cuda_hardware_rules.py"
# shellcheck disable=SC2086
timeout "$(cap 130)" "$PY" -m pytest -q -p no:cacheprovider --basetemp "$basetemp" $tests 2>&1 |
  tee "$OUT/tests.log" | tail -25
test_rc=${PIPESTATUS[0]}
# Tensor selections, chunk verification (CRC32C, SHA-256) and the checksum kernels on the real
# driver; their Azurite cases need npm and azure-storage-blob, which this machine lacks.
timeout "$(cap 60)" "$PY" -m pytest -q -p no:cacheprovider --basetemp "$basetemp-2" \
  tests/integration/test_selection.py tests/integration/test_integrity.py tests/unit/test_checksums.py \
  -k "not blob and not cache and not publish and not wire and not md5" \
  2>&1 | tee -a "$OUT/tests.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || test_rc=1
summary=$(grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | paste -sd "+" -)
direct=$(timeout "$(cap 40)" "$PY" -m pytest -q -p no:cacheprovider --basetemp "$basetemp-3" -rs \
  tests/fake_driver/test_cuda_hardware_rules.py -k direct_io 2>&1 | grep -E "passed|failed|SKIPPED" | tail -1)
rm -rf "$basetemp" "$basetemp-2" "$basetemp-3"

echo "== GPU benchmark"
gb=4; [ "$MODE" = "--quick" ] && gb=1
(( $(left) < 100 )) && gb=1  # keep the budget when the build or the tests ran long
timeout "$(cap 120)" "$PY" bench/bench_gpu_load.py --total-gb "$gb" --repeats 3 \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -12
bench_rc=${PIPESTATUS[0]}

echo "== vLLM: default loader vs blob2gpu, local files"
# Its own timeout, within what is left of the budget; skipped (one line) when under a minute is left.
if (( $(left) >= 60 )); then
  VLLM_CHECK_TIMEOUT=$(cap 150) OUT=$OUT bash bench/vllm_check.sh "$PY" | tee "$OUT/vllm-check.log"
  vllm_rc=${PIPESTATUS[0]}
else
  echo "vLLM comparison: skipped: $(left) s left of the ${BUDGET_S} s budget (bash bench/gpu_check.sh --vllm runs it alone)" |
    tee "$OUT/vllm-check.log"
  vllm_rc=0
fi

echo
echo "== blob2gpu GPU check ($(( $(date +%s) - START )) s)"
echo "build rc=$build_rc | tests rc=$test_rc ($summary) | bench rc=$bench_rc | vllm rc=$vllm_rc"
echo "O_DIRECT into pinned slots (cuda): ${direct:-not run}"
echo "pinning a 256 MiB ring: ulimit -l $memlock: $pin_now | ulimit -l 64: $pin_64k"
sed -n '/GB, /,$p' "$OUT/bench.log"
grep -E "^vLLM comparison|^\| |^blob2gpu local" "$OUT/vllm-check.log"
exit $(( test_rc || bench_rc || vllm_rc ))
