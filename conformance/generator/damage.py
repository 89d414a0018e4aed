"""Tools to damage a good checkpoint in exactly one place.

Every broken vector starts as a checkpoint the reference writer saved and
then has one fault put in: an edited document, a flipped byte, a chunk
rewritten with a correct CRC around wrong content, a hand-made zstd frame.
Keeping the CRC right where the fault is elsewhere makes the expected error
unambiguous (R13.2).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
from tessera.format.strict_json import dumps

__all__ = [
    "chunk_body",
    "edit_json",
    "edit_manifest",
    "flip_byte",
    "replace_bytes",
    "write_chunk",
    "zstd_frame",
]

_ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Let ``change`` mutate the document at ``path`` in place; write it back as the writer would."""
    doc = json.loads(path.read_bytes())
    change(doc)
    path.write_bytes(dumps(doc))


def edit_manifest(checkpoint: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Mutate the manifest (``attributes.tessera`` of the root ``zarr.json``) in place."""
    edit_json(checkpoint / "zarr.json", lambda doc: change(doc["attributes"]["tessera"]))


def replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    """Replace the one occurrence of ``old``: for faults JSON cannot express (``NaN``, duplicates)."""
    data = path.read_bytes()
    if data.count(old) != 1:
        raise ValueError(f"{path}: {old!r} occurs {data.count(old)} times, not once")
    path.write_bytes(data.replace(old, new))


def flip_byte(path: Path, offset: int) -> None:
    """Flip the lowest bit of one byte (negative offsets count from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def chunk_body(path: Path) -> bytes:
    """A chunk file without its 4 CRC bytes (R6.5)."""
    return path.read_bytes()[:-4]


def write_chunk(path: Path, body: bytes) -> None:
    """Write ``body`` followed by its correct CRC-32C (R6.4), so only the body is at fault."""
    path.write_bytes(body + struct.pack("<I", crc32c.crc32c(body)))


def zstd_frame(payload: bytes, declared: int | None, *, block_type: int = 0) -> bytes:
    """One zstd frame of one last block holding ``payload`` (RFC 8878 §3.1.1), built by hand.

    ``declared`` is the content size the header states (``None``: none, which
    needs a window descriptor instead). ``block_type`` 0 is a raw block, whose
    content is ``payload`` itself; 2 claims a compressed block, so arbitrary
    ``payload`` bytes make it undecodable. Built by hand so that the bytes do
    not depend on a zstd library's version.
    """
    # Frame header descriptor 0x00: no content size, so a window descriptor (0x00: 1 KiB) follows;
    # 0xA0: a single segment with a 4-byte content size.
    header = bytes([0x00, 0x00]) if declared is None else bytes([0xA0]) + struct.pack("<I", declared)
    block = ((len(payload) << 3) | (block_type << 1) | 1).to_bytes(3, "little")
    return _ZSTD_MAGIC + header + block + payload
