#!/usr/bin/env bash
# A rehearsal of the GPU machine's first call (CONTRIBUTING.md, "The first call on a GPU machine"),
# on a machine without a GPU, so that the call works the first time there. .ci/run runs it on
# every commit, after scripts/test.sh (which installs Azurite). It stands in for that machine:
#   - its python3 (a virtualenv holding torch's CUDA build and the build and test tools): a
#     virtualenv made with `python3 -m venv`, which sees none of this machine's packages, holding
#     torch 2.13.0 (the CPU build here) and what else the image has that the check uses; made once
#     per list of packages and kept in ~/.cache/blob2gpu-ci/ (this machine's CPython, whose
#     version the bundle's wheels then match; the GPU image's is 3.12)
#   - the bundle the call carries (bench/device_bundle.sh), made for that python's version, kept
#     in ~/.cache/blob2gpu-ci/ per version of the bundle script and of Azurite
#   - libcuda: the fake CUDA driver of tests/fake_cuda (BLOB2GPU_CUDA_DRIVER)
#   - the call itself: the same command line, in a clean environment (that venv's python3 first on
#     PATH, no node on PATH, no proxy variables, no pip configuration or index) and without a
#     network: a network namespace of its own, loopback only, where `unshare -n` is allowed
# It fails unless the check exits 0 and writes its table within 300 s, the call's limit. The
# build directory is kept too (~/.cache/blob2gpu-ci/, per checkout) and made once before the timed
# run: the GPU machine's 16 cores build from scratch in about the time 2 cores here rebuild.
# Usage: scripts/rehearse_gpu_check.sh [--without-bundle]
#   --without-bundle  the call without .devbundle: the Azurite tests and the Blob row must skip,
#                     saying why, and the check still pass
set -euo pipefail
cd "$(dirname "$0")/.."
WITHOUT_BUNDLE=0
[ "${1:-}" = "--without-bundle" ] && WITHOUT_BUNDLE=1
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
LIMIT_S=300
# The device call's command (CONTRIBUTING.md); the tool sets OUT there, this script here.
DEVICE_COMMAND="bash bench/gpu_check.sh"
# What the GPU image's python3 holds that the check uses (KINDS: torch, pybind11,
# scikit-build-core, cmake, ninja, pytest, pytest-benchmark, hypothesis, numpy, safetensors,
# pyyaml, and requests, which azure-core needs).
IMAGE_PACKAGES="pybind11 scikit-build-core cmake ninja pytest pytest-benchmark hypothesis numpy
  safetensors pyyaml requests"
CACHE=$HOME/.cache/blob2gpu-ci
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
key() { printf '%s' "$*" | sha256sum | cut -c1-10; }

# shellcheck disable=SC2086 # the words, whatever the line breaks between them
image_env=$CACHE/gpu-image-py$pyver-torch-$TORCH_VERSION-$(key $IMAGE_PACKAGES)
if [ ! -f "$image_env/.complete" ]; then
  echo "== the GPU image's python3, a virtualenv: $image_env (once per list of packages)"
  rm -rf "$image_env"
  "$PY" -m venv "$image_env"
  "$image_env/bin/python" -m pip install -q "torch==$TORCH_VERSION" 2>&1 | { grep -v "^WARNING" || true; }
  # shellcheck disable=SC2086
  "$image_env/bin/python" -m pip install -q $IMAGE_PACKAGES 2>&1 | { grep -v "^WARNING" || true; }
  "$image_env/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION')"
  touch "$image_env/.complete"
fi

launcher=${AZURITE_BLOB:-.azurite/node_modules/.bin/azurite-blob}
azurite_version=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' \
  "$(dirname "$launcher")/../azurite/package.json")
bundle=$CACHE/gpu-bundle-py$pyver-$(sha256sum bench/device_bundle.sh | cut -c1-10)-azurite-$azurite_version
if [ ! -f "$bundle/.complete" ]; then
  echo "== the bundle for CPython $pyver: $bundle (once per version of bench/device_bundle.sh)"
  rm -rf "$bundle"
  PY_VERSION=$pyver BUNDLE=$bundle PYTHON=$PY AZURITE_BLOB=$launcher bash bench/device_bundle.sh
  touch "$bundle/.complete"
