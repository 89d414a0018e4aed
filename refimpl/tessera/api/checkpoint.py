"""``tessera.open``: a lazy, validated handle on a committed checkpoint (spec §11).

Opening reads one document, the root ``zarr.json``: its version is checked
first, then its schema, then every entry against the reader limits, all before
any array is touched. Reads then fetch only the chunks that overlap the
requested region, open each chunk file once, and check each chunk's size and
CRC32C; a cold load runs at about the speed of the disk:

- A chunk whose bytes form one contiguous run of its destination (the common
  case: a whole chunk into a C-contiguous tensor) is read straight into it,
  block by block, each block's CRC32C computed right after the block arrived,
  while it is still in the CPU cache. The size of the open file is checked
  before any byte is read. A destination on a GPU gets each block through a
  small pool of pinned host buffers (:mod:`.staging`), copied asynchronously
  on a CUDA stream of the handle's own; the read returns once they landed.
- Any other chunk (compressed, cut by the region, shared by several
  requests, or landing in a strided destination) is read whole, checked and
  decoded, and each destination's part is copied from it.
- Each array's own ``zarr.json`` is checked against the manifest (once per
  handle) by a task of the same parallel pass as the chunk reads, queued a
  few tasks ahead of the array's first chunk, rather than all serially before
  any read; each chunk read still waits for its array's check (R5.10).

A read that fails raises before it returns, having possibly written part of
its destinations (the chunks read before the failure was found): after a
failed read, a destination holds nothing meaningful (R6.6).
"""

from __future__ import annotations

import math
import pickle
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import crc32c
import numpy as np
import torch

from ..engine.gpu.crc32c import crc32c_combine, device_crc32c, device_crc32c_many
from ..engine.gpu.direct_io import direct_read_threads, gpu_direct_storage
from ..engine.gpu.streams import thread_stream
from ..engine.staging import StagingPool, shared_pool
from ..errors import (
    CheckpointDeletedError,
    CheckpointNotFoundError,
    InconsistentCheckpointError,
    KeyMismatchError,
    LimitExceededError,
    MissingChunkError,
    TensorMismatchError,
    UncommittedCheckpointError,
    UnsafeEncodingError,
)
from ..format.chunk_codec import check_crc, decode_chunk, prefix_elements
from ..format.dtypes import DType
from ..format.keys import Key, PathTree, key_to_path
from ..format.layout import CRC32C_SIZE, ArrayLayout, ChunkIndex, chunk_key
from ..format.limits import DEFAULT_LIMITS, ReaderLimits
from ..format.manifest import (
    Entry,
    Manifest,
    ObjectEntry,
    TensorEntry,
    ValueEntry,
    listed_chunk_crc,
)
from ..format.root import check_root_document
from ..format.schemas import validate
from ..format.strict_json import loads
from ..state.tensors import as_numpy
from ..storage.base import CLAIM_FILE, ROOT_METADATA, FileMissingError, ReadNext, Storage
from ..storage.resolve import Location, storage_for
from ..util.parallel import default_read_threads, run_all

__all__ = [
    "Bounds",
    "Checkpoint",
    "ReadTarget",
    "Region",
    "check_crc",
    "intersect",
    "open_checkpoint",
    "within",
]

Bounds = tuple[tuple[int, int], ...]
Region = Sequence[slice | int] | None
"""A NumPy-style basic index: one ``slice`` (step 1) or ``int`` per leading dimension."""

ArrayEntry = TensorEntry | ObjectEntry
ChunkTask = tuple[ArrayEntry, Callable[[], None]]
"""A task that reads one chunk, and the array the chunk belongs to."""

BLOCK_BYTES = 8 * 2**20
"""Bytes read and checksummed at a time: large enough for one request to keep the disk busy,
small enough to still sit in the CPU cache when the checksum runs over it."""


