#!/usr/bin/env bash
# Run the Tessera demo (refimpl/examples/train_gpt.py) in .venv, from any directory:
# train a small GPT, checkpoint it, crash, resume bit-exactly, inspect, verify,
# read it back with zarr-python and tensorstore. Extra arguments go to the demo
# (e.g. --out DIR; the default is ./demo-run at the repository root).
# Exit status: the demo's (0 PASS, 1 FAIL).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

exec "$PY" refimpl/examples/train_gpt.py "$@"