fi

fake=$("$PY" tests/fake_cuda/build.py)

# The check's PATH: the venv's bin, then this machine's tools without node (the image has none),
# in a directory kept per checkout (CMake keeps the compiler's path in the kept build directory).
bin=$CACHE/gpu-rehearsal-bin-$(key "$PWD")
if [ ! -d "$bin" ]; then
  fresh=$(mktemp -d)
  for dir in /usr/local/bin /usr/bin /bin; do
    for tool in "$dir"/*; do
      case "$(basename "$tool")" in node | nodejs | npm | npx | corepack) continue ;; esac
      [ -e "$fresh/$(basename "$tool")" ] || ln -s "$tool" "$fresh/$(basename "$tool")"
    done
  done
  mv -T "$fresh" "$bin" 2>/dev/null || rm -rf "$fresh"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
((WITHOUT_BUNDLE)) && bundle=$work/no-bundle
clean_env=(
  env -i HOME="$HOME" LANG=C.UTF-8 PATH="$image_env/bin:$bin" TERM=dumb
  BLOB2GPU_CUDA_DRIVER="$fake" OUT="$work/out" WORK="$work/work" BUNDLE="$bundle"
  PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1
  SKBUILD_BUILD_DIR="$CACHE/gpu-rehearsal-build-py$pyver-$(key "$PWD")"
)
# No network: a namespace of its own with only loopback up (Azurite listens there).
isolate=(unshare -n sh -c 'ip link set lo up && exec "$@"' isolate)
if ! unshare -n true 2>/dev/null || ! command -v ip >/dev/null; then
  echo "== no network namespace here (unshare -n or ip missing or refused): offline by --no-index only"
  isolate=()
fi

if [ ! -d "$CACHE/gpu-rehearsal-build-py$pyver-$(key "$PWD")" ]; then
  echo "== building once, untimed, into the kept build directory"
  "${clean_env[@]}" "$image_env/bin/python" -m pip install -q --no-build-isolation --no-deps \
    --no-index --target "$work/warm" . 2>&1 | { grep -v "^WARNING" || true; } | tail -3
fi

echo "== the device call, as the GPU machine runs it: $DEVICE_COMMAND"
start=$(date +%s)
set +e
# shellcheck disable=SC2086
"${clean_env[@]}" "${isolate[@]}" timeout "$LIMIT_S" $DEVICE_COMMAND
rc=$?
set -e
took=$(($(date +%s) - start))
echo "== rehearsal: rc=$rc in $took s (the device call's limit: $LIMIT_S s)"
table=$work/out/gpu-check.txt
[ "$rc" = 0 ] || {
  echo "rehearse_gpu_check: the check failed (rc=$rc)"
  exit 1
}
[ -s "$table" ] || {
  echo "rehearse_gpu_check: no table in \$OUT/gpu-check.txt"
  exit 1
}
# Every row is there, filled or skipped with its reason.
for row in "^build rc=0" "^Azure: " "^O_DIRECT into pinned slots" \
  "^pinning the sized [0-9]+ MiB ring" "^  busy_wait" "^  activation" "^  fork" "^  deinit" \
  "^  current_device" "^  pinned refusals" "^blob2gpu " "^blob2gpu at |^pinned peak: " \
  "^blob2gpu pipeline " "^checkpoint: |^Blob to GPU: skipped: " "^vLLM comparison"; do
  grep -qE "$row" "$table" || {
    echo "rehearse_gpu_check: the table has no row matching '$row'"
    exit 1
  }
done
if ((WITHOUT_BUNDLE)); then
  if ! grep -qE "^Azure: skipped: " "$table" || ! grep -qE "^Blob to GPU: skipped: " "$table"; then
    echo "rehearse_gpu_check: without the bundle, the Azure and Blob rows do not say they skipped"
    exit 1
  fi
fi
ls "$work/out"
