"""Invalid metadata: documents that are well-formed but disagree, clash or exceed the limits.

An array ``zarr.json`` that differs from its manifest entry fails only that
array (the others still read); a manifest whose entries disagree with their
keys, clash with each other or exceed a limit fails the whole checkpoint,
before any array is touched (R11.1 step 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.format import ArrayLayout, dtype_by_name, dumps

from .bases import GOOD_KEYS, save_base
from .damage import edit_json, edit_manifest, write_chunk
from .vector import VectorWriter

__all__ = ["build"]

Change = Callable[[dict[str, Any]], Any]

_ZSTD_CHAIN = [
    {"name": "bytes", "configuration": {"endian": "little"}},
    {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
    {"name": "crc32c"},
]
_ARRAY_DOCS: tuple[tuple[str, str, Change], ...] = (
    ("array-shape", "shape [4, 7] where the manifest says [4, 6]", lambda d: d.update(shape=[4, 7])),
    ("array-dtype", "data_type int32 where the manifest says float32", lambda d: d.update(data_type="int32")),
    ("array-chunk-shape", "chunk shape [2, 2] where the manifest says [2, 3]",
     lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[2, 2])),
    ("array-codecs", "a zstd codec the manifest does not list", lambda d: d.update(codecs=_ZSTD_CHAIN)),
    ("array-fill-value", "fill_value 0.0 where a float32 array has NaN", lambda d: d.update(fill_value=0.0)),
    ("array-dimension-names", 'dimension_names ["rows", "cols"] (only absent or null is accepted)',
     lambda d: d.update(dimension_names=["rows", "cols"])),
)  # fmt: skip


def build(out: Path) -> None:
    """Write every vector of this module under ``out/invalid``."""
    for name, title, change in _ARRAY_DOCS:
        _array_doc(
            out, name, f"the array zarr.json of w disagrees with the manifest: {title}", _edit_w(change)
        )
    _array_doc(out, "array-missing", "the array zarr.json of w is missing", _remove_w)
    for fault in _MANIFESTS:
        v = VectorWriter(out, "invalid", fault.name)
        save_base(v)
        edit_manifest(v.checkpoint, fault.change)
        if fault.entry is not None:
            fault.entry(v.checkpoint)
        probes = [v.read(error=fault.error), v.verify(fault.error)]
        v.finish(fault.title, fault.rules, probes, dtypes=fault.dtypes)
    _case_collision(out)


@dataclass(frozen=True, slots=True)
class _ManifestFault:
    name: str
    title: str
    rules: tuple[str, ...]
    error: str
    change: Change
    entry: Callable[[Path], None] | None = None
    """Writes the files of an added array entry, consistent with it."""
    dtypes: tuple[str, ...] = ()
    """Data types of added array entries."""


def _case_collision(out: Path) -> None:
    """Keys whose paths differ only in case. Readers MAY refuse them (R4.8); one that reads must read
    them right, and its refusal is a probe of its own."""
    v = VectorWriter(out, "invalid", "case-collision")
    save_base(v)
    edit_manifest(v.checkpoint, _append(_value("Case"), _value("CASE", value=2)))
    v.adopt({("Case",): 1, ("CASE",): 2})
    v.finish(
        "the keys Case and CASE, whose paths differ only in case (values: no files collide)",
        ["R4.8"],
        [
            v.read(or_error="bad_key"),
            v.read("refuse", error="bad_key", level="MAY"),
            v.verify("bad_key", level="MAY"),
        ],
    )


def _array_doc(out: Path, name: str, title: str, damage: Callable[[Path], Any]) -> None:
    v = VectorWriter(out, "invalid", name)
    save_base(v)
    damage(v.checkpoint)
    probes = [
        v.read(error="inconsistent"),
        v.read("subset", GOOD_KEYS, rules=["R14.1", "R11.1"]),
        v.verify("inconsistent"),
    ]
    v.finish(title, ["R5.10"], probes)


def _edit_w(change: Change) -> Callable[[Path], None]:
    return lambda checkpoint: edit_json(checkpoint / "w" / "zarr.json", change)


def _remove_w(checkpoint: Path) -> None:
    (checkpoint / "w" / "zarr.json").unlink()


def _entry(path: str, change: Change) -> Change:
    return lambda m: change(next(e for e in m["entries"] if e["path"] == path))


def _append(*entries: dict[str, Any]) -> Change:
    return lambda m: m["entries"].extend(entries)


def _duplicate(path: str, **changes: Any) -> Change:
    """Append a second entry for the key at ``path``."""
    return lambda m: m["entries"].append({**next(e for e in m["entries"] if e["path"] == path), **changes})


def _value(*key: str, value: Any = 1) -> dict[str, Any]:
    return {"kind": "value", "key": list(key), "path": "/".join(key), "encoding": "json", "value": value}


def _tensor(name: str, dtype: str, shape: list[int], chunk_shape: list[int]) -> dict[str, Any]:
    """A manifest entry of a tensor ``name`` that no writer may save: it exceeds a limit. Its chunk
    list is empty: the limits are checked before the list's length (R11.6, R3.19)."""
    layout = ArrayLayout(dtype_by_name(dtype), tuple(shape), tuple(chunk_shape))
    fields = {**layout.manifest_fields(), "chunk_crc32c": ""}
    return {"kind": "tensor", "key": [name], "path": name, **fields, "origin": "torch"}


