"""Malformed checkpoints: documents that are not strict JSON or break their schema.

Each vector is the base checkpoint with one document spoiled; a reader must
refuse it with ``schema_violation`` (``limit_exceeded`` for JSON nested too
deep), and a verifier must report the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bases import GOOD_KEYS, save_base
from .damage import edit_json, edit_manifest, replace_bytes
from .data import tensor
from .vector import VectorWriter

__all__ = ["build"]

Damage = Callable[[Path], object]
Change = Callable[[dict[str, Any]], object]


@dataclass(frozen=True, slots=True)
class _Malformed:
    name: str
    title: str
    rules: tuple[str, ...]
    damage: Damage
    error: str = "schema_violation"
    blob: bool = False
    zstd: bool = False
    array_doc: bool = False
    """The fault is in an array zarr.json: other entries still read, and a verifier may also call the
    document inconsistent with its entry."""


def build(out: Path) -> None:
    """Write every vector of this module under ``out/malformed``."""
    for spec in _VECTORS:
        v = VectorWriter(out, "malformed", spec.name)
        save_base(v, blob=spec.blob, zstd=spec.zstd)
        spec.damage(v.checkpoint)
        probes = [v.read(error=spec.error)]
        if spec.array_doc:
            probes.append(v.read("subset", GOOD_KEYS, rules=["R14.1", "R11.1"]))
        probes.append(v.verify(spec.error, also=["inconsistent"] if spec.array_doc else ()))
        v.finish(spec.title, spec.rules, probes)
    _float8_e4m3(out)


def _root(transform: Callable[[bytes], bytes]) -> Damage:
    def damage(checkpoint: Path) -> None:
        root = checkpoint / "zarr.json"
        root.write_bytes(transform(root.read_bytes()))

    return damage


def _root_text(old: str, new: str) -> Damage:
    return lambda checkpoint: replace_bytes(checkpoint / "zarr.json", old.encode(), new.encode())


def _manifest(change: Change) -> Damage:
    return lambda checkpoint: edit_manifest(checkpoint, change)


def _entry(path: str, change: Change) -> Damage:
    """Change the manifest entry stored at ``path``."""

    def damage(checkpoint: Path) -> None:
        edit_manifest(checkpoint, lambda m: change(next(e for e in m["entries"] if e["path"] == path)))

    return damage


def _array(path: str, change: Change) -> Damage:
    """Change the array zarr.json of ``path``."""
    return lambda checkpoint: edit_json(checkpoint / path / "zarr.json", change)


def _both(path: str, change: Change, to_zarr: Change) -> Damage:
    """Change an entry and its array zarr.json alike, so that they still agree (one fault, not two)."""

    def damage(checkpoint: Path) -> None:
        _entry(path, change)(checkpoint)
        _array(path, to_zarr)(checkpoint)

    return damage


def _codecs(path: str, codecs: list[dict[str, Any]]) -> Damage:
    return _both(path, lambda e: e.update(codecs=codecs), lambda d: d.update(codecs=codecs))


_LE = {"name": "bytes", "configuration": {"endian": "little"}}
_CRC = {"name": "crc32c"}


def _deep(depth: int) -> str:
    """A metadata member nesting so deep that the document reaches ``depth`` (root object = 1)."""
    inner = depth - 4  # root > attributes > tessera > metadata, then the arrays
    return '"metadata":{"x":' + "[" * inner + "]" * inner + "}"


_VECTORS = (
    _Malformed("root-not-json", "the root zarr.json is not JSON", ("R11.4",), _root(lambda b: b"not JSON\n")),
    _Malformed("root-empty", "the root zarr.json is empty", ("R11.4",), _root(lambda b: b"")),
    _Malformed("root-truncated", "the root zarr.json is cut in half", ("R11.4",),
               _root(lambda b: b[: len(b) // 2])),
    _Malformed("root-bom", "the root zarr.json starts with a byte-order mark", ("R2.8", "R11.4"),
               _root(lambda b: b"\xef\xbb\xbf" + b)),
    _Malformed("root-nan", "the token NaN in the root zarr.json", ("R11.4",),
               _root_text('"metadata":{}', '"metadata":{"x":NaN}')),
    _Malformed("root-infinity", "the token -Infinity in the root zarr.json", ("R11.4",),
               _root_text('"metadata":{}', '"metadata":{"x":-Infinity}')),
    _Malformed("root-1e400", "a number that overflows a double (1e400)", ("R11.4",),
               _root_text('"metadata":{}', '"metadata":{"x":1e400}')),
    _Malformed("root-duplicate-member", "an object with two members of one name, deep in the manifest",
               ("R11.4",), _root_text('"metadata":{}', '"metadata":{"x":1,"x":2}')),
    _Malformed("root-duplicate-top", "the root document names zarr_format twice", ("R11.4",),
               _root_text('"zarr_format":3', '"zarr_format":3,"zarr_format":3')),
    _Malformed("root-trailing-data", "a second JSON value after the root document", ("R11.4",),
               _root(lambda b: b + b" {}")),
    _Malformed("root-unpaired-surrogate", "a string escaping an unpaired surrogate (\\ud800)", ("R11.4",),
               _root_text('"metadata":{}', '"metadata":{"x":"\\ud800"}')),
    _Malformed("root-invalid-utf8", "a byte that is not UTF-8 inside a string", ("R11.4", "R2.8"),
               _root(lambda b: b.replace(b'"metadata":{}', b'"metadata":{"x":"\xff"}'))),
    _Malformed("root-no-manifest", "a root group without attributes.tessera", ("R9.13", "R3.1"),
               lambda c: edit_json(c / "zarr.json", lambda d: d.update(attributes={}))),
    _Malformed("root-other-format", 'attributes.tessera with "format": "other"', ("R9.13", "R3.2"),
               _manifest(lambda m: m.update(format="other"))),
    _Malformed("root-not-group", 'a root document of node_type "array"', ("R3.1",),
               lambda c: edit_json(c / "zarr.json", lambda d: d.update(node_type="array"))),
    _Malformed("manifest-missing-writer", "a manifest without its required member writer", ("R3.2",),
               _manifest(lambda m: m.pop("writer"))),
    _Malformed("bad-save-id", "a save_id in upper case", ("R3.3",),
               _manifest(lambda m: m.update(save_id=m["save_id"].upper()))),
    _Malformed("bad-created", "a created time with an offset instead of Z", ("R3.4",),
               _manifest(lambda m: m.update(created="2026-11-21T00:00:00+00:00"))),
    _Malformed("version-three-part", 'format_version "1.0.0"', ("R12.1",),
               _manifest(lambda m: m.update(format_version="1.0.0"))),
    _Malformed("version-leading-zero", 'format_version "1.01"', ("R12.1",),
               _manifest(lambda m: m.update(format_version="1.01"))),
    _Malformed("must-understand-not-array", 'must_understand "x" (a string, not an array)', ("R12.4",),
               _manifest(lambda m: m.update(must_understand="x"))),
    _Malformed("unknown-entry-kind", 'an entry of kind "blob"', ("R3.10",),
               _entry("grp/n", lambda e: e.update(kind="blob"))),
    _Malformed("key-empty-string", 'a key with the empty component ""', ("R3.7", "R4.5"),
               _entry("grp/n", lambda e: e.update(key=["grp", ""]))),
    _Malformed("key-boolean", "a key with the component true", ("R3.7", "R4.2"),
               _entry("grp/n", lambda e: e.update(key=["grp", True]))),
    _Malformed("path-traversal", 'an array entry whose path is "../w"', ("R15.3", "R11.2"),
               _entry("w", lambda e: e.update(path="../w"))),
    _Malformed("unknown-dtype", 'the data type "float128", in the entry and its zarr.json', ("R7.1",),
               _both("w", lambda e: e.update(dtype="float128"), lambda d: d.update(data_type="float128"))),
    _Malformed("codecs-no-crc32c", "a codec chain without crc32c", ("R6.1",), _codecs("w", [_LE])),
    _Malformed("codecs-order", "crc32c before bytes", ("R6.1",), _codecs("w", [_CRC, _LE])),
    _Malformed("codecs-big-endian", "the bytes codec with endian big", ("R6.1",),
               _codecs("w", [{"name": "bytes", "configuration": {"endian": "big"}}, _CRC])),
    _Malformed("codecs-endian-one-byte", "an endian on the bytes codec of an int8 array", ("R6.1",),
               _codecs("grp/b", [_LE, _CRC])),
    _Malformed("codecs-crc32c-configuration", "crc32c with a configuration member", ("R6.1",),
               _codecs("w", [_LE, {"name": "crc32c", "configuration": {}}])),
    _Malformed("codecs-unknown", "a gzip codec between bytes and crc32c", ("R6.1",),
               _codecs("w", [_LE, {"name": "gzip", "configuration": {"level": 5}}, _CRC])),
    _Malformed("codecs-zstd-checksum", "zstd with checksum true", ("R6.1",),
               _codecs("w", [_LE, {"name": "zstd", "configuration": {"level": 3, "checksum": True}}, _CRC]),
               zstd=True),
    _Malformed("codecs-zstd-level-float", "a zstd level written 3.0", ("R3.7", "R6.1"),
               _codecs("w", [_LE, {"name": "zstd", "configuration": {"level": 3.0, "checksum": False}},
                             _CRC]), zstd=True),
    _Malformed("root-zarr-format-float", "zarr_format written 3.0 in the root zarr.json", ("R3.7", "R3.1"),
               _root_text('"zarr_format":3', '"zarr_format":3.0')),
    _Malformed("shape-rank-mismatch", "chunk_shape [2, 3, 1] for shape [4, 6]", ("R3.17",),
               _entry("w", lambda e: e.update(chunk_shape=[2, 3, 1]))),
    _Malformed("integer-as-float", "shape written [4.0,6]: an integer with a fraction", ("R3.7",),
               _root_text('"shape":[4,6]', '"shape":[4.0,6]')),
    _Malformed("float-value-lowercase", 'a float value spelled "nan"', ("R3.16",),
               _entry("grp/n", lambda e: e.update(encoding="float", value="nan"))),
    _Malformed("object-dtype", "an object entry of dtype float32", ("R3.15",),
               _entry("blob", lambda e: e.update(dtype="float32")), blob=True),
    _Malformed("object-rank", "an object entry of shape [1, 11]", ("R3.15",),
               _entry("blob", lambda e: e.update(shape=[1, 11], chunk_shape=[1, 11])), blob=True),
    _Malformed("json-too-deep", "the root zarr.json nests 65 deep (the limit is 64)", ("R11.5",),
               _root_text('"metadata":{}', _deep(65)), error="limit_exceeded"),
    _Malformed("array-json-not-json", "the array zarr.json of w is cut short", ("R11.4", "R5.10"),
               lambda c: (c / "w" / "zarr.json").write_bytes(b'{"zarr_format":3,'), array_doc=True),
    _Malformed("array-json-nan-token", "fill_value written as the token NaN in an array zarr.json",
               ("R11.4", "R5.9"), lambda c: replace_bytes(c / "w" / "zarr.json", b'"NaN"', b"NaN"),
               array_doc=True),
    _Malformed("array-json-schema", "an array zarr.json without chunk_key_encoding", ("R5.10", "R5.8"),
               _array("w", lambda d: d.pop("chunk_key_encoding")), array_doc=True),
    _Malformed("array-integer-as-float", "shape written [4,6.0] in an array zarr.json", ("R3.7", "R5.10"),
               lambda c: replace_bytes(c / "w" / "zarr.json", b'"shape":[4,6]', b'"shape":[4,6.0]'),
               array_doc=True),
    _Malformed("array-chunk-key-separator", 'the chunk key encoding "default" with separator "."',
               ("R5.2", "R5.10"), _array("w", lambda d: d.update(chunk_key_encoding={
                   "name": "default", "configuration": {"separator": "."}})), array_doc=True),
    _Malformed("rectilinear-grid", "an array zarr.json with a rectilinear chunk grid", ("R5.1",),
               _array("w", lambda d: d.update(chunk_grid={"name": "rectilinear", "configuration": {
                   "kind": "inline", "chunk_shapes": [[2, 2], [3, 3]]}})), array_doc=True),
)  # fmt: skip


def _float8_e4m3(out: Path) -> None:
    """A float8_e4m3fn array labelled float8_e4m3, a different format that 1.0 does not define."""
    v = VectorWriter(out, "malformed", "dtype-float8-e4m3")
    v.save({"x": tensor("float8_e4m3fn", (4,), 130)})
    _both("x", lambda e: e.update(dtype="float8_e4m3"), lambda d: d.update(data_type="float8_e4m3"))(
        v.checkpoint
    )
    v.finish(
        'the data type "float8_e4m3" (zarr-extensions\' IEEE-like type, not float8_e4m3fn)',
        ["R7.8", "R7.1"],
        [v.read(error="schema_violation"), v.verify("schema_violation")],
    )
