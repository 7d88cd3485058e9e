#!/usr/bin/env bash
# The checks CI runs besides the tests: ruff (lint and format), mypy on the package, clang-format
# on every C++ file. The tools are pinned, so a new release never fails a build by itself.
# Usage: scripts/lint.sh [--fix]   (--fix rewrites what ruff and clang-format can fix)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "ruff==0.17.6" "mypy==2.4.1" "clang-format==23.1.5"
# The pinned clang-format, not whichever one PATH finds first.
clang_format="$("$PY" -c 'import clang_format, os; print(os.path.join(os.path.dirname(clang_format.__file__), "data", "bin", "clang-format"))')"
cxx=$(git ls-files 'csrc/*.cpp' 'csrc/*.hpp' 'csrc/*.h' 'tests/fake_cuda/*.cpp' 'tests/gpu/*.cpp' 'fuzz/*.cpp')
if [ "${1:-}" = "--fix" ]; then
  "$PY" -m ruff check --fix python tests bench scripts
  "$PY" -m ruff format python tests bench scripts
  "$clang_format" -i $cxx
fi
echo "== ruff"
"$PY" -m ruff check python tests bench scripts
"$PY" -m ruff format --check python tests bench scripts
echo "== mypy"
"$PY" -m mypy
echo "== clang-format"
"$clang_format" --dry-run --Werror $cxx
