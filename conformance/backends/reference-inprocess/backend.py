"""The reference backend in the harness's process (PROTOCOL.md P20): the same class, its own claims."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from conformance.backends.reference.backend import ReferenceBackend

__all__ = ["InProcessReference"]


class InProcessReference(ReferenceBackend):
    folder: ClassVar[Path] = Path(__file__).resolve().parent