def open_checkpoint(
    path: Location,
    *,
    limits: ReaderLimits = DEFAULT_LIMITS,
    threads: int | None = None,
    gpu_direct: bool = False,
) -> Checkpoint:
    """Open the committed checkpoint at ``path``; raises before any array is read if it is not one.

    With ``gpu_direct=True``, chunks read into GPU tensors go from their files straight to device
    memory through cuFile (KvikIO) and are checksummed on the GPU; raises
    :class:`~tessera.GpuDirectUnavailableError` without KvikIO or CUDA.
    """
    storage = gpu_direct_storage(path) if gpu_direct else storage_for(path)
    if gpu_direct and threads is None:
        threads = direct_read_threads()
    return Checkpoint(storage, read_manifest(storage, limits), limits=limits, threads=threads)


def read_manifest(storage: Storage, limits: ReaderLimits = DEFAULT_LIMITS) -> Manifest:
    """The validated manifest of ``storage``; the error class says what is wrong (spec §13)."""
    if not storage.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {storage.location}")
    try:
        data = storage.read_file(ROOT_METADATA, limits.max_json_bytes)
    except FileMissingError:
        claimed = storage.size(CLAIM_FILE) is not None
        raise UncommittedCheckpointError(
            f"{storage.location} has no root zarr.json: "
            + (
                "a save claimed it but never committed (interrupted or still running)"
                if claimed
                else "it is not a committed Tessera checkpoint"
            )
        ) from None
    return check_root_document(data, f"{storage.location}/{ROOT_METADATA}", limits)


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
        elif isinstance(item, slice):  # an argument mistake, not a region outside the array (R14.2)
            raise ValueError(f"{key}: region slices must have step 1, got {item!r}")
        else:
            raise TypeError(f"{key}: region items must be ints or slices with step 1, got {item!r}")
    return tuple(bounds), tuple(dropped)


