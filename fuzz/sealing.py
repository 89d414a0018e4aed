"""Format 1.1's bindings, recomputed after a deliberate edit (spec §3, §6: chunk CRCs, manifest digest).

A hostile manifest in the corpus must reach the check it targets (a limit, a type), not be
stopped earlier by the manifest digest; and "recomputing tampering" in the campaign must
rewrite every checksum. Both need the two bindings format 1.1 adds:

- every tensor/object entry's ``chunk_crc32c`` (R3.19): one string, for each chunk in row-major
  order the CRC32C stored in its last 4 bytes as 8 lower-case hex digits;
- the manifest's ``manifest_digest`` (R3.20): ``"sha256:"`` + the hex SHA-256 of the root
  ``zarr.json``'s exact bytes with those 64 hex digits replaced by 64 ``0`` characters, placed
  right after ``must_understand`` as the reference writer places it.

A checkpoint a 1.0 writer saved is upgraded here (``upgrade``), so that the corpus can be made
before and after the writer itself writes 1.1; ``downgrade`` makes a 1.0 manifest, which a reader
still reads without either binding (R3.21): the form a hostile manifest takes to reach the limits.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

__all__ = [
    "chunk_crc_hex",
    "seal",
    "upgrade",
    "downgrade",
    "write_root",
    "read_root",
    "DIGEST_FIELD",
    "CRC_FIELD",
]

DIGEST_FIELD = "manifest_digest"
CRC_FIELD = "chunk_crc32c"
FORMAT_VERSION = "1.1"
_DIGEST = re.compile(rb'("manifest_digest"\s*:\s*"sha256:)([0-9a-f]{64})(")')
_ZERO_DIGEST = "sha256:" + "0" * 64


def seal(data: bytes) -> bytes:
    """The root document ``data`` with its ``manifest_digest`` recomputed over its own bytes."""
    match = _DIGEST.search(data)
    if match is None:
        return data
    zeroed = data[: match.start(2)] + b"0" * 64 + data[match.end(2) :]
    digest = hashlib.sha256(zeroed).hexdigest().encode("ascii")
    return data[: match.start(2)] + digest + data[match.end(2) :]


def read_root(checkpoint: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((checkpoint / "zarr.json").read_bytes())
    return doc


def write_root(checkpoint: Path, doc: dict[str, Any] | bytes) -> None:
    """Write the root document (JSON text or an object), sealed with a valid digest."""
    data = doc if isinstance(doc, bytes) else json.dumps(doc, indent=2).encode("utf-8")
    (checkpoint / "zarr.json").write_bytes(seal(data))


def chunk_crc_hex(chunk: bytes) -> str:
    """The CRC a chunk file stores in its last 4 bytes, as the manifest spells it."""
    return format(struct.unpack("<I", chunk[-4:])[0], "08x")


def _chunk_names(shape: list[int], chunk_shape: list[int]) -> list[str]:
    grid = [-(-s // c) for s, c in zip(shape, chunk_shape, strict=True)]
    names = ["c"]
    for n in grid:
        names = [f"{name}/{i}" for name in names for i in range(n)]
    return names


def entry_crcs(checkpoint: Path, entry: dict[str, Any]) -> str:
    """The ``chunk_crc32c`` an array entry should carry, from its chunk files as they are now."""
    crcs = []
    for name in _chunk_names(entry["shape"], entry["chunk_shape"]):
        path = checkpoint / entry["path"] / name
        crcs.append(chunk_crc_hex(path.read_bytes()) if path.is_file() else "00000000")
    return "".join(crcs)


def upgrade(checkpoint: Path, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """The root document of ``checkpoint`` as format 1.1: chunk CRCs from the files, a digest field.

    Idempotent: a 1.1 root is returned with its CRCs recomputed from the chunk files (so a caller
    that swapped or rewrote chunks gets every binding right), ready for :func:`write_root`.
    """
    doc = read_root(checkpoint) if doc is None else doc
    manifest = doc["attributes"]["tessera"]
    manifest["format_version"] = FORMAT_VERSION
    for entry in manifest["entries"]:
        if entry["kind"] in ("tensor", "object"):
            entry[CRC_FIELD] = entry_crcs(checkpoint, entry)
    manifest.pop(DIGEST_FIELD, None)
    ordered: dict[str, Any] = {}
    for name, value in manifest.items():
        ordered[name] = value
        if name == "must_understand":
            ordered[DIGEST_FIELD] = _ZERO_DIGEST
    doc["attributes"]["tessera"] = ordered
    return doc


def downgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (a root document) as format 1.0: no chunk lists, no digest."""
    manifest = doc["attributes"]["tessera"]
    manifest["format_version"] = "1.0"
    manifest.pop(DIGEST_FIELD, None)
    for entry in manifest["entries"] if isinstance(manifest.get("entries"), list) else []:
        if isinstance(entry, dict):
            entry.pop(CRC_FIELD, None)
    return doc
