"""``tessera inspect PATH``: the header, a tree of every entry, and totals; ``--json`` for programs.

Everything shown comes from the root manifest (one read), except the stored
sizes, which take one ``stat`` per chunk (on an object store, one listing of
them all): inspecting never reads chunk data, so it is fast on any checkpoint.
A chunk found missing is reported as a warning that points to ``tessera
verify``, which checks everything.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from ..api.checkpoint import Checkpoint, open_checkpoint
from ..format.layout import chunk_key
from ..format.limits import DEFAULT_LIMITS
from ..format.manifest import Entry, ObjectEntry, TensorEntry, ValueEntry
from ..format.strict_json import loads
from ..storage.base import ROOT_METADATA
from .common import Target, disk_usage, resolve
from .text import codecs_label, compact_json, human_bytes, plural, shorten, unicode_ok

__all__ = ["ArraySizes", "inspect_document", "render", "run", "stored_sizes"]

PREVIEW_WIDTH = 60
"""Characters of a JSON value shown in the tree without ``--values``."""


@dataclass(frozen=True, slots=True)
class ArraySizes:
    nbytes: int
    """Bytes of the elements (shape times item size)."""
    stored_bytes: int
    """Bytes of the chunk files present (padding, compression and checksums included)."""
    missing_chunks: int


def stored_sizes(checkpoint: Checkpoint) -> dict[str, ArraySizes]:
    """The sizes of every array entry, by path; one ``stat`` per chunk, or the storage's one
    listing (:meth:`~tessera.storage.Storage.listed_sizes`), no data read."""
    storage = checkpoint.storage
    listed = storage.listed_sizes()
    sizes: dict[str, ArraySizes] = {}
    for entry in checkpoint.manifest.entries:
        if isinstance(entry, ValueEntry):
            continue
        stored = missing = 0
        for index in entry.layout.chunk_indices():
            path = f"{entry.path}/{chunk_key(index)}"
            size = storage.size(path) if listed is None else listed.get(path)
            if size is None:
                missing += 1
            else:
                stored += size
        sizes[entry.path] = ArraySizes(entry.layout.nbytes, stored, missing)
    return sizes


def inspect_document(checkpoint: Checkpoint, target: Target, sizes: dict[str, ArraySizes]) -> dict[str, Any]:
    """The ``--json`` document: the manifest exactly as stored, plus sizes computed from it."""
    where = f"{checkpoint.storage.location}/{ROOT_METADATA}"
    root = loads(checkpoint.storage.read_file(ROOT_METADATA, DEFAULT_LIMITS.max_json_bytes), where)
    entries = checkpoint.manifest.entries
    return {
        "location": checkpoint.storage.location,
        "run_directory": target.run_dir.storage.location if target.run_dir else None,
        "manifest": root["attributes"]["tessera"],
        "sizes": {
            "entries": {
                path: {
                    "nbytes": s.nbytes,
                    "stored_bytes": s.stored_bytes,
                    "missing_chunks": s.missing_chunks,
                }
                for path, s in sizes.items()
            },
            "total": {
                "entries": len(entries),
                "tensors": sum(isinstance(e, TensorEntry) for e in entries),
                "objects": sum(isinstance(e, ObjectEntry) for e in entries),
                "values": sum(isinstance(e, ValueEntry) for e in entries),
                "chunks": sum(e.layout.chunk_count for e in entries if not isinstance(e, ValueEntry)),
                "nbytes": sum(s.nbytes for s in sizes.values()),
                "stored_bytes": sum(s.stored_bytes for s in sizes.values()),
                "missing_chunks": sum(s.missing_chunks for s in sizes.values()),
                "disk_bytes": disk_usage(checkpoint.storage),
            },
        },
    }


# -- the text form ------------------------------------------------------------------------


@dataclass(slots=True)
class _Node:
    entry: Entry | None = None
    children: dict[str, _Node] = field(default_factory=dict)

    def nbytes(self, sizes: dict[str, ArraySizes]) -> int:
        return sum(s.nbytes for s in self._sizes(sizes))

    def stored_bytes(self, sizes: dict[str, ArraySizes]) -> int:
        return sum(s.stored_bytes for s in self._sizes(sizes))

    def _sizes(self, sizes: dict[str, ArraySizes]) -> list[ArraySizes]:
        if self.entry is not None:
            return [sizes[self.entry.path]] if self.entry.path in sizes else []
        return [s for child in self.children.values() for s in child._sizes(sizes)]

    def count(self) -> int:
        """Entries at or below this node."""
        return int(self.entry is not None) + sum(c.count() for c in self.children.values())


def _tree(entries: tuple[Entry, ...]) -> _Node:
    """Entries nested by path segment, in state-dict order."""
    root = _Node()
    for entry in entries:
        node = root
        *parents, name = entry.path.split("/")
        for segment in parents:
            node = node.children.setdefault(segment, _Node())
        node.children[name] = _Node(entry)
    return root


_HEAD = ("KEY", "KIND", "DTYPE", "SHAPE", "CHUNKS", "SIZE", "STORED", "CODECS", "ENCODING")
_RIGHT = {"SIZE", "STORED"}
_STORED = _HEAD.index("STORED")


def _entry_cells(entry: Entry, sizes: dict[str, ArraySizes], values: bool, times: str) -> list[str]:
    if isinstance(entry, ValueEntry):
        text = compact_json(entry.value) if entry.encoding == "json" else str(entry.value)
        return ["value", text if values else shorten(text, PREVIEW_WIDTH)]
    layout = entry.layout
    kind = "ndarray" if isinstance(entry, TensorEntry) and entry.origin == "numpy" else entry.kind
    return [
        kind,
        layout.dtype.name,
        str(list(layout.shape)),
        f"{list(layout.chunk_shape)} {times}{layout.chunk_count}",
        human_bytes(layout.nbytes),
        human_bytes(sizes[entry.path].stored_bytes),
        codecs_label(layout),
        entry.encoding if isinstance(entry, ObjectEntry) else "",
    ]


def _rows(
    node: _Node, sizes: dict[str, ArraySizes], values: bool, fancy: bool, depth: int | None
) -> list[list[str]]:
    tee, last, bar, blank = ("├── ", "└── ", "│   ", "    ") if fancy else ("|-- ", "`-- ", "|   ", "    ")
    times = "×" if fancy else "x"
    rows: list[list[str]] = []

    def walk(current: _Node, prefix: str, level: int) -> None:
        items = list(current.children.items())
        for i, (name, child) in enumerate(items):
            final = i == len(items) - 1
            label = prefix + (last if final else tee) + name
            if child.entry is not None:
                rows.append([label, *_entry_cells(child.entry, sizes, values, times)])
                continue
            size = human_bytes(child.nbytes(sizes))
            stored = human_bytes(child.stored_bytes(sizes))
            collapse = depth is not None and level >= depth
            count = plural(child.count(), "entry") if collapse else ""
            rows.append([label + "/", "", "", "", count, size, stored, "", ""])
            if not collapse:
                walk(child, prefix + (blank if final else bar), level + 1)

    walk(node, "", 1)
    return rows


def _table(rows: list[list[str]], stored: bool) -> list[str]:
    """Aligned columns; a value row (3 cells) lets its JSON run on from the DTYPE column.

    The STORED column (bytes of the chunk files) is shown only when some array
    is compressed; otherwise it is SIZE plus 4 bytes of checksum per chunk.
    """
    head = list(_HEAD)
    if not stored:
        head.pop(_STORED)
        rows = [r[:_STORED] + r[_STORED + 1 :] if len(r) == len(_HEAD) else r for r in rows]
    full = [r for r in rows if len(r) == len(head)]
    widths = [max(len(r[c]) for r in [head, *full]) for c in range(len(head))]
    lines = []
    for row in [head, *rows]:
        cells = []
        for column, cell in enumerate(row):
            if column == len(row) - 1 and len(row) < len(head):
                cells.append(cell)
            elif head[column] in _RIGHT:
                cells.append(cell.rjust(widths[column]))
            else:
                cells.append(cell.ljust(widths[column]))
        lines.append("  ".join(cells).rstrip())
    return lines


def render(
    checkpoint: Checkpoint,
    target: Target,
    sizes: dict[str, ArraySizes],
    *,
    values: bool = False,
    fancy: bool = True,
    depth: int | None = None,
) -> str:
    """The text ``tessera inspect`` prints."""
    manifest = checkpoint.manifest
    location = checkpoint.storage.location
    if target.run_dir is not None:
        location += f"  (latest of run directory {target.run_dir.storage.location})"
    header = [
        ("checkpoint", location),
        ("format", f"tessera {manifest.format_version}"),
        ("writer", f"{manifest.writer.name} {manifest.writer.version}"),
        ("created", manifest.created),
        ("save_id", manifest.save_id),
        ("world size", str(manifest.world_size)),
    ]
    if manifest.parallelism:
        header.append(("parallelism", compact_json(manifest.parallelism)))
    if manifest.must_understand:
        header.append(("must_understand", ", ".join(manifest.must_understand)))
    if not manifest.metadata:
        header.append(("metadata", "{}"))
    for i, (name, value) in enumerate(manifest.metadata.items()):
        text = f"{name}: {compact_json(value)}"
        header.append(("metadata" if i == 0 else "", text if values else shorten(text, 100)))
    width = max(len(name) for name, _ in header)
    lines = [f"{name:<{width}}  {value}" for name, value in header]
    lines.append("")
    compressed = any(
        e.layout.zstd_level is not None for e in manifest.entries if not isinstance(e, ValueEntry)
    )
    lines.extend(_table(_rows(_tree(manifest.entries), sizes, values, fancy, depth), compressed))
    lines.append("")
    entries = manifest.entries
    tensors = sum(isinstance(e, TensorEntry) for e in entries)
    objects = sum(isinstance(e, ObjectEntry) for e in entries)
    chunks = sum(e.layout.chunk_count for e in entries if not isinstance(e, ValueEntry))
    lines.append(
        f"{plural(len(entries), 'entry')} "
        f"({plural(tensors, 'tensor')}, {plural(objects, 'object')}, "
        f"{plural(len(entries) - tensors - objects, 'value')}), {plural(chunks, 'chunk')}: "
        f"{human_bytes(sum(s.nbytes for s in sizes.values()))} of data, "
        f"{human_bytes(disk_usage(checkpoint.storage))} on disk"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    target = resolve(args.path)
    checkpoint = open_checkpoint(target.storage)
    sizes = stored_sizes(checkpoint)
    if args.json:
        print(json.dumps(inspect_document(checkpoint, target, sizes), indent=2, ensure_ascii=False))
    else:
        print(
            render(
                checkpoint,
                target,
                sizes,
                values=args.values,
                fancy=unicode_ok(sys.stdout),
                depth=args.depth,
            )
        )
    missing = sum(s.missing_chunks for s in sizes.values())
    if missing:
        print(
            f"tessera: warning: {plural(missing, 'chunk')} missing from {checkpoint.storage.location}; "
            "run 'tessera verify' for a full check",
            file=sys.stderr,
        )
    return 0
