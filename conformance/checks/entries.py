"""The manifest's entries against the state the case asked a backend to write (spec §3.2-§3.3, §6, §8).

The result says which arrays the checkpoint's files must hold (their layouts,
as the manifest gives them), and which entries cannot hold the case's data
(wrong kind, type, shape or value): their contents are not read again, since
a finding already says why they differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tessera import LimitExceededError, TesseraError
from tessera.format import DEFAULT_LIMITS, ArrayLayout, DType, dtype_by_name, key_to_path, parent_paths

from .documents import same_json
from .expected import ExpectedCheckpoint, ExpectedEntry, ExpectedObject, ExpectedTensor
from .findings import Findings, shown

__all__ = ["StoredArray", "StoredEntries", "check_entries", "key_path"]

_CRC32C = {"name": "crc32c"}


@dataclass(frozen=True, slots=True)
class StoredArray:
    """A tensor or object entry whose array fields are usable: the layout its files must follow."""

    path: str
    layout: ArrayLayout
    expected: ExpectedTensor | ExpectedObject | None
    """What the case stored at this key, or ``None`` for an entry it did not ask for."""
    chunk_crc32c: str | None = None
    """The entry's chunk list (R3.19) where it is a string of 8 digits per chunk, else ``None``."""


@dataclass(slots=True)
class StoredEntries:
    arrays: list[StoredArray] = field(default_factory=list)
    array_paths: list[str] = field(default_factory=list)
    """Every tensor and object entry's path, usable or not (their prefixes are the groups, R2.4)."""
    unusable: set[str] = field(default_factory=set)
    """Array entries whose fields give no layout: what lies under them is not judged."""
    broken: set[str] = field(default_factory=set)
    """Entries found unable to hold the case's data, or not asked for: their contents are not compared."""
    paths: set[str] = field(default_factory=set)
    """Every entry path of the manifest."""


def key_path(key: Any) -> str | None:
    """The canonical path of a key as the manifest spells it, or ``None`` if it has none."""
    if not isinstance(key, list) or not all(type(c) in (str, int) for c in key):
        return None
    try:
        return key_to_path(tuple(key))
    except TesseraError:
        return None


def check_entries(manifest: dict[str, Any], expected: ExpectedCheckpoint, out: Findings) -> StoredEntries:
    """Kinds, types, shapes, encodings, values, paths and order of every entry (R3.9-R3.16, R8)."""
    stored = StoredEntries()
    raw = manifest.get("entries")
    if not isinstance(raw, list):
        return stored  # the schema check reported it
    wanted = {key_to_path(e.key): e for e in expected.entries}
    order: list[str] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            continue
        path = key_path(entry.get("key"))
        if path is None:
            if isinstance(entry.get("key"), list) and entry["key"]:
                out.add("R3.11", f"entries[{i}] has key {shown(entry['key'])}, which has no path (§4)")
            continue
        if isinstance(entry.get("path"), str) and entry["path"] != path:
            out.add("R3.11", f"entries[{i}] has path {entry['path']!r}; its key's canonical path is {path!r}")
        if path in stored.paths:
            out.add("R3.12", f"entries[{i}] stores {path} a second time")
            continue
        stored.paths.add(path)
        order.append(path)
        _check_entry(path, entry, wanted.get(path), expected, out, stored)
    for path in order:
        clash = next((p for p in parent_paths(path) if p in stored.paths), None)
        if clash is not None:
            out.add("R3.13", f"{clash} is an entry and also a container of the entry {path}")
    _check_order(order, expected, wanted, out)
    return stored


def _check_order(
    order: list[str], expected: ExpectedCheckpoint, wanted: dict[str, Any], out: Findings
) -> None:
    """R3.9, R16.8: every stored value has an entry, no other does, in the state's (merged) order."""
    present = set(order)
    for path, entry in wanted.items():
        if path not in present:
            rule, what = _leaf_rule(entry)
            out.add(rule, f"the manifest has no entry for {path}, {what} of the state")
    for path in order:
        if path not in wanted:
            out.add("R3.9", f"the manifest has an entry for {path}, which the state does not hold")
    got = [p for p in order if p in wanted]
    want = [p for p in wanted if p in present]
    if got != want:
        at = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
        rule = "R16.8" if expected.world_size > 1 else "R3.9"
        out.add(
            rule,
            f"entries are not in the state's order: position {at} holds {got[at]}, where the order "
            f"{'merged across ranks ' if expected.world_size > 1 else ''}puts {want[at]} "
            f"(expected order from there: {want[at : at + 5]})",
        )