class _DeviceCopies:
    """How a handle's reads reach destinations outside plain host memory (GPU tensors, or
    conjugate and negative views): through reusable staging buffers, pinned when CUDA is
    there, and on a CUDA stream per device, so that the copies overlap the next reads."""

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def begin(self, device: torch.device) -> None:
        """Order the copies to ``device`` after the work the calling thread queued there (it
        may still be using the destinations); call in the thread that asked for the read."""
        if device.type != "cuda":
            return
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))

    def stream(self, device: torch.device) -> torch.cuda.Stream | None:
        return self._streams.get(device)

    @staticmethod
    def send(dst: torch.Tensor, host: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """Copy ``host`` into ``dst``: asynchronously on ``stream`` if given, else at once."""
        if stream is None:
            dst.copy_(host)
            return
        with torch.cuda.stream(stream):
            dst.copy_(host, non_blocking=True)

    def copy(self, dst: torch.Tensor, source: np.ndarray, dtype: DType) -> None:
        """Copy a host array into ``dst`` (same shape, any strides) through a staging buffer."""
        stream = self.stream(dst.device)
        with self.pool.buffer(source.nbytes, stream) as host:
            staged = host.view(dtype.torch_dtype).reshape(source.shape)
            as_numpy(staged, dtype)[...] = source
            self.send(dst, staged, stream)

    def wait(self) -> None:
        """Return once every copy queued so far has landed."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.synchronize()


class _Gate:
    """An array's ``zarr.json`` check, run once, by whichever task of the pass comes to it
    first: the check's own task (queued a few tasks ahead) or one of the array's chunk reads.
    The others wait for the thread running it, so a wait here always ends. (Issue 15: chunk
    reads waited for a check task that a failing pass had cancelled while still queued, and
    the pass's shutdown then waited for them forever.)"""

    def __init__(self, check: Callable[[], None]) -> None:
        self._check = check
        self._lock = threading.Lock()
        self._ran = False
        self._passed = False

    def check(self) -> None:
        """Run the check unless it ran; its error is raised by the task that ran it only."""
        with self._lock:
            if self._ran:
                return
            self._ran = True
            self._check()
            self._passed = True

    def run(self, task: Callable[[], None]) -> None:
        """Run a chunk read once the check passed; after a failed check, skip it (the task that
        ran the check raises the error)."""
        self.check()
        if self._passed:
            task()


class _DeviceChecksums:
    """The CRCs of one pass's chunks read straight into GPU memory, checked together once its
    reads are done: one pair of kernel launches and one wait for all of them (one collector per
    pass, so that passes on one handle in several threads check only their own chunks). Checking each chunk as
    it lands cost each read a launch and a wait, and the I/O threads contended for the GIL
    around them; on the H200 that alone took a load with no data I/O at all from 0.44 s on one
    thread to 1.1-1.3 s on 32."""

    @dataclass(frozen=True, slots=True)
    class Pending:
        data: torch.Tensor
        """The chunk's data as it lies in GPU memory (flat bytes)."""
        padding_crc: int
        """CRC32C of the chunk's edge padding after ``data``, read on the host."""
        padding: int
        """Bytes of that padding."""
        stored: bytes
        where: str
        listed: int | None
        """The CRC the manifest lists for the chunk (R3.19), if it lists one."""

    def __init__(self) -> None:
        self._pending: list[_DeviceChecksums.Pending] = []
        self._lock = threading.Lock()

    def add(self, pending: Pending) -> None:
        with self._lock:
            self._pending.append(pending)

    def check(self) -> None:
        """Check every pending chunk, each device's in one batch; raise the first mismatch."""
        with self._lock:
            pending, self._pending = self._pending, []
        by_device: dict[torch.device, list[_DeviceChecksums.Pending]] = {}
        for chunk in pending:
            by_device.setdefault(chunk.data.device, []).append(chunk)
        for device, chunks in by_device.items():
            with torch.cuda.stream(thread_stream(device)):
                crcs = device_crc32c_many([chunk.data for chunk in chunks])
            for chunk, crc in zip(chunks, crcs, strict=True):
                if chunk.padding:
                    crc = crc32c_combine(crc, chunk.padding_crc, chunk.padding)
                check_crc(crc, chunk.stored, chunk.where, chunk.listed)


@dataclass(frozen=True, slots=True)
class _Request:
    """One checked request of a pass: the region of an array and the destination it fills."""

    entry: ArrayEntry
    bounds: Bounds
    dst: torch.Tensor
    """Viewed with the region's shape, as :attr:`ReadTarget.dst`."""
    copies: _DeviceCopies | None

    def target(self, index: ChunkIndex) -> ReadTarget:
        return ReadTarget(self.entry, index, self.bounds, self.dst, self.copies)


@dataclass(frozen=True, slots=True)
class ReadTarget:
    """A chunk and the part of one request's destination it fills."""

    entry: ArrayEntry
    index: ChunkIndex
    bounds: Bounds
    """The request's region of the array; ``dst`` holds exactly it."""
    dst: torch.Tensor
    """The request's destination, viewed with the region's shape (a dimension that an ``int``
    index drops is there with size 1); any device, any strides."""
    copies: _DeviceCopies | None = None
    """How bytes reach ``dst``; ``None`` when it is plain host memory, written through NumPy."""

    def overlap(self) -> tuple[Bounds, Bounds]:
        """The chunk's part of the request, in array and in ``dst`` coordinates."""
        inner = intersect(self.bounds, self.entry.layout.chunk_region(self.index))
        return inner, tuple((a - o, b - o) for (a, b), (o, _) in zip(inner, self.bounds, strict=True))

    def part(self) -> torch.Tensor:
        """The view of ``dst`` that the chunk fills."""
        _, local = self.overlap()
        return self.dst[tuple(slice(a, b) for a, b in local)]

    def put(self, part: np.ndarray) -> None:
        """Store the chunk's part of the request (``part`` holds exactly its elements)."""
        inner, _ = self.overlap()
        shaped = part.reshape([b - a for a, b in inner])
        if self.copies is None:
            as_numpy(self.part(), self.entry.layout.dtype)[...] = shaped
        else:
            self.copies.copy(self.part(), shaped, self.entry.layout.dtype)

    def fill_from(self, decoded: np.ndarray) -> None:
        """Store this target's part of the whole decoded chunk."""
        inner, _ = self.overlap()
        self.put(decoded[within(inner, self.entry.layout.chunk_region(self.index))])


def _read_tail(read: ReadNext, padding: int, checksum: int) -> tuple[int, bytes]:
    """Read the last ``padding`` bytes of a chunk's data (its edge padding) and then its stored
    CRC: the CRC32C continued from ``checksum`` over the padding, and the stored CRC."""
    scratch = memoryview(bytearray(min(padding, BLOCK_BYTES)))
    for start in range(0, padding, BLOCK_BYTES):
        block = scratch[: min(BLOCK_BYTES, padding - start)]
        read(block)
        checksum = crc32c.crc32c(block, checksum)
    stored = bytearray(CRC32C_SIZE)
    read(memoryview(stored))
    return checksum, bytes(stored)


def _largest_chunk_file(layout: ArrayLayout) -> int:
    """The most bytes a valid chunk file of ``layout`` can hold (zstd's worst case, plus the CRC)."""
    return layout.chunk_nbytes + layout.chunk_nbytes // 128 + 1024 + CRC32C_SIZE


def _overlaps(bounds: Bounds, region: Bounds) -> bool:
    """Whether ``bounds`` and ``region`` share any element."""
    return all(max(a, ra) < min(b, rb) for (a, b), (ra, rb) in zip(bounds, region, strict=True))


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
        self._subtrees: PathTree | None = None
        self._checked_arrays: set[str] = set()
        self._accepted_documents: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()
        self._copies = _DeviceCopies(shared_pool())

    @property
    def gpu_direct(self) -> bool:
        """Whether chunks for GPU destinations are read straight into device memory (the storage
        has device I/O); else they come through pinned host buffers."""
        return self.storage.device_io is not None

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
        self._check_allocation([(entry, math.prod(b - a for a, b in bounds) * entry.layout.dtype.itemsize)])
        out = self._allocate(entry, [b - a for a, b in bounds])
        self.fill([_Request(entry, bounds, out, None)], [entry])
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
        checked = self._checked_requests(requests)
        self.fill(checked, [r.entry for r in checked])

    def targets_of(self, requests: Sequence[tuple[str | Key, torch.Tensor, Region]]) -> list[ReadTarget]:
        """The chunks each request needs, after checking the request against the manifest (the
        arrays' own ``zarr.json`` are checked when their chunks are read)."""
        return [
            request.target(index)
            for request in self._checked_requests(requests)
            for index in request.entry.layout.chunks_overlapping(request.bounds)
        ]

    def _checked_requests(self, requests: Sequence[tuple[str | Key, torch.Tensor, Region]]) -> list[_Request]:
        """Each request checked against the manifest, its destination viewed with the region's
        shape; devices about to receive reads are made ready for them."""
        checked: list[_Request] = []
        devices: set[torch.device] = set()
        for key, out, region in requests:
            entry = self.array_entry(key)
            path = entry.path
            bounds, dropped = _bounds(region, entry.layout.shape, path)
            shape = [b - a for d, (a, b) in enumerate(bounds) if d not in dropped]
            if list(out.shape) != shape or out.dtype != entry.layout.dtype.torch_dtype:
                raise TensorMismatchError(
                    f"{path}: stored {entry.layout.dtype.torch_dtype} {shape}, "
                    f"destination is {out.dtype} {list(out.shape)}; no implicit cast or reshape"
                )
            if any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape, strict=True)):
                raise TensorMismatchError(
                    f"{path}: the destination repeats elements in memory (an expanded view); "
                    "read into a tensor whose elements are distinct"
                )
            dst = out.detach()
            for dim in dropped:
                dst = dst.unsqueeze(dim)
            copies = None
            if dst.device.type != "cpu" or dst.is_conj() or dst.is_neg():
                copies = self._copies
                devices.add(dst.device)
            checked.append(_Request(entry, bounds, dst, copies))
        for device in devices:
            if self.gpu_direct and device.type == "cuda":
                # Device I/O writes device memory outside any stream: whatever the caller queued
                # that still uses the destinations must be done first.
                torch.cuda.current_stream(device).synchronize()
            self._copies.begin(device)
        return checked

    def fill(self, requests: Sequence[_Request], arrays: Iterable[ArrayEntry] = ()) -> None:
        """Read every chunk the requests need (each chunk once) and fill them, checking the
        ``zarr.json`` of their arrays and of ``arrays`` in the same parallel pass."""
        checksums = _DeviceChecksums()
        self.run_reads(self._chunk_tasks(requests, checksums), arrays, checksums=checksums)

    def run_reads(
        self,
        tasks: Iterable[ChunkTask],
        arrays: Iterable[ArrayEntry] = (),
        threads: int | None = None,
        checksums: _DeviceChecksums | None = None,
    ) -> None:
        """Run chunk reads on the I/O threads, each array's first checking the array's own
        ``zarr.json`` against the manifest (spec R5.10) unless this handle did already.

        ``tasks`` is consumed lazily, as threads free up, so that a pass over millions of
        chunks holds only the tasks in flight and stops at the first failure. Each check is a
        task of the same pass, queued as many tasks ahead of its array's first chunk as there
        are threads, so that it has usually finished when the chunk is due; a chunk that comes
        first runs it itself (no chunk is read before its array checked, and no task waits for
        a task not yet started). The zarr.json of ``arrays`` without chunks to read are
        checked too. Returns once every copy to a device landed and every chunk that the tasks
        read straight into GPU memory (and left to ``checksums``) passed its CRC; raises the
        first failure, destinations possibly partly written.
        """
        workers = threads or self._threads or default_read_threads()
        try:
            run_all(self._gated(tasks, arrays, workers), workers)
            if checksums is not None:
                checksums.check()
        finally:
            self.wait_for_copies()

    def _gated(
        self, tasks: Iterable[ChunkTask], arrays: Iterable[ArrayEntry], ahead: int
    ) -> Iterator[Callable[[], None]]:
        """The pass's tasks in order: each chunk read behind its array's check, each check
        ``ahead`` tasks before the array's first chunk read."""
        gates: dict[str, _Gate] = {}
        window: deque[Callable[[], None]] = deque()
        for entry, task in tasks:
            path = entry.path
            if path not in self._checked_arrays:
                gate = gates.get(path)
                if gate is None:
                    gate = gates[path] = _Gate(partial(self.check_array_metadata, entry))
                    yield gate.check
                task = partial(gate.run, task)
            window.append(task)
            if len(window) > ahead:
                yield window.popleft()
        yield from window
        for entry in arrays:
            if entry.path not in gates and entry.path not in self._checked_arrays:
                gates[entry.path] = _Gate(partial(self.check_array_metadata, entry))
                yield gates[entry.path].check

    def wait_for_copies(self) -> None:
        """Return once every asynchronous copy into a device destination has landed."""
        self._copies.wait()

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
        self._check_allocation([(e, e.layout.nbytes) for e in entries if not isinstance(e, ValueEntry)])
        arrays = {
            e.path: self._allocate(e, list(e.layout.shape))
            for e in entries
            if not isinstance(e, ValueEntry)
        }
        self.read_many([(path, out, None) for path, out in arrays.items()])
        return [self._decode(e, arrays.get(e.path)) for e in entries]

    def _check_allocation(self, arrays: Sequence[tuple[ArrayEntry, int]]) -> None:
        """Refuse, before allocating, new tensors of more bytes in all than the reader limit
        ``max_load_bytes`` (spec R11.6): a manifest's declared shapes alone must not exhaust memory."""
        total = sum(nbytes for _, nbytes in arrays)
        if total > self._limits.max_load_bytes:
            largest, nbytes = max(arrays, key=lambda a: a[1])
            raise LimitExceededError(
                f"{self.storage.location}: loading would allocate {total} bytes, over the limit "
                f"max_load_bytes={self._limits.max_load_bytes} (the largest, {largest.path}, is "
                f"{nbytes} bytes); load into a template, select keys, or raise the limit"
            )

    def _allocate(self, entry: ArrayEntry, shape: list[int]) -> torch.Tensor:
        """A new CPU tensor for ``entry``; memory that runs out (within ``max_load_bytes``, but
        taken by others) is ``limit_exceeded``, not the allocator's bare error."""
        try:
            return torch.empty(shape, dtype=entry.layout.dtype.torch_dtype)
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
                raise  # not an allocation failure: a bug to see, not to mask
            raise LimitExceededError(
                f"{entry.path}: cannot allocate {math.prod(shape) * entry.layout.dtype.itemsize} "
                "bytes to load it into (out of memory); load into a template or select fewer keys"
            ) from None

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

    def array_entry(self, key: str | Key) -> ArrayEntry:
        """The entry of the array at ``key``; its own ``zarr.json`` is checked when it is read."""
        entry = self.entry(key)
        if isinstance(entry, ValueEntry):
            raise TensorMismatchError(f"{entry.path} is a JSON value, not an array; use value()")
        return entry

    def check_array_metadata(self, entry: ArrayEntry) -> None:
        """Check the array's own ``zarr.json`` against the manifest, once per handle."""
        path = entry.path
        if path in self._checked_arrays:
            return
        where = f"{self.storage.location}/{path}/zarr.json"
        try:
            data = self.storage.read_file(f"{path}/zarr.json", self._limits.max_json_bytes)
        except FileMissingError:
            self._check_not_deleted(f"{path}/zarr.json")
            raise InconsistentCheckpointError(
                f"{where} is missing though the manifest lists the array"
            ) from None
        layout = entry.layout
        accepted = (layout.dtype.name, layout.shape, layout.chunk_shape, layout.zstd_level, data)
        if accepted not in self._accepted_documents:
            doc = loads(data, where, self._limits)
            try:
                entry.layout.check_zarr_json(doc, where)
            except InconsistentCheckpointError:
                # Equal to the expected document implies schema-valid; a document that differs
                # may be malformed altogether, which is the more precise error (spec §13).
                validate(doc, "array", where)
                raise
            # The same bytes for the same layout pass the same checks: arrays of one shape and
            # dtype (every layer of a model) are parsed and compared once.
            self._accepted_documents.add(accepted)
        with self._lock:
            self._checked_arrays.add(path)

    def _check_not_deleted(self, vanished: str) -> None:
        """Raise :class:`CheckpointDeletedError` if the root ``zarr.json`` is gone too: a file
        missing during a read is then the checkpoint deleted underneath, not damage."""
        if self.storage.size(ROOT_METADATA) is None:
            raise CheckpointDeletedError(
                f"{self.storage.location} was deleted while being read ({vanished} and the root "
                "zarr.json are gone); load another checkpoint"
            )

    def chunk_where(self, entry: ArrayEntry, index: ChunkIndex) -> str:
        return f"{entry.path} chunk {chunk_key(index)} ({self.storage.location})"

    def chunk_size(self, entry: ArrayEntry, index: ChunkIndex) -> int:
        """The stored size of a chunk, checked: missing and misshapen chunks raise here."""
        size = self.storage.size(f"{entry.path}/{chunk_key(index)}")
        self._check_chunk_file(entry, index, size)
        assert size is not None
        return size

    def _check_chunk_file(self, entry: ArrayEntry, index: ChunkIndex, size: int | None) -> None:
        """Refuse a chunk file that is missing (``None``) or of a size no valid chunk has."""
        layout = entry.layout
        where = self.chunk_where(entry, index)
        if size is None:
            self._check_not_deleted(f"{entry.path}/{chunk_key(index)}")
            raise MissingChunkError(
                f"{where} is missing; the checkpoint is damaged (never read as fill value)"
            )
        if layout.zstd_level is None and size != layout.chunk_nbytes + CRC32C_SIZE:
            raise InconsistentCheckpointError(
                f"{where} is {size} bytes; a raw chunk of {list(layout.chunk_shape)} "
                f"{layout.dtype.name} plus its checksum is {layout.chunk_nbytes + CRC32C_SIZE}"
            )
        bound = _largest_chunk_file(layout)
        if size > bound:
            raise LimitExceededError(f"{where} is {size} bytes, more than zstd can produce ({bound})")

    def read_chunk(self, entry: ArrayEntry, index: ChunkIndex) -> np.ndarray:
        """One whole chunk, chunk-shaped, its size and checksum checked; one open of its file."""
        path = f"{entry.path}/{chunk_key(index)}"
        try:
            raw = self.storage.read_file(path, _largest_chunk_file(entry.layout))
        except FileMissingError:
            self._check_chunk_file(entry, index, None)
            raise
        except LimitExceededError:
            self.chunk_size(entry, index)  # the precise error: a raw chunk of the wrong size
            raise
        self._check_chunk_file(entry, index, len(raw))
        listed = listed_chunk_crc(entry, index)
        return decode_chunk(raw, entry.layout, self.chunk_where(entry, index), listed)

    def _chunk_tasks(self, requests: Sequence[_Request], checksums: _DeviceChecksums) -> Iterator[ChunkTask]:
        """One task per chunk, made lazily: a chunk that several requests overlap (the boxes
        of one flat range, neighbouring shards) is read and checked once and copied into each,
        by the task of the first request that needs it."""
        by_path: dict[str, list[_Request]] = {}
        for request in requests:
            by_path.setdefault(request.entry.path, []).append(request)
        seen: dict[str, int] = {}
        for request in requests:
            entry = request.entry
            same = by_path[entry.path]
            if len(same) == 1:
                for index in entry.layout.chunks_overlapping(request.bounds):
                    yield entry, self._chunk_task(request.target(index), checksums)
                continue
            position = seen[entry.path] = seen.get(entry.path, -1) + 1
            for index in entry.layout.chunks_overlapping(request.bounds):
                region = entry.layout.chunk_region(index)
                if any(_overlaps(other.bounds, region) for other in same[:position]):
                    continue  # read by an earlier request's task
                group = [other.target(index) for other in same[position:] if _overlaps(other.bounds, region)]
                if len(group) == 1:
                    yield entry, self._chunk_task(group[0], checksums)
                else:
                    yield entry, self._shared_chunk_task(group)

    def _chunk_task(self, target: ReadTarget, checksums: _DeviceChecksums) -> Callable[[], None]:
        """Read in place where the chunk's bytes are one contiguous run of the destination."""
        layout = target.entry.layout
        inner, _ = target.overlap()
        part = target.part()
        plain = not (part.is_conj() or part.is_neg()) and (target.copies is None or part.device.type != "cpu")
        if (
            plain
            and inner == layout.chunk_region(target.index)
            and layout.zstd_level is None
            and prefix_elements(layout, target.index) is not None
            and part.is_contiguous()
        ):
            if self._direct([target]):
                return partial(self._read_direct_in_place, target.entry, target.index, part, checksums)
            return partial(self._read_in_place, target.entry, target.index, part, target.copies)
        return self._shared_chunk_task([target])

    def _direct(self, targets: list[ReadTarget]) -> bool:
        """Whether the chunk of ``targets`` goes straight from its file to GPU memory: GPU-direct
        reads, an uncompressed chunk, and every destination a plain tensor on one GPU."""
        devices = {t.dst.device for t in targets}
        return (
            self.gpu_direct
            and targets[0].entry.layout.zstd_level is None
            and len(devices) == 1
            and next(iter(devices)).type == "cuda"
            and not any(t.dst.is_conj() or t.dst.is_neg() for t in targets)
        )

    def _read_in_place(
        self, entry: ArrayEntry, index: ChunkIndex, part: torch.Tensor, copies: _DeviceCopies | None
    ) -> None:
        """Stream a raw chunk into ``part`` (its data, contiguous): block by block, each block
        checksummed as it arrives; on a device, each block through a staging buffer. The edge
        padding after the data goes through one small scratch buffer, then the CRC."""
        layout = entry.layout
        flat = part.reshape(-1).view(torch.uint8)
        nbytes = flat.numel()
        padding = layout.chunk_nbytes - nbytes

        def fill(size: int | None, read: ReadNext) -> None:
            self._check_chunk_file(entry, index, size)
            checksum = 0
            if copies is None:
                memory = flat.numpy().data
                for start in range(0, nbytes, BLOCK_BYTES):
                    block = memory[start : start + BLOCK_BYTES]
                    read(block)
                    checksum = crc32c.crc32c(block, checksum)
            else:
                stream = copies.stream(part.device)
                for start in range(0, nbytes, BLOCK_BYTES):
                    length = min(BLOCK_BYTES, nbytes - start)
                    with copies.pool.buffer(length, stream) as host:
                        block = host.numpy().data
                        read(block)
                        checksum = crc32c.crc32c(block, checksum)
                        copies.send(flat[start : start + length], host, stream)
            check_crc(
                *_read_tail(read, padding, checksum),
                self.chunk_where(entry, index),
                listed_chunk_crc(entry, index),
            )

        self.storage.read_into(f"{entry.path}/{chunk_key(index)}", 0, fill)

    def _read_direct_in_place(
        self, entry: ArrayEntry, index: ChunkIndex, part: torch.Tensor, checksums: _DeviceChecksums
    ) -> None:
        """Read a raw chunk's data straight into ``part`` (contiguous, on a GPU) and, while it
        lands, the edge padding after it and the CRC through host memory; the data is left to
        ``checksums``, checked on the GPU with the pass's other chunks before the pass returns."""
        flat = part.reshape(-1).view(torch.uint8)
        padding = entry.layout.chunk_nbytes - flat.numel()

        def fill(size: int | None, read: ReadNext) -> None:
            self._check_chunk_file(entry, index, size)
            read(flat)
            padding_crc, stored = _read_tail(read, padding, 0)
            where = self.chunk_where(entry, index)
            listed = listed_chunk_crc(entry, index)
            checksums.add(_DeviceChecksums.Pending(flat, padding_crc, padding, stored, where, listed))

        self.storage.read_into(f"{entry.path}/{chunk_key(index)}", 0, fill)

    def _read_direct_shared(self, targets: list[ReadTarget]) -> None:
        """Read a raw chunk whole into GPU memory, checksum it there, then copy each target's
        part out of it on the device."""
        entry, index = targets[0].entry, targets[0].index
        layout = entry.layout
        stream = thread_stream(targets[0].dst.device)
        with torch.cuda.stream(stream):
            scratch = torch.empty(layout.chunk_nbytes, dtype=torch.uint8, device=stream.device)
            stored: list[bytes] = []  # the CRC, read beside the data

            def fill(size: int | None, read: ReadNext) -> None:
                self._check_chunk_file(entry, index, size)
                read(scratch)
                stored.append(_read_tail(read, 0, 0)[1])

            self.storage.read_into(f"{entry.path}/{chunk_key(index)}", 0, fill)
            where = self.chunk_where(entry, index)
            check_crc(device_crc32c(scratch), stored[0], where, listed_chunk_crc(entry, index))
            decoded = scratch.view(layout.dtype.torch_dtype).reshape(layout.chunk_shape)
            region = layout.chunk_region(index)
            for target in targets:
                inner, _ = target.overlap()
                target.part().copy_(decoded[within(inner, region)])
        stream.synchronize()  # the destinations are complete when the read returns

    def _shared_chunk_task(self, targets: list[ReadTarget]) -> Callable[[], None]:
        """Read the chunk whole, then copy each target's part out of it."""
        if self._direct(targets):
            return partial(self._read_direct_shared, targets)

        def gathered() -> None:
            decoded = self.read_chunk(targets[0].entry, targets[0].index)
            for target in targets:
                target.fill_from(decoded)

        return gathered

    # -- whole subtrees ---------------------------------------------------------------------

    def subtree(self, prefix: str | Key) -> list[Entry]:
        """The entries stored at ``prefix`` or below it, in state-dict order."""
        if self._subtrees is None:  # built once: a load asks for one subtree per template key
            tree = PathTree()
            for index, path in enumerate(self._by_path):
                tree.add(path, index)
            self._subtrees = tree
        node = self._subtrees.find(self._path(prefix))
        if node is None:
            return []
        entries = self.manifest.entries
        return [entries[i] for i in node.items]

    def __repr__(self) -> str:
        return (
            f"<tessera.Checkpoint {self.storage.location} "
            f"format {self.manifest.format_version}, {len(self)} keys>"
        )
