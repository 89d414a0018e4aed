"""Write every vector into a folder, replacing what was there (a hand-written README.md stays)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import (
    inconsistent,
    integrity,
    invalid,
    malformed,
    multi_writer,
    storage,
    tolerated,
    tuples,
    unsupported,
    valid,
    values,
)

__all__ = ["GROUPS", "VECTORS_DIR", "generate"]

VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"
GROUPS = ("valid", "malformed", "invalid", "unsupported")
"""The vector groups, in the order a report lists them."""

_BUILDERS: tuple[Callable[[Path], None], ...] = (
    valid.build,
    values.build,
    tolerated.build,
    multi_writer.build,
    malformed.build,
    invalid.build,
    inconsistent.build,
    storage.build,
    integrity.build,
    tuples.build,
    unsupported.build,
)
_KEPT = frozenset({"README.md"})


def generate(out: Path = VECTORS_DIR) -> int:
    """Write every vector under ``out``; returns how many. ``out`` is replaced only once all are built."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vectors-", dir=out.parent) as scratch:
        built = Path(scratch)
        for builder in _BUILDERS:
            builder(built)
        for old in out.iterdir():
            if old.name not in _KEPT:
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        for group in built.iterdir():
            group.rename(out / group.name)
    return sum(1 for _ in out.glob("*/*/vector.json"))
