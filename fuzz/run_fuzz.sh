#!/usr/bin/env bash
# Builds the fuzz targets (libFuzzer + ASan + UBSan) and runs each for a fixed number of inputs on
# a copy of its seed corpus: header_fuzzer (the safetensors header parser) and http_response_fuzzer
# (the native range reader's response head and chunked body reading). Exit status: 0 no finding;
# 1 a crash (reproducer under fuzz/.build/) or a compile error; 2 no toolchain (clang++ or its
# libFuzzer runtime missing). Prints one summary line per target.
#
#   fuzz/run_fuzz.sh [RUNS] [LIBFUZZER FLAGS...]     RUNS (per target) defaults to 200000
#   CLANGXX=/path/to/clang++ fuzz/run_fuzz.sh          to pick the compiler
#   FUZZ_TARGETS="http_response_fuzzer" fuzz/run_fuzz.sh   to run some of them
set -uo pipefail

RUNS=${1:-200000}
shift $(($# > 0 ? 1 : 0))
FUZZ_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$FUZZ_DIR")
BUILD="$FUZZ_DIR/.build"
TARGETS=${FUZZ_TARGETS:-header_fuzzer http_response_fuzzer}

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

# The core's sources each target links (besides its own .cpp), its corpus and its dictionary.
sources_of() {
  case "$1" in
    header_fuzzer)
      echo "$ROOT/csrc/safetensors_header.cpp $ROOT/csrc/dtype.cpp $ROOT/csrc/errors.cpp" \
        "$ROOT/csrc/detail/json_reader.cpp" ;;
    http_response_fuzzer)
      echo "$ROOT/csrc/http/response_head.cpp $ROOT/csrc/http/chunked_body.cpp" \
        "$ROOT/csrc/http/fetch_result.cpp" ;;
  esac
}
corpus_of() { [ "$1" = header_fuzzer ] && echo "$FUZZ_DIR/corpus" || echo "$FUZZ_DIR/http_corpus"; }
dict_of() { [ "$1" = header_fuzzer ] && echo "$FUZZ_DIR/header.dict" || echo "$FUZZ_DIR/http.dict"; }

# Builds and runs one target; returns 0, 1 (a crash or a compile error) or 2 (no libFuzzer).
fuzz_one() {
  local target=$1 binary="$BUILD/$1" work="$BUILD/$1.work"
  shift
  # shellcheck disable=SC2046  # the source list is word-split on purpose (no spaces in paths)
  if ! "$CXX" -std=c++17 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$ROOT/csrc" "$FUZZ_DIR/$target.cpp" $(sources_of "$target") -o "$binary" \
    2>"$BUILD/$target.build.log"; then
    cat "$BUILD/$target.build.log" >&2
    if grep -q "clang_rt.fuzzer" "$BUILD/$target.build.log"; then
      echo "run_fuzz.sh: $CXX could not link libFuzzer; install its runtime" \
        "(Debian/Ubuntu: libclang-rt-NN-dev for clang NN)" >&2
      return 2
    fi
    echo "run_fuzz.sh: building $target with $CXX failed (see above)" >&2
    return 1
  fi

  # libFuzzer adds what it finds to the corpus directory: fuzz a copy, keep the seeds as committed.
  rm -rf "$work" && mkdir -p "$work/artifacts"
  cp -r "$(corpus_of "$target")" "$work/corpus"
  local log="$work/fuzz.log" status elapsed
  SECONDS=0
  "$binary" -runs="$RUNS" -max_len=4096 -dict="$(dict_of "$target")" -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/" "$@" "$work/corpus" >"$log" 2>&1
  status=$?
  elapsed=$SECONDS

  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  local seed coverage files artifact
  seed=$(sed -n 's/.*Seed: \([0-9]*\).*/\1/p' "$log" | head -1)
  coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  files=$(find "$work/corpus" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    artifact=$(find "$work/artifacts" -type f | head -1)
    echo "$target: CRASH after $(stat number_of_executed_units) runs (seed $seed);" \
      "reproducer: ${artifact:-none} (rerun: $binary ${artifact:-ARTIFACT}); log: $log"
    return 1
  fi
  echo "$target: OK, $(stat number_of_executed_units) runs in ${elapsed} s" \
    "($(stat average_exec_per_sec) exec/s), coverage ${coverage:-?} edges," \
    "corpus $files files, seed $seed"
}

worst=0
for target in $TARGETS; do
  fuzz_one "$target" "$@"
  status=$?
  [ "$status" -eq 2 ] && exit 2
  [ "$status" -gt "$worst" ] && worst=$status
done
exit "$worst"
