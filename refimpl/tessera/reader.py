"""``tessera.open``: a lazy, validated handle on a committed checkpoint (spec §11).

Opening reads one document, the root ``zarr.json``: its version is checked
first, then its schema, then every entry against the reader limits, all before
any array is touched. Reads then fetch only the chunks that overlap the
requested region, check each chunk's CRC32C and size, and write straight into
the destination tensor wherever the chunk's bytes are contiguous there.
"""

from __future__ import annotations

import math
import os
import pickle
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .chunk_codec import check_crc, decode_chunk, prefix_elements
from .errors import (
    CheckpointNotFoundError,
    InconsistentCheckpointError,
    KeyMismatchError,
    LimitExceededError,
    MissingChunkError,
    TensorMismatchError,
    UncommittedCheckpointError,
    UnsafeEncodingError,
)
from .format.keys import Key, key_to_path
from .format.layout import CRC32C_SIZE, ChunkIndex, chunk_key
from .format.limits import DEFAULT_LIMITS, ReaderLimits
from .format.manifest import Entry, Manifest, ObjectEntry, TensorEntry, ValueEntry, check_version
from .format.schemas import validate
from .format.strict_json import loads
from .parallel import run_all
from .storage.base import CLAIM_FILE, ROOT_METADATA, Storage
from .storage.local import LocalStorage
from .tensors import as_numpy

__all__ = [
    "Bounds",
    "Checkpoint",
    "ReadTarget",
    "Region",
    "intersect",
    "open_checkpoint",
    "unstage",
    "within",
]

Bounds = tuple[tuple[int, int], ...]
Region = Sequence[slice | int] | None
"""A NumPy-style basic index: one ``slice`` (step 1) or ``int`` per leading dimension."""


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    limits: ReaderLimits = DEFAULT_LIMITS,
    threads: int | None = None,
) -> Checkpoint:
    """Open the committed checkpoint at ``path``; raises before any array is read if it is not one."""
    storage = LocalStorage(path)
    return Checkpoint(storage, read_manifest(storage, limits), limits=limits, threads=threads)


def read_manifest(storage: Storage, limits: ReaderLimits = DEFAULT_LIMITS) -> Manifest:
    """The validated manifest of ``storage``; the error class says what is wrong (spec §13)."""
    if not storage.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {storage.location}")
    if storage.size(ROOT_METADATA) is None:
        claimed = storage.size(CLAIM_FILE) is not None
        raise UncommittedCheckpointError(
            f"{storage.location} has no root zarr.json: "
            + (
                "a save claimed it but never committed (interrupted or still running)"
                if claimed
                else "it is not a committed Tessera checkpoint"
            )
        )
    where = f"{storage.location}/{ROOT_METADATA}"
    return check_root_document(storage.read_file(ROOT_METADATA, limits.max_json_bytes), where, limits)


def check_root_document(data: bytes, where: str, limits: ReaderLimits = DEFAULT_LIMITS) -> Manifest:
    """Parse a root ``zarr.json``: strict JSON, then version, then schema, then entries (spec §13)."""
    doc = loads(data, where, limits)
    attributes = doc.get("attributes") if isinstance(doc, dict) else None
    check_version(attributes.get("tessera") if isinstance(attributes, dict) else None)
    validate(doc, "root", where)
    return Manifest.from_root(doc, limits)


def _bounds(region: Region, shape: tuple[int, ...], key: str) -> tuple[Bounds, tuple[int, ...]]:
    """Half-open bounds per dimension, and which dimensions an ``int`` index drops."""
    items = list(region or ())
    if len(items) > len(shape):
        raise TensorMismatchError(f"{key}: region has {len(items)} indices for {len(shape)} dimensions")
    bounds: list[tuple[int, int]] = []
    dropped: list[int] = []
    for dim, size in enumerate(shape):
        item = items[dim] if dim < len(items) else slice(None)
        if isinstance(item, int) and not isinstance(item, bool):
            index = item + size if item < 0 else item
            if not 0 <= index < size:
                raise TensorMismatchError(f"{key}: index {item} out of range for dimension {dim} of {size}")
            bounds.append((index, index + 1))
            dropped.append(dim)
        elif isinstance(item, slice) and item.step in (None, 1):
            start, stop, _ = item.indices(size)
            bounds.append((start, max(start, stop)))
        else:
            raise TensorMismatchError(f"{key}: region items must be ints or slices with step 1, got {item!r}")
    return tuple(bounds), tuple(dropped)


