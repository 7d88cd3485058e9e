#!/usr/bin/env bash
# The GPU check: the first thing to run on a machine with an NVIDIA GPU. It builds the extension
# against that machine's python3, runs the GPU tests against the real driver (with the O_DIRECT
# cuda case), checks the CUDA rules on hardware (tests/gpu: waits asleep, one retained context,
# fork, exit at the driver's shutdown, torch's current device), probes pinning the staging ring
# (and whether `ulimit -l` matters to it), runs the GPU load benchmark and a Blob-to-GPU load from
# a local Azurite, compares vLLM's weight loading where vLLM's CUDA build is importable, and
# prints a table last, also written to $OUT/gpu-check.txt. Within 5 minutes on an H100/H200.
# CONTRIBUTING.md gives the device call; scripts/rehearse_gpu_check.sh runs it as that machine
# would, on the fake driver, in CI.
#
#   bash bench/gpu_check.sh [--quick]    the check (--quick: a 1 GB benchmark instead of 4 GB)
#   bash bench/gpu_check.sh --check-only say, in one line, what this host lacks
#   bash bench/gpu_check.sh --blob       build, then the Azure Blob benchmark on that host's cores
#                                        and its GPU (bench_blob_load.py --gpu), about 3 minutes
#   bash bench/gpu_check.sh --vllm       build, then only the vLLM comparison (1 GB, one repeat,
#                                        at most VLLM_CHECK_TIMEOUT s, default 150)
#
# What it needs: python3 (3.10+) with pybind11, scikit-build-core, cmake, ninja (or make), pytest,
# numpy, safetensors, hypothesis and torch (the GPU image's python3 has them all), and a C++
# compiler. Nothing is installed into python3's environment (on the GPU image it is itself a
# virtualenv, and a venv made from it would not see its packages) and nothing reaches for a
# network: the package is built with pip --no-build-isolation --no-index into $WORK/site, and
# what the image lacks comes from the bundle (bench/device_bundle.sh, made where there is
# network and carried): its wheels installed with pip --no-index --no-deps --target $WORK/deps,
# both directories put on PYTHONPATH, and its Azurite unpacked into $WORK/azurite. Without the
# bundle the tests that need Azurite and the Blob row skip, each saying why in one line. vLLM's
# CUDA build is several GB and not bundled: where the host has none its row says so.
#
#   PYTHON    the interpreter (default python3)
#   OUT       where the table (gpu-check.txt), the log (gpu-check.log), the tests' log and the
#             JSON of the benchmarks go, 8 files at most (default /tmp/blob2gpu-gpu-check)
#   WORK      where the build, the bundle's packages and Azurite go (default /tmp/blob2gpu-gpu-work)
#   BUNDLE    the bundle (default .devbundle)
#   BUDGET_S  the whole run, build included (default 290)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
MODE=${1:-}
BUDGET_S=${BUDGET_S:-290}
START=$(date +%s)
OUT=${OUT:-/tmp/blob2gpu-gpu-check}
WORK=${WORK:-/tmp/blob2gpu-gpu-work}
BUNDLE=${BUNDLE:-.devbundle}
PY=${PYTHON:-python3}
TABLE=$OUT/gpu-check.txt
mkdir -p "$OUT" "$WORK"
rm -f "$TABLE" "$OUT"/{tests.log,rules.xml,bench.json,blob.json}  # none left from an earlier run
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$MODE" != "--check-only" ]; then
  # Everything also goes to $OUT/gpu-check.log; at exit the log is complete before the script ends.
  exec 3>&1 4>&2 > >(tee "$OUT/gpu-check.log") 2>&1
  tee_pid=$!
  trap 'exec 1>&3 2>&4; wait "$tee_pid" 2>/dev/null' EXIT
fi

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
step() { echo "== [$(($(date +%s) - START)) s] $*"; }
said() { if [ "$1" = 124 ]; then echo "124 (timed out)"; else echo "$1"; fi; }  # an exit status
# A step's timeout: its own cap, or what is left of the budget (at least 10 s).
cap() {
  local l
  l=$(left)
  if ((l < $1)); then echo $((l > 10 ? l : 10)); else echo "$1"; fi
}

