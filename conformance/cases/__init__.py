"""The cases: what the harness asks a backend, and what counts as a pass."""
