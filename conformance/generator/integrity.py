"""Chunks bound to their place and a checked manifest (format 1.1, spec R3.19-R3.21, R6.6).

Broken vectors: two valid chunks swapped, a byte of a JSON value changed in the
root without its digest recomputed, a chunk list of the wrong length, a 1.1
manifest without its digest, a chunk list holding a non-hex digit. Valid ones:
the same base written as format 1.0 (no digest, no chunk lists), which a 1.1
reader must still read, and a 1.0 checkpoint whose chunks were later swapped,
which a reader cannot tell from a good one (the reason 1.1 lists the CRCs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bases import GOOD_KEYS, save_base
from .damage import edit_manifest
from .vector import VectorWriter

__all__ = ["build"]


def build(out: Path) -> None:
    """Write every vector of this module under ``out/invalid``, ``out/malformed`` and ``out/valid``."""
    _swapped(out)
    _root_value_changed(out)
    _chunk_list_length(out)
    _digest_missing(out)
    _chunk_list_not_hex(out)
    _format_1_0(out)


def _swap(checkpoint: Path, a: str, b: str) -> None:
    """Exchange two chunk files of ``w`` (each stays intact: its CRC matches its bytes)."""
    first, second = checkpoint / "w" / "c" / a, checkpoint / "w" / "c" / b
    data_a, data_b = first.read_bytes(), second.read_bytes()
    first.write_bytes(data_b)
    second.write_bytes(data_a)


def _swapped(out: Path) -> None:
    v = VectorWriter(out, "invalid", "chunks-swapped")
    save_base(v)
    _swap(v.checkpoint, "0/0", "0/1")
    v.finish(
        "two valid chunks of one array swapped (w/c/0/0 and w/c/0/1): each is intact, "
        "but its CRC is not the one the chunk list gives its index",
        ["R3.19", "R6.6"],
        [
            v.read(error="checksum_mismatch"),
            v.read("subset", GOOD_KEYS, rules=["R14.1"]),
            v.read(
                "region-avoiding-fault", [(("w",), [(2, 4), (0, 6)])], rules=["R14.2"], features=["regions"]
            ),
            v.verify("checksum_mismatch"),
        ],
    )


def _root_value_changed(out: Path) -> None:
    v = VectorWriter(out, "invalid", "manifest-digest-mismatch")
    save_base(v)
    # grp/n is the JSON value 3; 7 is one byte and still strict JSON, schema-valid and consistent.
    root = v.checkpoint / "zarr.json"
    old, new = b'"encoding":"json","value":3}', b'"encoding":"json","value":7}'
    assert root.read_bytes().count(old) == 1
    root.write_bytes(root.read_bytes().replace(old, new))
    v.finish(
        "one byte of a JSON value in the root zarr.json changed (grp/n 3 -> 7), the digest not "
        "recomputed",
        ["R3.20", "R3.21", "R11.1"],
        [v.read(error="checksum_mismatch"), v.verify("checksum_mismatch")],
    )


def _chunk_list_length(out: Path) -> None:
    v = VectorWriter(out, "invalid", "chunk-list-length")
    save_base(v)

    def shorten(manifest: dict[str, Any]) -> None:
        entry = next(e for e in manifest["entries"] if e["path"] == "w")
        entry["chunk_crc32c"] = entry["chunk_crc32c"][:-8]

    edit_manifest(v.checkpoint, shorten)
    v.finish(
        "the chunk list of w lists 3 CRCs for its 4 chunks",
        ["R3.19"],
        [v.read(error="inconsistent"), v.verify("inconsistent")],
    )


def _digest_missing(out: Path) -> None:
    v = VectorWriter(out, "malformed", "manifest-digest-missing")
    save_base(v)
    edit_manifest(v.checkpoint, lambda m: m.pop("manifest_digest"))
    v.finish(
        "a manifest of format 1.1 without manifest_digest",
        ["R3.20", "R12.5"],
        [v.read(error="schema_violation"), v.verify("schema_violation")],
    )


def _chunk_list_not_hex(out: Path) -> None:
    v = VectorWriter(out, "malformed", "chunk-list-uppercase")
    save_base(v)

    def upper(manifest: dict[str, Any]) -> None:
        entry = next(e for e in manifest["entries"] if e["path"] == "w")
        entry["chunk_crc32c"] = entry["chunk_crc32c"].upper()

    edit_manifest(v.checkpoint, upper)
    v.finish(
        "the chunk list of w in uppercase hex digits (lowercase only)",
        ["R3.19"],
        [v.read(error="schema_violation"), v.verify("schema_violation")],
    )


def _as_1_0(manifest: dict[str, Any]) -> None:
    manifest["format_version"] = "1.0"
    manifest.pop("manifest_digest")
    for entry in manifest["entries"]:
        entry.pop("chunk_crc32c", None)


def _format_1_0(out: Path) -> None:
    v = VectorWriter(out, "valid", "format-1.0")
    save_base(v, blob=True, zstd=True)
    edit_manifest(v.checkpoint, _as_1_0)
    v.finish(
        "a checkpoint of format 1.0 (no manifest_digest, no chunk lists): a 1.1 reader reads it",
        ["R12.3", "R12.5", "R3.19", "R3.21"],
        [v.read(), v.verify()],
    )
    v = VectorWriter(out, "valid", "format-1.0-chunks-swapped")
    save_base(v)
    edit_manifest(v.checkpoint, _as_1_0)
    _swap(v.checkpoint, "0/0", "0/1")
    v.adopt({("w",): _swapped_w()})
    v.finish(
        "format 1.0, two chunks of w swapped after the save: 1.0 cannot tell (no chunk list), so "
        "the read gives the swapped elements; 1.1 lists every chunk's CRC to catch this",
        ["R3.19", "R6.6", "R12.3"],
        [v.read(), v.verify()],
    )


def _swapped_w() -> Any:
    """``w`` of the base state with its chunks 0/0 and 0/1 (rows 0-1, columns 0-2 and 3-5) swapped."""
    from .bases import base_state

    w = base_state()["w"].clone()
    w[0:2, 0:3], w[0:2, 3:6] = base_state()["w"][0:2, 3:6], base_state()["w"][0:2, 0:3]
    return w


