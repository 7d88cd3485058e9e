#!/usr/bin/env bash
# Packs .devbundle/ (git-ignored): what bench/gpu_check.sh needs on a GPU host that has no network:
#   tools/               the build and test tools gpu_check.sh installs into its venv when the host
#                        lacks them (pytest, hypothesis, safetensors, numpy, scikit-build-core,
#                        pybind11, ninja, cmake and what they need; torch is the host's), for
#                        CPython $PY_VERSIONS (default 3.12) on x86-64 (about 50 MB)
#   and, for `bash bench/gpu_check.sh --blob` (when .azurite/ and node are here):
#   azurite-node.tar.xz  this machine's node binary and Azurite (.azurite/) pruned to the files it
#                        loads while the Blob tests run (HTTP, HTTPS, OAuth, SAS, faults), with a
#                        launcher, azurite-blob, that runs it on that node (about 25 MB)
#   wheels/              azure-storage-blob and what it needs that the GPU host lacks (about 6 MB)
# Run it here once (about 3 minutes), then name in the device run's carry (64 MiB at most in all)
# .devbundle/tools for the GPU check, or .devbundle/wheels and .devbundle/azurite-node.tar.xz for
# --blob.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=.devbundle
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/tools"

echo "== wheels for gpu_check.sh's build and tests (tools/)"
for version in ${PY_VERSIONS:-3.12}; do
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --only-binary=:all: --python-version "$version" --implementation cp \
    $PLATFORMS -d "$OUT/tools" pytest hypothesis safetensors numpy "scikit-build-core>=0.10" \
    "pybind11>=2.13" ninja cmake 2>&1 | grep -v "^WARNING" || true
done
ls "$OUT/tools" | sed -e 's/-[0-9].*//' | sort -u | paste -sd " " -

if [ ! -x .azurite/node_modules/.bin/azurite-blob ] || ! command -v node >/dev/null; then
  echo "no .azurite or node here (run .ci/run or scripts/test.sh first): no Blob bundle, so"
  echo "gpu_check.sh --blob will not run; the GPU check itself will"
  du -sh "$OUT"/*
  exit 0
fi
node=$(command -v node)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== which of Azurite's files it loads (the Blob tests, with a hook in every node process)"
cat > "$work/hook.js" <<'JS'
// Writes the files this node process has loaded (its module cache), twice a second and at exit.
const fs = require("fs");
const out = `${process.env.AZURITE_TRACE_DIR}/${process.pid}.txt`;
const dump = () => { try { fs.writeFileSync(out, Object.keys(require.cache).join("\n")); } catch (e) {} };
setInterval(dump, 500).unref();
process.on("exit", dump);
JS
mkdir "$work/trace"
NODE_OPTIONS="--require $work/hook.js" AZURITE_TRACE_DIR="$work/trace" \
  "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_blob_source.py tests/integration/test_blob_https.py \
  tests/integration/test_blob_faults.py tests/integration/test_blob_proxy.py | tail -1

echo "== pruned Azurite and node"
"$PY" - "$work/trace" "$work/azurite" <<'PYTHON'
import os, shutil, sys
from pathlib import Path

trace, dest = Path(sys.argv[1]), Path(sys.argv[2])
root = Path(".azurite").resolve()
loaded = {Path(line) for t in trace.glob("*.txt") for line in t.read_text().split("\n") if line}
loaded = {p for p in loaded if p.is_relative_to(root) and p.is_file()}
# Node reads each package.json between a loaded file and the root (main, exports, type).
manifests = {d / "package.json" for p in loaded for d in p.parents if d.is_relative_to(root)}
for f in loaded | {m for m in manifests if m.is_file()}:
    target = dest / f.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(f, target)
print(f"{len(loaded)} files loaded, {sum(f.stat().st_size for f in loaded) / 1e6:.1f} MB")
PYTHON
cp "$node" "$work/azurite/node"
cat > "$work/azurite/azurite-blob" <<'SH'
#!/bin/sh
# Azurite's blob service on the node beside this script (a pruned bundle: bench/device_bundle.sh).
here=$(dirname "$(readlink -f "$0")")
exec "$here/node" "$here/node_modules/azurite/dist/src/blob/main.js" "$@"
SH
chmod +x "$work/azurite/azurite-blob"
tar -C "$work/azurite" -cf - . | xz -T0 -4 > "$OUT/azurite-node.tar.xz"

echo "== wheels for Python 3.12 on x86-64"
versions=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -iE "^(azure-storage-blob|azure-core|isodate|cryptography|cffi|pycparser)==")
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $PLATFORMS -d "$OUT/wheels" $versions 2>&1 | grep -v "^WARNING" || true

echo "== checking the launcher on its own node"
"$work/azurite/azurite-blob" --version
du -sh "$OUT"/*
