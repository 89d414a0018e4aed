#!/usr/bin/env bash
# Run the Tessera demos in .venv, from any directory:
# 1. refimpl/examples/train_gpt.py: a small GPT trains with tessera.Checkpointer, each run its
#    own process; runs SIGKILLed after a checkpoint and during a save, and one preempted by
#    SIGTERM, resume bit-exactly; then finetune, a refused config, inspect, verify, and
#    zarr-python and tensorstore reading a weight (extra arguments go to it, e.g. --out DIR;
#    default ./demo-run);
# 2. refimpl/examples/train_sharded.py: four FSDP2 ranks train, save together and are
#    SIGKILLed; the run resumes at two ranks, and again after a kill, bit-exactly
#    (./demo-run-sharded).
# Exit status: 0 if both PASS, 1 otherwise.

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

"$PY" refimpl/examples/train_gpt.py "$@"
echo
exec "$PY" refimpl/examples/train_sharded.py
