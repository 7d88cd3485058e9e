#!/usr/bin/env bash
# Builds the header fuzzer (libFuzzer + ASan + UBSan) and runs it for a fixed number of inputs on a
# copy of the seed corpus. Exit status: 0 no finding; 1 a crash (reproducer under fuzz/.build/) or
# a compile error; 2 no toolchain (clang++ or its libFuzzer runtime missing). Prints one summary line.
#
#   fuzz/run_fuzz.sh [RUNS] [LIBFUZZER FLAGS...]     RUNS defaults to 200000
#   CLANGXX=/path/to/clang++ fuzz/run_fuzz.sh          to pick the compiler
set -uo pipefail

RUNS=${1:-200000}
shift $(($# > 0 ? 1 : 0))
FUZZ_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$FUZZ_DIR")
BUILD="$FUZZ_DIR/.build"
BINARY="$BUILD/header_fuzzer"

find_clang() {
  if [ -n "${CLANGXX:-}" ]; then
    command -v "$CLANGXX" && return
  fi
  command -v clang++ && return
  local v
  for v in $(seq 30 -1 11); do
    command -v "clang++-$v" && return
  done
  return 1
}

if ! CXX=$(find_clang); then
  printf '%s\n' >&2 \
    "run_fuzz.sh: clang++ not found. libFuzzer ships with clang; install it, e.g." \
    "  Debian/Ubuntu:  apt-get install clang libclang-rt-dev   (or clang-NN libclang-rt-NN-dev)" \
    "  macOS:          brew install llvm   (Apple's clang has no libFuzzer)" \
    "then rerun, or point CLANGXX at a clang++."
  exit 2
fi

mkdir -p "$BUILD"
SOURCES=(
  "$FUZZ_DIR/header_fuzzer.cpp"
  "$ROOT/csrc/safetensors_header.cpp"
  "$ROOT/csrc/dtype.cpp"
  "$ROOT/csrc/errors.cpp"
  "$ROOT/csrc/detail/json_reader.cpp"
)
if ! "$CXX" -std=c++17 -g -O1 -fno-omit-frame-pointer \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$ROOT/csrc" "${SOURCES[@]}" -o "$BINARY" 2>"$BUILD/build.log"; then
  cat "$BUILD/build.log" >&2
  if grep -q "clang_rt.fuzzer" "$BUILD/build.log"; then
    echo "run_fuzz.sh: $CXX could not link libFuzzer; install its runtime" \
      "(Debian/Ubuntu: libclang-rt-NN-dev for clang NN)" >&2
    exit 2
  fi
  echo "run_fuzz.sh: building the fuzzer with $CXX failed (see above)" >&2
  exit 1
fi

# libFuzzer adds what it finds to the corpus directory: fuzz a copy, keep the seeds as committed.
rm -rf "$BUILD/corpus" "$BUILD/artifacts"
mkdir -p "$BUILD/artifacts"
cp -r "$FUZZ_DIR/corpus" "$BUILD/corpus"

LOG="$BUILD/fuzz.log"
SECONDS=0
"$BINARY" -runs="$RUNS" -max_len=4096 -dict="$FUZZ_DIR/header.dict" -print_final_stats=1 \
  -artifact_prefix="$BUILD/artifacts/" "$@" "$BUILD/corpus" >"$LOG" 2>&1
STATUS=$?
ELAPSED=$SECONDS

stat() { sed -n "s/^stat::$1: *//p" "$LOG" | tail -1; }
SEED=$(sed -n 's/.*Seed: \([0-9]*\).*/\1/p' "$LOG" | head -1)
COVERAGE=$(grep -o 'cov: [0-9]*' "$LOG" | tail -1 | cut -d' ' -f2)
CORPUS_FILES=$(find "$BUILD/corpus" -type f | wc -l)

if [ "$STATUS" -ne 0 ]; then
  tail -40 "$LOG" >&2
  ARTIFACT=$(find "$BUILD/artifacts" -type f | head -1)
  echo "header_fuzzer: CRASH after $(stat number_of_executed_units) runs (seed $SEED);" \
    "reproducer: ${ARTIFACT:-none} (rerun: $BINARY ${ARTIFACT:-ARTIFACT}); log: $LOG"
  exit 1
fi
echo "header_fuzzer: OK, $(stat number_of_executed_units) runs in ${ELAPSED} s" \
  "($(stat average_exec_per_sec) exec/s), coverage ${COVERAGE:-?} edges," \
  "corpus $CORPUS_FILES files, seed $SEED"
