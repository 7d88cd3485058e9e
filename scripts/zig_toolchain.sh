#!/usr/bin/env bash
# Writes a C/C++ toolchain that targets glibc 2.28 (manylinux_2_28) whatever the host's glibc:
# zig's clang (the `ziglang` wheel, pinned) with its own glibc 2.28 stubs, and libc++ / libc++abi /
# libunwind linked statically, so the extension needs nothing from the host but glibc <= 2.28.
# Usage: scripts/zig_toolchain.sh DIR   ->  DIR/cc, DIR/c++, DIR/ar, DIR/ranlib and DIR/env, which
# exports CC, CXX and the CMAKE_ARGS that name them (scripts/build_wheel.sh and cibuildwheel use it).
set -euo pipefail
out=${1:?usage: scripts/zig_toolchain.sh DIR}
PY=${PYTHON:-python3}
ZIG_VERSION=0.17.1
mkdir -p "$out"
out=$(cd "$out" && pwd)
# A private copy, so no venv or system Python is written to.
if [ ! -x "$out/ziglang/zig" ] || [ "$("$out/ziglang/zig" version)" != "$ZIG_VERSION" ]; then
  "$PY" -m pip install -q --no-deps --upgrade --target "$out" "ziglang==$ZIG_VERSION"
fi
target="$(uname -m)-linux-gnu.2.28"
for tool in cc c++; do
  # -target alone gives the architecture's baseline CPU (never -march=native): the checksum
  # kernels pick SSE4.2 / AVX-512 / ARM CRC at run time.
  printf '#!/bin/sh\nexec "%s" %s -target %s "$@"\n' "$out/ziglang/zig" "$tool" "$target" >"$out/$tool"
done
for tool in ar ranlib; do
  printf '#!/bin/sh\nexec "%s" %s "$@"\n' "$out/ziglang/zig" "$tool" >"$out/$tool"
done
chmod +x "$out/cc" "$out/c++" "$out/ar" "$out/ranlib"
cat >"$out/env" <<ENV
export CC="$out/cc" CXX="$out/c++"
export CMAKE_ARGS="-DCMAKE_AR=$out/ar -DCMAKE_RANLIB=$out/ranlib"
ENV
echo "zig $ZIG_VERSION toolchain for $target in $out"
