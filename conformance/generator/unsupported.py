"""Checkpoints of versions or features a 1.0 reader does not implement: ``unsupported_version``.

The version is checked before the schema (R12.4), so a newer MAJOR that also
breaks the 1.0 schema is still unsupported, never a schema violation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bases import save_base
from .damage import edit_manifest
from .vector import VectorWriter

__all__ = ["build"]


def _newer_major_and_broken(manifest: dict[str, Any]) -> None:
    manifest.update(format_version="2.0", entries=5, save_id=None, created=7)
    del manifest["writer"]


def _minor_with_feature(manifest: dict[str, Any]) -> None:
    manifest.update(format_version="1.7", must_understand=["x"], x={"changes": "how bytes are read"})


_VECTORS: tuple[tuple[str, str, tuple[str, ...], Callable[[dict[str, Any]], Any]], ...] = (
    ("major-2", 'format_version "2.0"', ("R12.2",), lambda m: m.update(format_version="2.0")),
    ("major-0", 'format_version "0.9"', ("R12.2",), lambda m: m.update(format_version="0.9")),
    ("major-10", 'format_version "10.0" (MAJOR compared as a number)', ("R12.2", "R12.1"),
     lambda m: m.update(format_version="10.0")),
    ("major-2-schema-violation", 'format_version "2.0" in a manifest that also breaks the 1.0 schema',
     ("R12.4", "R13.2", "R12.2"), _newer_major_and_broken),
    ("must-understand", 'format 1.0 with must_understand ["something"]', ("R12.3",),
     lambda m: m.update(must_understand=["something"])),
    ("minor-must-understand", 'format 1.7 that lists its new member x in must_understand',
     ("R12.3", "R12.6"), _minor_with_feature),
)  # fmt: skip


def build(out: Path) -> None:
    """Write every vector of this module under ``out/unsupported``."""
    for name, title, rules, change in _VECTORS:
        v = VectorWriter(out, "unsupported", name)
        save_base(v)
        edit_manifest(v.checkpoint, change)
        v.finish(title, rules, [v.read(error="unsupported_version"), v.verify("unsupported_version")])
