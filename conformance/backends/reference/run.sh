#!/bin/sh
# Start the backend with the harness's own interpreter (PROTOCOL.md P2), or python3 outside it.
exec "${TESSERA_CONFORMANCE_PYTHON:-python3}" "$(dirname "$0")/backend.py"
