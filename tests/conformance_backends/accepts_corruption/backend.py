"""Broken on purpose: a reader that never checks a checksum: a chunk's CRC-32C, the chunk list
(spec R6.6, R3.19), or the manifest digest (R3.21).

Its reads go through tessera with the checksum comparisons replaced by nothing, so a chunk with a
flipped bit, a chunk in another's place or an edited manifest is read as if it were sound. The
suite must fail it on every read case that expects ``checksum_mismatch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar
from unittest import mock

import tessera.engine.read_strategies
import tessera.format.chunk_codec
import tessera.format.root

from conformance.backends.reference.backend import Answer, ReferenceBackend, Request, serve


class AcceptsCorruption(ReferenceBackend):
    folder: ClassVar[Path] = Path(__file__).resolve().parent

    def read(self, request: Request) -> Answer:
        with (
            mock.patch.object(tessera.format.chunk_codec, "check_crc", _unchecked),
            mock.patch.object(tessera.engine.read_strategies, "check_crc", _unchecked),
            mock.patch.object(tessera.format.root, "check_manifest_digest", _unchecked_digest),
        ):
            return super().read(request)


def _unchecked(checksum: int, stored: bytes, where: str, listed: int | None = None) -> None:
    """Whatever the chunk holds, its checksum "matches"."""


def _unchecked_digest(data: bytes, manifest: object, where: str) -> None:
    """Whatever the root holds, its digest "matches"."""


if __name__ == "__main__":
    serve(AcceptsCorruption())