def _leaf_rule(entry: ExpectedEntry) -> tuple[str, str]:
    if isinstance(entry, ExpectedTensor):
        return "R8.5", f"a {entry.dtype} tensor"
    if isinstance(entry, ExpectedObject):
        return "R8.4", "a bytes object"
    return ("R8.3", "a non-finite float") if entry.encoding == "float" else ("R8.1", "a JSON value")


def _chunk_list(entry: dict[str, Any], layout: ArrayLayout, where: str, out: Findings) -> str | None:
    """R3.19: a 1.1 writer lists every chunk's CRC, 8 lowercase hex digits each; the list, if usable."""
    listed = entry.get("chunk_crc32c")
    if listed is None:
        out.add("R3.19", f"{where} has no chunk_crc32c; a 1.1 writer lists every chunk's CRC-32C")
        return None
    if not isinstance(listed, str) or re.fullmatch(r"[0-9a-f]*", listed) is None:
        out.add("R3.19", f"{where}: chunk_crc32c is {shown(listed)}, not a string of lowercase hex digits")
        return None
    if len(listed) != 8 * layout.chunk_count:
        out.add(
            "R3.19",
            f"{where}: chunk_crc32c has {len(listed)} digits; {layout.chunk_count} chunks need "
            f"{8 * layout.chunk_count}",
        )
        return None
    return listed


def _check_entry(
    path: str,
    entry: dict[str, Any],
    want: ExpectedEntry | None,
    expected: ExpectedCheckpoint,
    out: Findings,
    stored: StoredEntries,
) -> None:
    where = f"entry {path}"
    if entry.get("kind") in ("tensor", "object"):
        stored.array_paths.append(path)
        layout = _layout(entry, where, out)
        if layout is None:
            stored.unusable.add(path)
            stored.broken.add(path)
        else:
            _check_compression(layout, expected.compression, where, out)
            array_want = want if isinstance(want, (ExpectedTensor, ExpectedObject)) else None
            listed = _chunk_list(entry, layout, where, out)
            stored.arrays.append(StoredArray(path, layout, array_want, listed))
    if want is None or not _matches(entry, want, where, out):
        stored.broken.add(path)


def _matches(entry: dict[str, Any], want: ExpectedEntry, where: str, out: Findings) -> bool:
    """The entry can hold ``want``: same kind, type, shape, encoding, value (the bytes come later)."""
    kind = entry.get("kind")
    rule, what = _leaf_rule(want)
    if kind != {ExpectedTensor: "tensor", ExpectedObject: "object"}.get(type(want), "value"):
        out.add(rule, f"{where} is a {kind!r} entry, but the state holds {what} there")
        return False
    checks: list[tuple[str, Any, Any]] = []
    if isinstance(want, ExpectedTensor):
        checks = [
            ("dtype", entry.get("dtype"), want.dtype),
            ("shape", entry.get("shape"), list(want.bits.shape)),
        ]
        if want.chunk_shape is not None and not same_json(entry.get("chunk_shape"), list(want.chunk_shape)):
            out.add(
                "P12",
                f"{where} has chunk_shape {entry.get('chunk_shape')}; the case asked for "
                f"{list(want.chunk_shape)}",
            )
    elif isinstance(want, ExpectedObject):
        checks = [
            ("encoding", entry.get("encoding"), "bytes"),
            ("shape", entry.get("shape"), [len(want.data)]),
        ]
    else:
        checks = [
            ("encoding", entry.get("encoding"), want.encoding),
            ("value", entry.get("value"), want.value),
        ]
        rule = "R3.16" if want.encoding == "float" else rule
    ok = True
    for member, got, expected in checks:
        if not same_json(got, expected):
            ok = False
            out.add(rule, f"{where} has {member} {shown(got)}; the state's is {shown(expected)}")
    return ok


