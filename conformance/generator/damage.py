"""Tools to damage a good checkpoint in exactly one place.

Every broken vector starts as a checkpoint the reference writer saved and
then has one fault put in: an edited document, a flipped byte, a chunk
rewritten with a correct CRC around wrong content, a hand-made zstd frame.
Keeping the CRC right where the fault is elsewhere makes the expected error
unambiguous (R13.2). For the same reason an edited root document is sealed
again (its ``manifest_digest`` recomputed, R3.20) and a rewritten chunk's CRC
is listed in its array's chunk list (R3.19), unless the vector is about those.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
from tessera.format import CRC_HEX_DIGITS, dumps, reseal_root

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


def edit_json(path: Path, change: Callable[[Any], Any], *, seal: bool = True) -> None:
    """Let ``change`` mutate the document at ``path`` in place; write it back as the writer would
    (a root document sealed again unless ``seal`` is false)."""
    doc = json.loads(path.read_bytes())
    change(doc)
    data = dumps(doc)
    path.write_bytes(reseal_root(data) if seal else data)


def edit_manifest(checkpoint: Path, change: Callable[[dict[str, Any]], Any], *, seal: bool = True) -> None:
    """Mutate the manifest (``attributes.tessera`` of the root ``zarr.json``) in place."""
    edit_json(checkpoint / "zarr.json", lambda doc: change(doc["attributes"]["tessera"]), seal=seal)


def replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    """Replace the one occurrence of ``old``: for faults JSON cannot express (``NaN``, duplicates)."""
    data = path.read_bytes()
    if data.count(old) != 1:
        raise ValueError(f"{path}: {old!r} occurs {data.count(old)} times, not once")
    path.write_bytes(reseal_root(data.replace(old, new)))


def flip_byte(path: Path, offset: int) -> None:
    """Flip the lowest bit of one byte (negative offsets count from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def chunk_body(path: Path) -> bytes:
    """A chunk file without its 4 CRC bytes (R6.5)."""
    return path.read_bytes()[:-4]


def write_chunk(path: Path, body: bytes) -> None:
    """Write ``body`` followed by its correct CRC-32C (R6.4), listed for the chunk in the chunk
    list of a 1.1 manifest (R3.19), so only the body is at fault.

    ``path`` is a chunk file of a committed checkpoint: ``<root>/<array path>/c/<i>/<j>...``.
    """
    checksum = crc32c.crc32c(body)
    path.write_bytes(body + struct.pack("<I", checksum))
    root = next(p for p in path.parents if _is_root(p))
    parts = path.relative_to(root).parts
    at = len(parts) - 1 - parts[::-1].index("c")
    array, index = "/".join(parts[:at]), [int(i) for i in parts[at + 1 :]]

    def relist(manifest: dict[str, Any]) -> None:
        entry = next(e for e in manifest["entries"] if e["path"] == array)
        if "chunk_crc32c" not in entry:
            return
        flat = 0
        for i, size, chunk in zip(index, entry["shape"], entry["chunk_shape"], strict=True):
            flat = flat * -(-size // chunk) + i
        start = CRC_HEX_DIGITS * flat
        listed = entry["chunk_crc32c"]
        entry["chunk_crc32c"] = listed[:start] + format(checksum, "08x") + listed[start + CRC_HEX_DIGITS :]

    edit_manifest(root, relist)


def _is_root(folder: Path) -> bool:
    """Whether ``folder`` holds a root ``zarr.json`` (a group document with a manifest)."""
    document = folder / "zarr.json"
    return document.is_file() and b'"tessera"' in document.read_bytes()


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
