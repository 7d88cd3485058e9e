#!/usr/bin/env bash
# Packs .devbundle/ (git-ignored): what bench/gpu_check.sh needs on the GPU machine that its image
# lacks. That image's python3 (CPython 3.12, manylinux x86-64, a virtualenv) already holds torch's
# CUDA build, pybind11, scikit-build-core, cmake, ninja, pytest, pytest-benchmark, hypothesis,
# numpy, safetensors, pyyaml and requests; it has no azure-storage-blob, no node, and no network.
# The bundle is:
#   wheels/              azure-storage-blob and the packages it needs that the image lacks
#                        (azure-core, isodate, cryptography, cffi, pycparser), at the versions the
#                        tests use here, for CPython $PY_VERSION; gpu_check.sh installs them with
#                        pip install --no-index --no-deps --target (about 5 MB)
#   azurite-node.tar.xz  Azurite for the Blob tests and the Blob-to-GPU row: Debian's nodejs and the
#                        libraries it links but an Ubuntu image may lack (libnode, ICU, OpenSSL,
#                        libuv, c-ares, nghttp2, brotli, zlib), fetched with apt-get download and
#                        unpacked with dpkg -x into a private prefix, and the files of the npm package
#                        (.azurite/) that Azurite loads while this project's Blob tests run, with a
#                        launcher, azurite-blob (about 25 MB)
# Run it here, where there is network (a few minutes), then name .devbundle in the device run's
# carry (CONTRIBUTING.md gives the call). Nothing in it reaches for a network on the device.
#
#   bash bench/device_bundle.sh
#
#   PY_VERSION  the wheels' CPython (default 3.12, the GPU image's; scripts/rehearse_gpu_check.sh
#               makes one for its own)
#   BUNDLE      where to write it (default .devbundle)
#   PYTHON      the tests' interpreter here (default python3): its installed versions are the ones
#               bundled, and it runs the Blob tests that show which of Azurite's files load
#   AZURITE_BLOB  the npm package's launcher (default .azurite/node_modules/.bin/azurite-blob)
#
# Debian's libnode reads three of its JavaScript builtins (acorn, cjs-module-lexer, undici) from
# /usr/share/nodejs, which the GPU image has not, and writing there is not ours to do: the bundle's
# libnode has that path rewritten to one of the same length under /tmp (/tmp/b2g-n-<hash>, the hash
# of those files), which the launcher fills from the bundle before it starts node.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
DEST=${BUNDLE:-.devbundle}
launcher=${AZURITE_BLOB:-.azurite/node_modules/.bin/azurite-blob}
modules=$(cd "$(dirname "$launcher")/.." && pwd)  # .../node_modules
PLATFORMS="--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# What azure-storage-blob needs that the image has not (it has requests and typing-extensions).
IMAGE_LACKS="azure-storage-blob azure-core isodate cryptography cffi pycparser"