def _layout(entry: dict[str, Any], where: str, out: Findings) -> ArrayLayout | None:
    """The array the entry describes (R3.14, R3.15, R6.1), within the limits (R5.12); ``None`` if unusable."""
    try:
        dtype = dtype_by_name(entry.get("dtype", ""))
    except TesseraError:
        return None  # the schema check reported it
    shape, chunk_shape = entry.get("shape"), entry.get("chunk_shape")
    if not (isinstance(shape, list) and isinstance(chunk_shape, list)):
        return None  # the schema check reported it
    if not (_integers(shape, 0) and _integers(chunk_shape, 1)):
        return None
    if len(shape) != len(chunk_shape):
        out.add("R3.14", f"{where} has shape {shape} and chunk_shape {chunk_shape} of different lengths")
        return None
    usable, level = _codecs(entry.get("codecs"), dtype, where, out)
    if not usable:
        return None
    layout = ArrayLayout(dtype, tuple(shape), tuple(chunk_shape), level)
    try:
        layout.check_limits(DEFAULT_LIMITS, where)
    except LimitExceededError as exc:
        out.add("R5.12", f"{exc} (the default limits of R11.6)")
        return None
    count = entry.get("chunk_count")
    if type(count) is int and count != layout.chunk_count:
        out.add(
            "R3.14",
            f"{where} has chunk_count {count}; shape {shape} in chunks of {chunk_shape} "
            f"makes {layout.chunk_count}",
        )
    return layout


def _integers(values: list[Any], minimum: int) -> bool:
    return all(type(v) is int and v >= minimum for v in values)


def _codecs(codecs: Any, dtype: DType, where: str, out: Findings) -> tuple[bool, int | None]:
    """R6.1: ``bytes`` (exactly as the type needs), optionally ``zstd``, then ``crc32c``; the zstd level."""
    if not isinstance(codecs, list) or len(codecs) < 2:
        out.add("R6.1", f"{where} has codecs {shown(codecs)}: at least bytes and crc32c")
        return False, None
    usable = True
    if not same_json(codecs[0], dtype.bytes_codec):
        usable = False
        out.add(
            "R6.1",
            f"{where} starts its codecs with {shown(codecs[0])}; a {dtype.name} array's first "
            f"codec is exactly {dtype.bytes_codec}",
        )
    if not same_json(codecs[-1], _CRC32C):
        usable = False
        out.add("R6.1", f"{where} ends its codecs with {shown(codecs[-1])}, not exactly {_CRC32C}")
    level = None
    for codec in codecs[1:-1]:
        level = _zstd_level(codec)
        if _level_as_float(codec):
            usable = False
            out.add("R3.7", f"{where} writes the zstd level as {shown(codec['configuration']['level'])}")
        elif level is None or len(codecs) > 3:
            usable = False
            out.add(
                "R6.1",
                f"{where} has {shown(codec)} between bytes and crc32c; only one "
                '{"name": "zstd", "configuration": {"level": <integer>, "checksum": false}} may be there',
            )
    return usable, level


def _zstd_level(codec: Any) -> int | None:
    if not (isinstance(codec, dict) and set(codec) == {"name", "configuration"} and codec["name"] == "zstd"):
        return None
    config = codec["configuration"]
    if not (
        isinstance(config, dict) and set(config) == {"level", "checksum"} and config["checksum"] is False
    ):
        return None
    return config["level"] if type(config["level"]) is int else None


def _level_as_float(codec: Any) -> bool:
    """A zstd codec right but for its level, written as ``3.0`` (R3.7)."""
    config = codec.get("configuration") if isinstance(codec, dict) else None
    level = config.get("level") if isinstance(config, dict) else None
    if not (isinstance(level, float) and level.is_integer()):
        return False
    assert isinstance(codec, dict) and isinstance(config, dict)
    return _zstd_level({**codec, "configuration": {**config, "level": int(level)}}) is not None


def _check_compression(
    layout: ArrayLayout, compression: dict[str, Any] | None, where: str, out: Findings
) -> None:
    """P12: zstd at the requested level on every array if the case asked for it, else none."""
    level = compression.get("level") if compression else None
    if compression is None and layout.zstd_level is not None:
        out.add(
            "P12",
            f"{where} is compressed (zstd level {layout.zstd_level}); the case asked for no compression",
        )
    elif compression is not None and layout.zstd_level != level:
        got = "no zstd codec" if layout.zstd_level is None else f"zstd level {layout.zstd_level}"
        out.add("P12", f"{where} has {got}; the case asked for zstd at level {level}")
