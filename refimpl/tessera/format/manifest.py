"""The root manifest (spec §3): one GET of the root ``zarr.json`` plans the whole load.

The manifest lives at ``attributes.tessera`` of the root group. It names the
format version, the save, the writer, user metadata, the list containers of
the state dict, and one entry per stored value: a tensor (a Zarr array), an
opaque object (a ``uint8`` Zarr array with an encoding), or a JSON value held
inline. These classes are data only; :meth:`Manifest.from_root` is the single
place a reader turns untrusted JSON into them, after the schema check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import (
    InconsistentCheckpointError,
    LimitExceededError,
    SchemaViolationError,
    UnsupportedVersionError,
)
from .chunk_list import check_chunk_list, listed_crc
from .digest import DIGEST_MEMBER, PLACEHOLDER, seal_root
from .keys import Key, PathTree, key_to_path
from .layout import ArrayLayout, ChunkIndex
from .limits import DEFAULT_LIMITS, ReaderLimits
from .strict_json import dumps
from .tuples import Position, check_positions, join_tuples

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NONFINITE_FLOATS",
    "SUPPORTED_MAJOR",
    "UNDERSTOOD_FIELDS",
    "Entry",
    "Manifest",
    "ObjectEntry",
    "TensorEntry",
    "ValueEntry",
    "WriterInfo",
    "listed_chunk_crc",
]

FORMAT_NAME = "tessera"
FORMAT_VERSION = "1.2"
"""What this writer writes: 1.1 added the chunk lists (R3.19) and the manifest digest (R3.20),
1.2 the tuples (R3.22)."""
SUPPORTED_MAJOR = 1
UNDERSTOOD_FIELDS: frozenset[str] = frozenset()
"""Names a manifest's ``must_understand`` may list that this reader implements (none in 1.0)."""

_VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")

ObjectEncoding = Literal["bytes", "pickle"]
ValueEncoding = Literal["json", "float"]
NONFINITE_FLOATS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
"""Spellings of the floats JSON lacks, as Zarr v3 spells them in fill values."""


@dataclass(frozen=True, slots=True)
class _Keyed:
    """What every entry has: its key, and the key as a path (spec §4), escaped once here since
    readers look it up for every chunk."""

    key: Key
    path: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", key_to_path(self.key))


@dataclass(frozen=True, slots=True)
class TensorEntry(_Keyed):
    """A global tensor, stored as the Zarr array at ``path``."""

    layout: ArrayLayout
    origin: Literal["torch", "numpy"] = "torch"
    """What the writer held; a Python reader gives back the same kind of array."""
    chunk_crc32c: str | None = None
    """The chunk list (R3.19): 8 hex digits per chunk, C order; ``None`` in a 1.0 manifest, and
    in a writer's plan until its chunks are written."""

    kind: Literal["tensor"] = field(default="tensor", init=False)


@dataclass(frozen=True, slots=True)
class ObjectEntry(_Keyed):
    """Opaque bytes (a ``uint8`` array): raw ``bytes``, or a ``pickle`` stored only on request."""

    layout: ArrayLayout
    encoding: ObjectEncoding
    chunk_crc32c: str | None = None
    """As :attr:`TensorEntry.chunk_crc32c`."""

    kind: Literal["object"] = field(default="object", init=False)


@dataclass(frozen=True, slots=True)
class ValueEntry(_Keyed):
    """A JSON value held in the manifest itself (``float``: a non-finite float, spelled as Zarr does)."""

    value: Any
    """As the manifest spells it (JSON: tuples are lists); :meth:`decoded` is the Python value."""
    encoding: ValueEncoding = "json"
    tuples: tuple[Position, ...] = ()
    """Positions in ``value`` of the arrays that were tuples (R3.22); ``()`` before 1.2."""

    kind: Literal["value"] = field(default="value", init=False)

    def decoded(self) -> Any:
        """The value as the writer held it: the float of a ``"float"`` value, tuples rebuilt."""
        if self.encoding == "float":
            return NONFINITE_FLOATS[self.value]
        return join_tuples(self.value, self.tuples)


Entry = TensorEntry | ObjectEntry | ValueEntry


def listed_chunk_crc(entry: TensorEntry | ObjectEntry, index: ChunkIndex) -> int | None:
    """The CRC the manifest lists for chunk ``index`` of ``entry`` (R3.19); ``None`` if it lists none."""
    if entry.chunk_crc32c is None:
        return None
    return listed_crc(entry.chunk_crc32c, entry.layout, index)


