# Sourced by demo.sh and test.sh: cd to the repository root and make .venv ready.
#
# Steps, each skipped when already done:
#   1. create .venv at the repository root (python3 -m venv);
#   2. install torch FIRST, and only if the venv cannot import it: `pip install torch`
#      with no pin would pull the multi-GB CUDA build, while torch==2.13.0 resolves
#      to the local CPU wheel on these machines;
#   3. pip install -e '.[test]' (the package, zarr, tensorstore, pytest...), redone
#      only when pyproject.toml changes (its hash is kept in .venv).
# pip runs quietly (-q); any failure stops the script with a message.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

fail() {
    echo "error: $*" >&2
    exit 1
}

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; install Python 3.11 or newer"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || fail "$("$PYTHON" --version 2>&1) is too old; Tessera needs Python 3.11 or newer"
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV" || fail "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "installing torch 2.13.0 (CPU) into .venv" >&2
    "$PY" -m pip install -q torch==2.13.0 || fail "pip install torch==2.13.0 failed"
fi

STAMP="$VENV/.tessera-install"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$PY" -c 'import tessera, zarr, pytest' 2>/dev/null; then
    echo "installing tessera (editable) with its test dependencies into .venv" >&2
    "$PY" -m pip install -q -e '.[test]' || fail "pip install -e '.[test]' failed"
    echo "$WANT" > "$STAMP"
fi