[ -f "$modules/azurite/package.json" ] || {
  echo "device_bundle: no Azurite at $modules (run scripts/test.sh, or set AZURITE_BLOB)" >&2
  exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$DEST"
mkdir -p "$DEST/wheels"

echo "== wheels for CPython $PY_VERSION, manylinux x86-64 (what the GPU image lacks)"
pins=""
for name in $IMAGE_LACKS; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  pins="$pins $name${version:+==$version}"
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp $PLATFORMS -d "$DEST/wheels" $pins 2>&1 | grep -v "^WARNING" || true
for name in $IMAGE_LACKS; do
  ls "$DEST/wheels/$(echo "$name" | tr - _)"-*.whl >/dev/null 2>&1 ||
    { echo "device_bundle: no wheel of $name for CPython $PY_VERSION" >&2; exit 1; }
done
echo "$pins"

echo "== Debian's nodejs and the libraries it links (apt-get download, dpkg -x)"
node_version=$(apt-cache madison nodejs | awk -F'|' '/debian\.org/ {gsub(/ /, "", $2); print $2; exit}')
[ -n "$node_version" ] || { echo "device_bundle: apt knows no Debian nodejs" >&2; exit 1; }
libnode=$(apt-cache show "nodejs=$node_version" | sed -n 's/^Depends: //p' | tr ',' '\n' |
  grep -o 'libnode[0-9]*' | head -1)
# Everything libnode depends on but the C and C++ runtimes, which any image with a compiler has.
deps=$(apt-cache show "$libnode=$node_version" | sed -n 's/^Depends: //p' | head -1 | tr ',' '\n' |
  sed -e 's/^ *//' -e 's/[ (].*//' | grep -vE '^(libc6|libgcc-s1|libstdc\+\+6)$' | paste -sd ' ' -)
debs="nodejs=$node_version $libnode=$node_version $deps"
mkdir "$work/debs"
# shellcheck disable=SC2086
(cd "$work/debs" && apt-get download -q $debs >/dev/null 2>&1) || {
  apt-get update -qq >/dev/null
  # shellcheck disable=SC2086
  (cd "$work/debs" && apt-get download -q $debs >/dev/null)
}
echo "$debs"
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/root"; done

echo "== the node prefix: bin/node, lib/ (its libraries), builtins/ (its JavaScript builtins)"
node_dir=$work/bundle/node
mkdir -p "$node_dir/bin" "$node_dir/lib" "$node_dir/builtins"
cp "$work/root/usr/bin/node" "$node_dir/bin/node"
# Every shared library of the packages (libnode's and its dependencies'), their soname links as
# links; not ICU's tools' libraries, which node does not load.
find "$work/root" -name '*.so.*' \( -type f -o -type l \) ! -name 'libicu[it][oeu]*' \
  -exec cp -a {} "$node_dir/lib/" \;
for dep in acorn acorn-walk cjs-module-lexer undici; do
  cp -R "$work/root/usr/share/nodejs/$dep" "$node_dir/builtins/"
done
builtins_hash=$(cd "$node_dir/builtins" && find . -type f | LC_ALL=C sort | xargs sha256sum |
  sha256sum | cut -c1-6)
"$PY" - "$node_dir/lib" "/tmp/b2g-n-$builtins_hash" <<'PYTHON'
import sys
from pathlib import Path

lib_dir, new = Path(sys.argv[1]), sys.argv[2].encode()
old = b"/usr/share/nodejs"
assert len(new) == len(old), (new, old)  # the strings are C strings in place: same length
libnode = next(lib_dir.glob("libnode.so.*"))
data = libnode.read_bytes()
if old not in data:
    sys.exit(f"{libnode.name} does not name {old.decode()}: the patch would do nothing")
libnode.write_bytes(data.replace(old, new))
print(f"{libnode.name}: {data.count(old)} mentions of {old.decode()} now {new.decode()}")
PYTHON
cat > "$work/bundle/azurite-blob" <<SH
#!/bin/sh
# Azurite's blob service on the Debian node beside this script (bench/device_bundle.sh).
here=\$(dirname "\$(readlink -f "\$0")")
# The bundle's libnode reads its JavaScript builtins from here (a copy made once, never changed).
builtins=/tmp/b2g-n-$builtins_hash
if [ ! -d "\$builtins" ]; then
  fresh=\$(mktemp -d /tmp/b2g-n-new.XXXXXX) && cp -R "\$here/node/builtins/." "\$fresh/" &&
    chmod 755 "\$fresh" && { mv -T "\$fresh" "\$builtins" 2>/dev/null || rm -rf "\$fresh"; }
fi
LD_LIBRARY_PATH="\$here/node/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
  exec "\$here/node/bin/node" "\$here/node_modules/azurite/dist/src/blob/main.js" "\$@"
SH
chmod +x "$work/bundle/azurite-blob"
env -i "$work/bundle/azurite-blob" --version >/dev/null 2>&1 || true  # makes the builtins' copy
echo "node $(env -i LD_LIBRARY_PATH="$node_dir/lib" "$node_dir/bin/node" --version) runs in a clean environment"

echo "== which of Azurite's files it loads (the Blob tests, on this node, a hook in every process)"
cat > "$work/hook.js" <<'JS'
// Writes the files this node process has loaded (its module cache), twice a second and at exit.
const fs = require("fs");
const out = `${process.env.AZURITE_TRACE_DIR}/${process.pid}.txt`;
const dump = () => { try { fs.writeFileSync(out, Object.keys(require.cache).join("\n")); } catch (e) {} };
setInterval(dump, 500).unref();
process.on("exit", dump);
JS
mkdir "$work/trace"
cat > "$work/trace-azurite" <<SH
#!/bin/sh
LD_LIBRARY_PATH="$node_dir/lib" exec "$node_dir/bin/node" "$modules/azurite/dist/src/blob/main.js" "\$@"
SH
chmod +x "$work/trace-azurite"
AZURITE_BLOB="$work/trace-azurite" NODE_OPTIONS="--require $work/hook.js" \
  AZURITE_TRACE_DIR="$work/trace" "$PY" -m pytest -q -p no:cacheprovider -x \
  tests/integration/test_blob_source.py tests/integration/test_blob_https.py \
  tests/integration/test_blob_faults.py tests/integration/test_blob_proxy.py | tail -1

"$PY" - "$work/trace" "$modules" "$work/bundle/node_modules" <<'PYTHON'
import shutil, sys
from pathlib import Path

trace, root, dest = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), Path(sys.argv[3])
loaded = {Path(line) for t in trace.glob("*.txt") for line in t.read_text().split("\n") if line}
loaded = {p for p in loaded if p.is_relative_to(root) and p.is_file()}
if not any(p.name == "main.js" and "blob" in p.parts for p in loaded):
    sys.exit("the trace shows no Azurite blob service: did the tests start it on this node?")
# Node reads each package.json between a loaded file and the root (main, exports, type).
manifests = {d / "package.json" for p in loaded for d in p.parents if d.is_relative_to(root)}
for f in loaded | {m for m in manifests if m.is_file()}:
    target = dest / f.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(f, target)
print(f"{len(loaded)} files of Azurite loaded, {sum(f.stat().st_size for f in loaded) / 1e6:.1f} MB")
PYTHON

echo "== packing, checking the launcher in a clean environment"
env -i "$work/bundle/azurite-blob" --version
tar -C "$work/bundle" -cf - . | xz -T0 -6 >"$DEST/azurite-node.tar.xz"
du -sh "$DEST"/*