def _array_files(entry: dict[str, Any], *, chunk: bytes | None = None) -> Callable[[Path], None]:
    """Write the array zarr.json that agrees with ``entry`` (and its one chunk), so the limit is the
    only fault; arrays too large to store have no chunks, which the limit check precedes."""

    def write(checkpoint: Path) -> None:
        dtype = dtype_by_name(entry["dtype"])
        layout = ArrayLayout(dtype, tuple(entry["shape"]), tuple(entry["chunk_shape"]))
        folder = checkpoint / entry["path"]
        folder.mkdir()
        (folder / "zarr.json").write_bytes(dumps(layout.zarr_json()))
        if chunk is not None:
            (first,) = layout.chunk_indices()
            path = folder.joinpath("c", *map(str, first))
            path.parent.mkdir(parents=True)
            write_chunk(path, chunk)

    return write


_RANK_33 = _tensor("big", "uint8", [1] * 33, [1] * 33)
_CHUNK_BYTES = _tensor("big", "float64", [2**29], [2**28 + 1])
_CHUNK_COUNT = _tensor("big", "uint8", [2**24 + 1], [1])
_ARRAY_BYTES = _tensor("big", "float64", [2**47 + 1], [2**28])
_WRAPS = _tensor("big", "float32", [1, 1], [2**32, 2**32])
_MANIFESTS = (
    _ManifestFault("chunk-count", "w lists chunk_count 5; its grid has 4 chunks", ("R3.17", "R3.14"),
                   "inconsistent", _entry("w", lambda e: e.update(chunk_count=5))),
    _ManifestFault("path-not-canonical",
                   'the entry of key ["grp", "v"] has path "grp/%76" (an escaped safe character)',
                   ("R3.11", "R4.7"), "inconsistent", _entry("grp/v", lambda e: e.update(path="grp/%76"))),
    _ManifestFault("duplicate-key", "two entries for the key grp/n, with different values", ("R3.12",),
                   "inconsistent", _duplicate("grp/n", value=4)),
    _ManifestFault("duplicate-array", "two entries for the array w", ("R3.12",), "inconsistent",
                   _duplicate("w")),
    _ManifestFault("key-value-and-prefix", "grp is stored as a value and is also the container of grp/v",
                   ("R3.13",), "inconsistent", _append(_value("grp"))),
    _ManifestFault("key-array-and-prefix", "w is stored as an array and is also the container of w/x",
                   ("R3.13",), "inconsistent", _append(_value("w", "x"))),
    _ManifestFault("key-no-path", "a key whose one component is 300 bytes: no path can hold it",
                   ("R3.11", "R4.6"), "bad_key", _append(_value("k" * 300))),
    _ManifestFault("limit-rank", "an array of rank 33 (the limit is 32)", ("R11.6",), "limit_exceeded",
                   _append(_RANK_33), _array_files(_RANK_33, chunk=b"\x07"), dtypes=("uint8",)),
    _ManifestFault("limit-chunk-bytes", "a chunk of 2^31 + 8 bytes (the limit is 2^31)", ("R11.6",),
                   "limit_exceeded", _append(_CHUNK_BYTES), _array_files(_CHUNK_BYTES), dtypes=("float64",)),
    _ManifestFault("limit-chunk-count", "an array of 2^24 + 1 chunks (the limit is 2^24)", ("R11.6",),
                   "limit_exceeded", _append(_CHUNK_COUNT), _array_files(_CHUNK_COUNT), dtypes=("uint8",)),
    _ManifestFault("limit-array-bytes", "an array of 2^50 + 8 bytes (the limit is 2^50)", ("R11.6",),
                   "limit_exceeded", _append(_ARRAY_BYTES), _array_files(_ARRAY_BYTES), dtypes=("float64",)),
    _ManifestFault("limit-chunk-bytes-wraps",
                   "a chunk of 2^64 float32 elements, whose byte count is 0 in 64-bit arithmetic",
                   ("R11.7", "R11.6"), "limit_exceeded", _append(_WRAPS), _array_files(_WRAPS),
                   dtypes=("float32",)),
)  # fmt: skip
