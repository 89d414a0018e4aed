#!/usr/bin/env bash
# Lint (ruff), type-check (mypy), then run the test suite (python -m pytest -q,
# extra arguments passed through) in .venv, from any directory.
# Exit status: the first failing check's, else pytest's, except that "no tests collected" (pytest's 5) prints
# NO TESTS RAN and exits 5, so it is never taken for a pass or an ordinary failure.

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

"$PY" -m ruff check refimpl conformance tests bench fuzz
"$PY" -m mypy

status=0
"$PY" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "NO TESTS RAN (pytest exit 5)"
    exit 5
fi
exit "$status"