@dataclass(frozen=True, slots=True)
class WriterInfo:
    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything the root ``zarr.json`` says about a checkpoint."""

    save_id: str
    """The UUID the writer claimed the path with (spec §9); it ties the root to its claim."""
    created: str
    """RFC 3339 UTC time the save began."""
    writer: WriterInfo
    entries: tuple[Entry, ...]
    """In the order of the original state dict, so a reader rebuilds dicts in that order."""
    lists: tuple[Key, ...] = ()
    """Keys of containers that were lists or tuples, not dicts."""
    tuples: tuple[Key, ...] = ()
    """The keys of ``lists`` whose containers were tuples (R3.8, from 1.2 on)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The user's JSON metadata: step, tokens seen, config."""
    world_size: int = 1
    parallelism: dict[str, Any] = field(default_factory=dict)
    """The saving layout (``{"tp": 8, "dp": 16}``...), for provenance only: loads never need it."""
    format_version: str = FORMAT_VERSION
    must_understand: tuple[str, ...] = ()

    def to_root(self) -> dict[str, Any]:
        """The root ``zarr.json`` document; from 1.1 on, its ``manifest_digest`` is the placeholder
        that :meth:`root_bytes` replaces. The digest member comes before every member that holds
        the caller's data, so that its placeholder is the first in the file (R3.20)."""
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "must_understand": list(self.must_understand),
        }
        if self.format_version != "1.0":
            manifest[DIGEST_MEMBER] = PLACEHOLDER
        manifest |= {
            "save_id": self.save_id,
            "created": self.created,
            "writer": {"name": self.writer.name, "version": self.writer.version},
            "provenance": {"world_size": self.world_size, "parallelism": self.parallelism},
            "metadata": self.metadata,
            "lists": [list(k) for k in self.lists],
        }
        if self.format_version not in ("1.0", "1.1"):
            manifest["tuples"] = [list(k) for k in self.tuples]
        manifest |= {
            "entries": [_entry_to_json(e) for e in self.entries],
        }
        return {"zarr_format": 3, "node_type": "group", "attributes": {"tessera": manifest}}

    def root_bytes(self) -> bytes:
        """The root ``zarr.json`` as the writer publishes it: compact strict JSON, sealed with
        its digest from 1.1 on (R3.20)."""
        data = dumps(self.to_root())
        return data if self.format_version == "1.0" else seal_root(data)

    @classmethod
    def from_root(cls, root: dict[str, Any], limits: ReaderLimits = DEFAULT_LIMITS) -> Manifest:
        """Build from a root document that already passed ``root.schema.json``.

        The version is checked first, so that a newer MAJOR is refused as
        unsupported rather than reported as a pile of schema errors.
        """
        doc = root["attributes"]["tessera"]
        check_version(doc)
        entries = tuple(_entry_from_json(e, i, limits) for i, e in enumerate(doc["entries"]))
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            if entry.path in seen:
                raise InconsistentCheckpointError(
                    f"manifest entries {seen[entry.path]} and {i} both store key {entry.path!r}"
                )
            seen[entry.path] = i
        tree = _check_no_prefix_clash(entries)
        lists = tuple(tuple(k) for k in doc["lists"])
        _check_lists(tree, lists, limits)
        tuples = tuple(tuple(k) for k in doc.get("tuples", ()))
        _check_tuples(lists, tuples)
        provenance = doc["provenance"]
        return cls(
            save_id=doc["save_id"],
            created=doc["created"],
            writer=WriterInfo(doc["writer"]["name"], doc["writer"]["version"]),
            entries=entries,
            lists=lists,
            tuples=tuples,
            metadata=doc["metadata"],
            world_size=provenance["world_size"],
            parallelism=provenance["parallelism"],
            format_version=doc["format_version"],
            must_understand=tuple(doc["must_understand"]),
        )


