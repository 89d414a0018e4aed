"""Broken on purpose: a reader that never checks a chunk's CRC-32C (spec R6.6).

Its reads go through tessera with the checksum comparison replaced by nothing, so a chunk with a
flipped bit is read as if it were sound. The suite must fail it on every read case that expects
``checksum_mismatch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar
from unittest import mock

import tessera.chunk_codec
import tessera.reader

from conformance.backends.reference.backend import Answer, ReferenceBackend, Request, serve


class AcceptsCorruption(ReferenceBackend):
    folder: ClassVar[Path] = Path(__file__).resolve().parent

    def read(self, request: Request) -> Answer:
        with (
            mock.patch.object(tessera.chunk_codec, "check_crc", _unchecked),
            mock.patch.object(tessera.reader, "check_crc", _unchecked),
        ):
            return super().read(request)


def _unchecked(checksum: int, stored: bytes, where: str, listed: int | None = None) -> None:
    """Whatever the chunk holds, its checksum "matches"."""


if __name__ == "__main__":
    serve(AcceptsCorruption())