# -- what the host has ----------------------------------------------------------------------------
MODULES="pip pybind11 scikit_build_core pytest numpy safetensors hypothesis torch"
missing_tools() {
  local miss=()
  command -v "$PY" >/dev/null 2>&1 || {
    echo "python3"
    return
  }
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || miss+=("python>=3.10")
  command -v "${CXX:-c++}" >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 ||
    miss+=("a C++ compiler")
  echo "${miss[@]}"
}
# The Python modules (and cmake and ninja-or-make, which may be wheels) python3 cannot import.
missing_modules() {
  "$PY" - "$MODULES" <<'PY'
import importlib.util, shutil, sys
names = sys.argv[1].split()
miss = [n for n in names if importlib.util.find_spec(n) is None]
if shutil.which("cmake") is None and importlib.util.find_spec("cmake") is None:
    miss.append("cmake")
if not (shutil.which("ninja") or shutil.which("make") or importlib.util.find_spec("ninja")):
    miss.append("ninja-or-make")
print(" ".join(n.replace("_", "-") for n in miss))
PY
}
# What the bundle brings, in one line.
bundle_state() {
  local parts=()
  [ -d "$BUNDLE/wheels" ] && parts+=("$(find "$BUNDLE/wheels" -name '*.whl' | wc -l) wheels")
  [ -f "$BUNDLE/azurite-node.tar.xz" ] && parts+=("Azurite on node")
  if ((${#parts[@]})); then
    echo "bundle $BUNDLE: ${parts[*]}"
  else
    echo "no bundle at $BUNDLE (bench/device_bundle.sh): the Azurite tests and the Blob row skip"
  fi
}

tools=$(missing_tools)
mods=""
[ -z "$tools" ] && mods=$(missing_modules)
if [ -n "$tools$mods" ]; then
  echo "gpu_check: missing: $tools${tools:+ }$mods (the GPU image's python3 has them; elsewhere install them)"
  exit 1
fi
if [ "$MODE" = "--check-only" ]; then
  echo "gpu_check: $("$PY" --version), $(${CXX:-c++} --version 2>/dev/null | head -1), everything it needs is here; $(bundle_state)"
  exit 0
fi

# -- the bundle: what the image lacks ------------------------------------------------------------
step "$(bundle_state)"
rm -rf "$WORK/site" "$WORK/deps" "$WORK/azurite" "$WORK"/*.log "$WORK"/*.xml
azure_skip=""
if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/deps" \
    "$BUNDLE"/wheels/*.whl 2>&1 | grep -v "^WARNING" | tail -3
  [ "${PIPESTATUS[0]}" = 0 ] || azure_skip="installing the bundle's wheels failed"
else
  azure_skip="no azure-storage-blob: the bundle's wheels are not here"
fi
export PYTHONPATH="$WORK/site:$WORK/deps${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$azure_skip" ]; then
  why=$("$PY" -c 'import azure.storage.blob' 2>&1 | tail -1)
  [ -z "$why" ] || azure_skip="azure-storage-blob does not import: $why"
fi
azurite=""
if [ -z "$azure_skip" ]; then
  if [ -f "$BUNDLE/azurite-node.tar.xz" ]; then
    mkdir -p "$WORK/azurite"
    # xz where the host has it, else Python's tarfile: the image need not have xz.
    if command -v xz >/dev/null; then
      tar -C "$WORK/azurite" -xJf "$BUNDLE/azurite-node.tar.xz"
    else
      "$PY" - "$BUNDLE/azurite-node.tar.xz" "$WORK/azurite" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    tar.extractall(sys.argv[2], filter="tar") if hasattr(tarfile, "tar_filter") else tar.extractall(sys.argv[2])
PY
    fi
    version=$(timeout 30 "$WORK/azurite/azurite-blob" --version 2>&1 | tail -1)
    if [[ "$version" =~ ^[0-9]+\.[0-9]+ ]]; then
      azurite="Azurite $version on node $(LD_LIBRARY_PATH="$WORK/azurite/node/lib" "$WORK/azurite/node/bin/node" --version)"
      export AZURITE_BLOB="$WORK/azurite/azurite-blob"
    else
      azure_skip="the bundle's Azurite does not start: $version"
    fi
  else
    azure_skip="no Azurite: the bundle's azurite-node.tar.xz is not here"
  fi
fi
echo "Azure: ${azurite:-skipped: $azure_skip}"

step "nvidia-smi"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tail -2
else
  echo "no nvidia-smi on PATH"
fi
step "build (pip --no-build-isolation --no-index --target $WORK/site)"
build_start=$(date +%s)
"$PY" -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir \
  --target "$WORK/site" . >"$WORK/build.log" 2>&1
build_rc=$?
build_s=$(($(date +%s) - build_start))
grep -E "scikit-build-core .* using CMake|The CXX compiler identification" "$WORK/build.log"
echo "build rc=$build_rc in $build_s s"
[ "$build_rc" = 0 ] || {
  {
    echo "gpu_check: the build failed; nothing else runs. The end of its output:"
    grep -v "^WARNING" "$WORK/build.log" | tail -60
  } | tee "$TABLE"
  exit 1
}
driver=$("$PY" - <<'PY' 2>&1 | tail -1
import blob2gpu
from blob2gpu import _core
info = _core.driver_info()
if info["available"] and info["devices"]:
    print(f"ok {info['devices'][0]['name']} (driver {info['version']}, {info['path']}), "
          f"blob2gpu {blob2gpu.__version__}")
else:
    print(f"none {info.get('error', 'no GPU')}")
PY
)
echo "CUDA driver: ${driver#* }"
if [ "${driver%% *}" != ok ]; then
  echo "gpu_check: blob2gpu does not import or finds no GPU: ${driver#* }" | tee "$TABLE"
  exit 1
fi
fake=0
[[ "$driver" == "ok blob2gpu fake GPU"* ]] && fake=1  # the rehearsal: smaller sizes

if [ "$MODE" = "--blob" ]; then
  [ -z "$azure_skip" ] || {
    echo "Blob benchmark: skipped: $azure_skip"
    exit 1
  }
  step "Blob benchmark (Azurite and the loaders on this host's $(nproc) cores, the real GPU)"
  timeout 420 "$PY" bench/bench_blob_load.py --gpu --repeats 3 --wait-idle 5 \
    --json "$OUT/blob.json" 2>&1 | tee "$WORK/blob.log" | tail -40
  blob_rc=${PIPESTATUS[0]}
  {
    echo "== blob2gpu Blob check"
    echo "build rc=$build_rc | blob bench rc=$blob_rc"
    sed -n '/^checkpoint: /,/^whole run/p' "$WORK/blob.log"
  } | tee "$TABLE"
  exit $((build_rc || blob_rc))
fi

if [ "$MODE" = "--vllm" ]; then
  step "vLLM: default loader vs blob2gpu, local files"
  OUT=$WORK bash bench/vllm_check.sh "$PY" | tee "$TABLE"
  exit "${PIPESTATUS[0]}"
fi

# From here every step runs and the table says how each went.
step "pinning the staging ring (does RLIMIT_MEMLOCK apply to cuMemHostAlloc?)"
# The ring a load would pin here: its shape as sized from this host for cuda:0.
ring_py='from blob2gpu.loading.pipelines import pipeline_settings; from blob2gpu.settings import resolve; s = pipeline_settings(resolve(), "cuda:0"); ring = s["staging_slots"] * s["staging_slot_bytes"]'
ring_mib=$("$PY" -c "$ring_py; print(ring >> 20)" 2>/dev/null || echo 256)
probe="$ring_py; import blob2gpu._core as c; print('pinned' if c.pinned_probe(0, ring) else 'refused (out of memory)')"
memlock=$(ulimit -l)
pin_now=$("$PY" -c "$probe" 2>&1 | tail -1)
pin_64k=$( (ulimit -S -l 64 && "$PY" -c "$probe") 2>&1 | tail -1)
echo "ulimit -l $memlock: ${ring_mib} MiB ring $pin_now | ulimit -l 64 (Docker's default): $pin_64k"

step "GPU tests (real driver)"
export BLOB2GPU_TEST_REAL_GPU=1
# On the repo's disk, not a tmpfs /tmp: the O_DIRECT case needs a filesystem that takes O_DIRECT.
basetemp=$PWD/.gpu-check-tmp
rm -rf "$basetemp" "$basetemp"-*
pytest=("$PY" -m pytest -q -p no:cacheprovider -rs -o junit_family=xunit1)  # per-test properties
# Round trips, DLPack export, failures, leaks, consumers, the fake's CUDA rules that also hold on a
# GPU (O_DIRECT into pinned slots), tensor selections, chunk verification (CRC32C, SHA-256) and
# the checksum kernels, on the real driver; their Azurite cases where the bundle brought Azurite.
tests="tests/integration/test_round_trip.py tests/integration/test_dlpack_export.py
  tests/integration/test_failures.py tests/fake_driver/test_leaks.py
  tests/fake_driver/test_gpu_consumers.py tests/fake_driver/test_cuda_hardware_rules.py
  tests/integration/test_selection.py tests/integration/test_integrity.py
  tests/unit/test_checksums.py"
# shellcheck disable=SC2086
timeout "$(cap 200)" "${pytest[@]}" --basetemp "$basetemp" --junitxml "$WORK/tests.xml" $tests \
  >"$OUT/tests.log" 2>&1
test_rc=$?
tail -15 "$OUT/tests.log"
summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|errors?)" "$OUT/tests.log" |
  sed 's/=//g; s/^ *//; s/ *$//' | paste -sd "+" -)
direct=$("$PY" - "$WORK/tests.xml" <<'PY' 2>/dev/null
import sys, xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).iter("testcase"):
    if case.get("name", "").startswith("test_direct_io"):
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                print(f"{kind}: {((node.get('message') or '').splitlines() or [''])[0][:150]}")
                break
        else:
            print("passed")
PY
)

step "CUDA rules on hardware (tests/gpu)"
timeout "$(cap 150)" "${pytest[@]}" --basetemp "$basetemp-2" --junitxml "$OUT/rules.xml" tests/gpu \
  >"$WORK/rules.log" 2>&1
rules_rc=$?
tail -12 "$WORK/rules.log"
cat "$WORK/rules.log" >>"$OUT/tests.log"
rules=$("$PY" - "$OUT/rules.xml" <<'PY' 2>&1
import re, sys, xml.etree.ElementTree as ET
try:
    cases = list(ET.parse(sys.argv[1]).iter("testcase"))
except (OSError, ET.ParseError) as exc:
    sys.exit(f"  no results ({exc})")
for case in cases:
    name = re.sub(r"^test_", "", case.get("name", "?"))
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    outcome = "passed"
    for kind in ("failure", "error", "skipped"):
        node = case.find(kind)
        if node is not None:
            text = (node.get("message") or node.text or "").strip().splitlines()
            outcome = f"{kind.upper()}: {text[0][:160] if text else ''}"
            break
    if "cpu_s" in props:
        outcome += (f" (process CPU {props['cpu_s']} s while waiting {props['wall_s']} s;"
                    f" a spinning wait: {props['control_cpu_s']} s in {props['control_wall_s']} s)")
    elif props:
        outcome += " (" + ", ".join(f"{k}: {v}" for k, v in props.items()) + ")"
    print(f"  {name}: {outcome}")
PY
)

step "GPU benchmark"
gb=4
[ "$MODE" = "--quick" ] && gb=1
(($(left) < 100)) && gb=1 # keep the budget when the build or the tests ran long
((fake)) && gb=0.25       # the rehearsal: the fake's device memory is this host's
timeout "$(cap 120)" "$PY" bench/bench_gpu_load.py --total-gb "$gb" --repeats 3 \
  --json "$OUT/bench.json" >"$WORK/bench.log" 2>&1
bench_rc=$?
tail -12 "$WORK/bench.log"

step "Blob to GPU: a local Azurite, blob2gpu onto the GPU against curl's ceiling"
blob_rc=0
if [ -n "$azure_skip" ]; then
  blob="Blob to GPU: skipped: $azure_skip"
elif (($(left) < 60)); then
  blob="Blob to GPU: skipped: $(left) s left of the ${BUDGET_S} s budget (bash bench/gpu_check.sh --blob runs it alone)"
else
  # The fake driver's rehearsal: its own row, a tenth of a GB.
  blob_args=(--gpu --only "ceiling,blob2gpu-cuda" --total-gb 1)
  ((fake)) && blob_args=(--only "ceiling,blob2gpu-cuda-fake" --total-gb 0.1)
  timeout "$(cap 100)" "$PY" bench/bench_blob_load.py "${blob_args[@]}" --shards 4 --repeats 1 \
    --wait-idle 0 --retries 0 --timeout "$(cap 90)" --json "$OUT/blob.json" >"$WORK/blob.log" 2>&1
  blob_rc=$?
  tail -25 "$WORK/blob.log"
  blob=$(grep -E "^checkpoint: |^(ceiling|blob2gpu-cuda)" "$WORK/blob.log" | cut -c1-200)
  [ "$blob_rc" = 0 ] || blob="Blob to GPU: rc=$blob_rc: $(tail -1 "$WORK/blob.log" | cut -c1-200)"
fi
[ -s "$WORK/blob.log" ] || echo "$blob"

step "vLLM: default loader vs blob2gpu, local files"
# Its own timeout, within what is left of the budget; skipped (one line) when under a minute is left.
if (($(left) >= 60)); then
  VLLM_CHECK_TIMEOUT=$(cap 150) OUT=$WORK bash bench/vllm_check.sh "$PY" >"$WORK/vllm-check.log" 2>&1
  vllm_rc=$?
else
  echo "vLLM comparison: skipped: $(left) s left of the ${BUDGET_S} s budget (bash bench/gpu_check.sh --vllm runs it alone)" \
    >"$WORK/vllm-check.log"
  vllm_rc=0
fi
cat "$WORK/vllm-check.log"
rm -rf "$basetemp" "$basetemp"-*

{
  echo
  echo "== blob2gpu GPU check ($(($(date +%s) - START)) s): ${driver#ok }"
  echo "build rc=$build_rc ($build_s s) | tests rc=$(said $test_rc) ($summary) | rules rc=$(said $rules_rc) | bench rc=$(said $bench_rc) | blob rc=$(said $blob_rc) | vllm rc=$vllm_rc"
  echo "Azure: ${azurite:-skipped: $azure_skip}"
  echo "O_DIRECT into pinned slots (cuda): ${direct:-not run}"
  echo "pinning the sized ${ring_mib} MiB ring: ulimit -l $memlock: $pin_now | ulimit -l 64: $pin_64k"
  echo "CUDA rules on hardware (tests/gpu):"
  echo "$rules"
  echo "  pinned refusals: not on hardware: they are faults only the fake driver injects (the pinning row is this host's answer)"
  sed -n '/GB, /,$p' "$WORK/bench.log"
  [ -s "$WORK/bench.log" ] && [ "$bench_rc" != 0 ] && echo "GPU benchmark: rc=$bench_rc: $(tail -1 "$WORK/bench.log")"
  echo "$blob"
  grep -E "^vLLM comparison|^\| |^blob2gpu local" "$WORK/vllm-check.log"
} | tee "$TABLE"
exit $((test_rc || rules_rc || bench_rc || blob_rc || vllm_rc))