def _contiguous_span(inner: Bounds, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(first element, count)`` if ``inner`` is one contiguous run of a C-order ``shape``."""
    extents = [b - a for a, b in inner]
    count = math.prod(extents)
    if count == 0:
        return None
    outer = next((d for d, e in enumerate(extents) if e != 1), len(extents))
    if any(extents[d] != shape[d] for d in range(outer + 1, len(shape))):
        return None
    first = 0
    for (a, _), size in zip(inner, shape, strict=True):
        first = first * size + a
    return first, count


def unstage(staged: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy staging buffers into their destinations (GPU, strided, or with dropped dimensions)."""
    for out, target in staged:
        out.copy_(target.reshape(out.shape))


@dataclass(frozen=True, slots=True)
class ReadTarget:
    """A chunk and the part of one request's destination it fills."""

    entry: TensorEntry | ObjectEntry
    index: ChunkIndex
    bounds: Bounds
    """The request's region of the array; ``dst`` holds exactly it."""
    dst: np.ndarray

    def overlap(self) -> tuple[Bounds, Bounds]:
        """The chunk's part of the request, in array and in ``dst`` coordinates."""
        inner = intersect(self.bounds, self.entry.layout.chunk_region(self.index))
        return inner, tuple((a - o, b - o) for (a, b), (o, _) in zip(inner, self.bounds, strict=True))

    def put(self, part: np.ndarray) -> None:
        """Store the chunk's part of the request (``part`` holds exactly its elements)."""
        inner, local = self.overlap()
        self.dst[tuple(slice(a, b) for a, b in local)] = part.reshape([b - a for a, b in inner])

    def fill_from(self, decoded: np.ndarray) -> None:
        """Store this target's part of the whole decoded chunk."""
        inner, _ = self.overlap()
        self.put(decoded[within(inner, self.entry.layout.chunk_region(self.index))])


def intersect(bounds: Bounds, region: Bounds) -> Bounds:
    """The part of ``bounds`` inside ``region`` (both ``[start, stop)`` per dimension)."""
    return tuple((max(a, ra), min(b, rb)) for (a, b), (ra, rb) in zip(bounds, region, strict=True))


def within(inner: Bounds, region: Bounds) -> tuple[slice, ...]:
    """``inner`` as slices of an array holding ``region`` (as a decoded chunk holds its region)."""
    return tuple(slice(a - ra, b - ra) for (a, b), (ra, _) in zip(inner, region, strict=True))


class Checkpoint:
    """A committed checkpoint: its manifest in memory, its arrays read on demand."""

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest,
        *,
        limits: ReaderLimits = DEFAULT_LIMITS,
        threads: int | None = None,
    ) -> None:
        self.storage = storage
        self.manifest = manifest
        self._limits = limits
        self._threads = threads
        self._by_path = {e.path: e for e in manifest.entries}
        self._checked_arrays: set[str] = set()
        self._lock = threading.Lock()

    # -- what is stored ---------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.metadata

    def keys(self) -> list[str]:
        """Every stored key as a path (``optimizer/state/~0/exp_avg``), in state-dict order."""
        return list(self._by_path)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, tuple)) and self._path(key) in self._by_path

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_path)

    def __len__(self) -> int:
        return len(self._by_path)

    def entry(self, key: str | Key) -> Entry:
        path = self._path(key)
        try:
            return self._by_path[path]
        except KeyError:
            raise KeyMismatchError(f"{self.storage.location} has no key {path!r}") from None

    @staticmethod
    def _path(key: str | Key) -> str:
        return key if isinstance(key, str) else key_to_path(key)

    # -- reading ----------------------------------------------------------------------------

    def read(self, key: str | Key, region: Region = None) -> torch.Tensor | np.ndarray:
        """A tensor (or NumPy array, if one was saved), whole or the ``region`` of it."""
        entry = self.array_entry(key)
        bounds, dropped = _bounds(region, entry.layout.shape, entry.path)
        out = torch.empty([b - a for a, b in bounds], dtype=entry.layout.dtype.torch_dtype)
        run_all(self._chunk_tasks(self._targets(entry, bounds, out)), self._threads)
        for dim in reversed(dropped):
            out = out.squeeze(dim)
        if isinstance(entry, TensorEntry) and entry.origin == "numpy":
            return as_numpy(out, entry.layout.dtype)
        return out

    def read_into(self, key: str | Key, out: torch.Tensor, region: Region = None) -> None:
        """Read into an existing tensor (any device, any strides) of matching shape and dtype."""
        self.read_many([(key, out, region)])

    def read_many(self, requests: Sequence[tuple[str | Key, torch.Tensor, Region]]) -> None:
        """Fill each ``(key, out, region)`` request; the chunks of all of them are read in one
        parallel pass, so that many small tensors load as fast as one large one."""
        targets, staged = self.targets_of(requests)
        self.fill(targets)
        unstage(staged)

    def targets_of(
        self, requests: Sequence[tuple[str | Key, torch.Tensor, Region]]
    ) -> tuple[list[ReadTarget], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The chunks each request needs, after checking it; a destination that is not a CPU,
        C-contiguous tensor of the region's shape is staged: ``(out, staging buffer)`` pairs."""
        targets: list[ReadTarget] = []
        staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        for key, out, region in requests:
            entry = self.array_entry(key)
            bounds, dropped = _bounds(region, entry.layout.shape, entry.path)
            shape = [b - a for d, (a, b) in enumerate(bounds) if d not in dropped]
            if list(out.shape) != shape or out.dtype != entry.layout.dtype.torch_dtype:
                raise TensorMismatchError(
                    f"{entry.path}: stored {entry.layout.dtype.torch_dtype} {shape}, "
                    f"destination is {out.dtype} {list(out.shape)}; no implicit cast or reshape"
                )
            target = out
            if out.device.type != "cpu" or not out.is_contiguous() or dropped:
                target = torch.empty([b - a for a, b in bounds], dtype=out.dtype)
                staged.append((out, target))
            targets.extend(self._targets(entry, bounds, target))
        return targets, staged

    def fill(self, targets: list[ReadTarget]) -> None:
        """Read every target's chunk (each chunk once) and fill the targets."""
        run_all(self._chunk_tasks(targets), self._threads)

    def value(self, key: str | Key, *, allow_pickle: bool = False) -> Any:
        """Any stored value: a tensor, an array, bytes, a JSON value, or an unpickled object."""
        return self.values([key], allow_pickle=allow_pickle)[0]

    def values(self, keys: Sequence[str | Key], *, allow_pickle: bool = False) -> list[Any]:
        """The values of several keys, their arrays read in one parallel pass."""
        entries = [self.entry(k) for k in keys]
        pickled = [e.path for e in entries if isinstance(e, ObjectEntry) and e.encoding == "pickle"]
        if pickled and not allow_pickle:
            raise UnsafeEncodingError(
                f"{pickled[0]} is pickled; unpickling can run arbitrary code. "
                "Pass allow_pickle=True only for checkpoints you trust"
            )
        arrays = {
            e.path: torch.empty(e.layout.shape, dtype=e.layout.dtype.torch_dtype)
            for e in entries
            if not isinstance(e, ValueEntry)
        }
        self.read_many([(path, out, None) for path, out in arrays.items()])
        return [self._decode(e, arrays.get(e.path)) for e in entries]

    @staticmethod
    def _decode(entry: Entry, array: torch.Tensor | None) -> Any:
        if isinstance(entry, ValueEntry):
            return entry.decoded()
        assert array is not None
        if isinstance(entry, TensorEntry):
            return as_numpy(array, entry.layout.dtype) if entry.origin == "numpy" else array
        raw = array.numpy().tobytes()
        return raw if entry.encoding == "bytes" else pickle.loads(raw)  # noqa: S301 - opted in

    # -- chunks -----------------------------------------------------------------------------

    def array_entry(self, key: str | Key) -> TensorEntry | ObjectEntry:
        entry = self.entry(key)
        if isinstance(entry, ValueEntry):
            raise TensorMismatchError(f"{entry.path} is a JSON value, not an array; use value()")
        self.check_array_metadata(entry)
        return entry

    def check_array_metadata(self, entry: TensorEntry | ObjectEntry) -> None:
        """Check the array's own ``zarr.json`` against the manifest, once per handle."""
        if entry.path in self._checked_arrays:
            return
        where = f"{self.storage.location}/{entry.path}/zarr.json"
        if self.storage.size(f"{entry.path}/zarr.json") is None:
            raise InconsistentCheckpointError(f"{where} is missing though the manifest lists the array")
        doc = loads(
            self.storage.read_file(f"{entry.path}/zarr.json", self._limits.max_json_bytes),
            where,
            self._limits,
        )
        try:
            entry.layout.check_zarr_json(doc, where)
        except InconsistentCheckpointError:
            # Equal to the expected document implies schema-valid; a document that differs
            # may be malformed altogether, which is the more precise error (spec §13).
            validate(doc, "array", where)
            raise
        with self._lock:
            self._checked_arrays.add(entry.path)

    def chunk_where(self, entry: TensorEntry | ObjectEntry, index: ChunkIndex) -> str:
        return f"{entry.path} chunk {chunk_key(index)} ({self.storage.location})"

    def chunk_size(self, entry: TensorEntry | ObjectEntry, index: ChunkIndex) -> int:
        """The stored size of a chunk, checked: missing and misshapen chunks raise here."""
        layout = entry.layout
        where = self.chunk_where(entry, index)
        size = self.storage.size(f"{entry.path}/{chunk_key(index)}")
        if size is None:
            raise MissingChunkError(
                f"{where} is missing; the checkpoint is damaged (never read as fill value)"
            )
        if layout.zstd_level is None and size != layout.chunk_nbytes + CRC32C_SIZE:
            raise InconsistentCheckpointError(
                f"{where} is {size} bytes; a raw chunk of {list(layout.chunk_shape)} "
                f"{layout.dtype.name} plus its checksum is {layout.chunk_nbytes + CRC32C_SIZE}"
            )
        bound = layout.chunk_nbytes + layout.chunk_nbytes // 128 + 1024 + CRC32C_SIZE
        if size > bound:
            raise LimitExceededError(f"{where} is {size} bytes, more than zstd can produce ({bound})")
        return size

    def read_chunk(self, entry: TensorEntry | ObjectEntry, index: ChunkIndex) -> np.ndarray:
        """One whole chunk, chunk-shaped, its checksum and size checked."""
        size = self.chunk_size(entry, index)
        raw = self.storage.read_file(f"{entry.path}/{chunk_key(index)}", size)
        return decode_chunk(raw, entry.layout, self.chunk_where(entry, index))

    def _targets(
        self, entry: TensorEntry | ObjectEntry, bounds: Bounds, out: torch.Tensor
    ) -> list[ReadTarget]:
        """Every chunk overlapping ``bounds``, each with the CPU, C-contiguous ``out`` to fill."""
        dst = as_numpy(out, entry.layout.dtype)
        return [ReadTarget(entry, index, bounds, dst) for index in entry.layout.chunks_overlapping(bounds)]

    def _chunk_tasks(self, targets: list[ReadTarget]) -> list[Callable[[], None]]:
        """One task per chunk: a chunk that several requests overlap (the boxes of one flat
        range, neighbouring shards) is read and checked once and copied into each."""
        by_chunk: dict[tuple[str, ChunkIndex], list[ReadTarget]] = {}
        for target in targets:
            by_chunk.setdefault((target.entry.path, target.index), []).append(target)
        return [
            self._chunk_task(group[0]) if len(group) == 1 else self._shared_chunk_task(group)
            for group in by_chunk.values()
        ]

    def _chunk_task(self, target: ReadTarget) -> Callable[[], None]:
        entry, index, dst = target.entry, target.index, target.dst
        layout = entry.layout
        chunk = layout.chunk_region(index)
        inner, local = target.overlap()
        span = _contiguous_span(local, dst.shape) if inner == chunk else None
        in_place = (
            span is not None and layout.zstd_level is None and prefix_elements(layout, index) is not None
        )

        def direct() -> None:
            assert span is not None
            self.chunk_size(entry, index)
            itemsize = layout.dtype.itemsize
            flat = dst.reshape(-1).view(np.uint8)
            data = flat[span[0] * itemsize : (span[0] + span[1]) * itemsize].data
            tail = bytearray(layout.chunk_nbytes - len(data) + CRC32C_SIZE)
            path = f"{entry.path}/{chunk_key(index)}"
            self.storage.read_into(path, 0, [data, memoryview(tail)])
            check_crc(
                [data, tail[:-CRC32C_SIZE]],
                bytes(tail[-CRC32C_SIZE:]),
                self.chunk_where(entry, index),
            )

        return direct if in_place else self._shared_chunk_task([target])

    def _shared_chunk_task(self, targets: list[ReadTarget]) -> Callable[[], None]:
        def gathered() -> None:
            decoded = self.read_chunk(targets[0].entry, targets[0].index)
            for target in targets:
                target.fill_from(decoded)

        return gathered

    # -- whole subtrees ---------------------------------------------------------------------

    def subtree(self, prefix: str | Key) -> list[Entry]:
        """The entries stored at ``prefix`` or below it, in state-dict order."""
        path = self._path(prefix)
        return [e for p, e in self._by_path.items() if p == path or p.startswith(path + "/")]

    def __repr__(self) -> str:
        return (
            f"<tessera.Checkpoint {self.storage.location} "
            f"format {self.manifest.format_version}, {len(self)} keys>"
        )