def check_version(doc: Any) -> None:
    """Refuse an unknown MAJOR version or an unknown must-understand field (spec §12)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise SchemaViolationError("root zarr.json has no Tessera manifest at attributes.tessera")
    version = doc.get("format_version")
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise SchemaViolationError(f"format_version {version!r} is not MAJOR.MINOR")
    if int(match.group(1)) != SUPPORTED_MAJOR:
        raise UnsupportedVersionError(
            f"checkpoint is Tessera format {version}; this reader reads {SUPPORTED_MAJOR}.x only"
        )
    declared = doc.get("must_understand", [])
    if not isinstance(declared, list) or not all(isinstance(f, str) for f in declared):
        raise SchemaViolationError(f"must_understand must be a list of field names, got {declared!r}")
    unknown = [f for f in declared if f not in UNDERSTOOD_FIELDS]
    if unknown:
        raise UnsupportedVersionError(
            f"checkpoint (format {version}) marks {unknown} must-understand; "
            "this reader does not implement them: upgrade Tessera"
        )


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": entry.kind, "key": list(entry.key), "path": entry.path}
    if isinstance(entry, TensorEntry):
        doc.update(entry.layout.manifest_fields())
        doc["origin"] = entry.origin
    elif isinstance(entry, ObjectEntry):
        doc.update(entry.layout.manifest_fields())
        doc["encoding"] = entry.encoding
    if not isinstance(entry, ValueEntry):
        if entry.chunk_crc32c is not None:
            doc["chunk_crc32c"] = entry.chunk_crc32c
    else:
        doc["encoding"] = entry.encoding
        doc["value"] = entry.value
        if entry.tuples:
            doc["tuples"] = [list(p) for p in entry.tuples]
    return doc


def _entry_from_json(doc: dict[str, Any], index: int, limits: ReaderLimits) -> Entry:
    where = f"manifest entry {index} ({doc['path'][:200]!r})"
    if len(doc["key"]) > limits.max_key_depth:
        raise LimitExceededError(
            f"{where}: a key of {len(doc['key'])} components exceeds max_key_depth={limits.max_key_depth}"
        )
    key = tuple(doc["key"])
    if key_to_path(key) != doc["path"]:
        raise InconsistentCheckpointError(
            f"{where}: path does not match key {list(key)} (expected {key_to_path(key)!r})"
        )
    kind = doc["kind"]
    if kind in ("tensor", "object"):
        layout = ArrayLayout.from_manifest(doc, where, limits)
        chunks = doc.get("chunk_crc32c")
        if chunks is not None:
            check_chunk_list(chunks, layout, where)
        if kind == "tensor":
            return TensorEntry(key, layout, doc["origin"], chunks)
        if layout.dtype.name != "uint8" or len(layout.shape) != 1:
            raise SchemaViolationError(f"{where}: an object is a 1-d uint8 array")
        return ObjectEntry(key, layout, doc["encoding"], chunks)
    value = doc["value"]
    if doc["encoding"] == "float" and not (isinstance(value, str) and value in NONFINITE_FLOATS):
        raise SchemaViolationError(f"{where}: float value must be one of {list(NONFINITE_FLOATS)}")
    tuples = tuple(tuple(p) for p in doc.get("tuples", ()))
    check_positions(value, tuples, where)
    return ValueEntry(key, value, doc["encoding"], tuples)


def _check_no_prefix_clash(entries: tuple[Entry, ...]) -> PathTree:
    """No key may be both a stored value and a container of other keys (linear in the paths'
    length, however deep the keys); the tree of the entries' paths."""
    tree = PathTree()
    nodes = [tree.add(e.path, i) for i, e in enumerate(entries)]
    for entry, node in zip(entries, nodes, strict=True):
        if node.children:
            inner = entries[next(i for i in node.items if entries[i] is not entry)]
            raise InconsistentCheckpointError(
                f"key {entry.path!r} is stored as a value and also contains {inner.path!r}"
            )
    return tree


def _check_lists(tree: PathTree, lists: tuple[Key, ...], limits: ReaderLimits) -> None:
    """A container recorded as a list holds only integer components (its indices), R3.8."""
    for key in lists:
        if len(key) > limits.max_key_depth:
            raise LimitExceededError(f"a list key of {len(key)} components exceeds max_key_depth")
        path = key_to_path(key)
        node = tree.find(path)
        if node is None:
            continue  # an empty list: nothing stored below it
        names = [n for n in node.children if not n.startswith("~")]
        if names:
            raise InconsistentCheckpointError(
                f"lists names {path!r} a list, but it holds the string key {names[0][:80]!r}"
            )


def _check_tuples(lists: tuple[Key, ...], tuples: tuple[Key, ...]) -> None:
    """Every key of ``tuples`` is a key of ``lists``: a tuple is a list that comes back as a tuple
    (R3.8); a damaged manifest must not turn a dict into one."""
    listed = set(lists)
    stray = [k for k in tuples if k not in listed]
    if stray:
        raise InconsistentCheckpointError(
            f"tuples names the key {list(stray[0])[:20]}, which lists does not name: every tuple "
            "container is also a list container; the manifest was damaged or badly written"
        )
