"""The read engine of one open checkpoint: requests checked against the manifest, then one
parallel pass that reads every chunk they need (each once) and checks each array's own
``zarr.json`` on the way (spec R5.10).

Who calls: :class:`tessera.Checkpoint` (the user's handle) for its reads, ``tessera.verify`` for
its chunk and array checks, and loading together (:mod:`tessera.distributed.shared_reads`),
which builds its own chunk tasks and runs them through :meth:`ReadEngine.run_reads`.

Call order of a read: :meth:`ReadEngine.requests` (in the thread that asked: checks each
request, readies the devices about to receive), then :meth:`ReadEngine.fill` (the pass: chunk
tasks chosen by :class:`~.read_strategies.ReadStrategies`, run on the I/O threads), which
returns once every copy to a device has landed. A read that fails raises before it returns,
having possibly written part of its destinations (the chunks read before the failure was
found): after a failed read, a destination holds nothing meaningful (R6.6).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import KeyMismatchError, TensorMismatchError
from ..format.keys import Key, key_to_path
from ..format.limits import DEFAULT_LIMITS, ReaderLimits
from ..format.manifest import Entry, Manifest, ValueEntry
from ..storage.base import Storage
from ..util.parallel import default_read_threads, run_all
from ..util.progress import Progress
from .array_checks import ArrayChecks, ArrayEntry, ChunkTask
from .chunk_reads import ChunkFiles
from .chunk_tasks import chunk_tasks
from .device_copies import DeviceCopies
from .gpu.crc_batch import CrcBatch
from .gpu.direct_io import direct_read_threads
from .read_strategies import ReadStrategies
from .read_targets import ReadRequest, ReadTarget
from .regions import Region, bounds_of
from .staging import shared_pool

__all__ = ["ReadEngine", "ReadRequestSpec", "key_path"]

ReadRequestSpec = tuple[str | Key, torch.Tensor, Region]
"""A user's read request: the key, the destination, and the region of the array it receives."""


def key_path(key: str | Key) -> str:
    """A key as the path the manifest lists it under."""
    return key if isinstance(key, str) else key_to_path(key)


class ReadEngine:
    """Reads the arrays of one committed checkpoint (its manifest already validated).

    ``threads`` is the pass's I/O threads (default: as many as suit the host, four times that
    where the storage has device I/O: GPU-direct reads are mostly waiting, see
    :func:`~.gpu.direct_io.direct_read_threads`; else the storage's
    :attr:`~tessera.storage.base.Storage.concurrency`, where it has one)."""

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
        self.limits = limits
        if threads is None and storage.device_io is not None:
            threads = direct_read_threads()
        if threads is None:
            threads = storage.concurrency
        self.threads = threads
        self.by_path: dict[str, Entry] = {e.path: e for e in manifest.entries}
        self.files = ChunkFiles(storage)
        self.checks = ArrayChecks(storage, limits)
        self._copies = DeviceCopies(shared_pool())

    @property
    def gpu_direct(self) -> bool:
        """Whether chunks for GPU destinations are read straight into device memory (the storage
        has device I/O); else they come through pinned host buffers."""
        return self.storage.device_io is not None

    def entry(self, key: str | Key) -> Entry:
        path = key_path(key)
        try:
            return self.by_path[path]
        except KeyError:
            raise KeyMismatchError(f"{self.storage.location} has no key {path!r}") from None

    def array_entry(self, key: str | Key) -> ArrayEntry:
        """The entry of the array at ``key``; its own ``zarr.json`` is checked when it is read."""
        entry = self.entry(key)
        if isinstance(entry, ValueEntry):
            raise TensorMismatchError(f"{entry.path} is a JSON value, not an array; use value()")
        return entry

    def requests(self, requests: Sequence[ReadRequestSpec]) -> list[ReadRequest]:
        """Each request checked against the manifest, its destination viewed with the region's
        shape; devices about to receive reads are made ready for them. Call in the thread that
        asked for the read (it may still be using the destinations on its CUDA stream)."""
        checked: list[ReadRequest] = []
        devices: set[torch.device] = set()
        for key, out, region in requests:
            entry = self.array_entry(key)
            path = entry.path
            bounds, dropped = bounds_of(region, entry.layout.shape, path)
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
            checked.append(ReadRequest(entry, bounds, dst, copies))
        for device in devices:
            if self.gpu_direct and device.type == "cuda":
                # Device I/O writes device memory outside any stream: whatever the caller queued
                # that still uses the destinations must be done first.
                torch.cuda.current_stream(device).synchronize()
            self._copies.begin(device)
        return checked

    def targets_of(self, requests: Sequence[ReadRequestSpec]) -> list[ReadTarget]:
        """The chunks each request needs, after checking the request against the manifest (the
        arrays' own ``zarr.json`` are checked when their chunks are read)."""
        return [
            request.target(index)
            for request in self.requests(requests)
            for index in request.entry.layout.chunks_overlapping(request.bounds)
        ]

    def fill(
        self,
        requests: Sequence[ReadRequest],
        arrays: Iterable[ArrayEntry] = (),
        *,
        progress: bool = False,
        label: str = "reading",
    ) -> None:
        """Read every chunk the requests need (each chunk once) and fill them, checking the
        ``zarr.json`` of their arrays and of ``arrays`` in the same parallel pass; with
        ``progress``, a bar on stderr counts the bytes filled."""
        batch = CrcBatch() if self.gpu_direct else None
        strategies = ReadStrategies(self.files, batch)
        with Progress(sum(r.nbytes for r in requests), label, progress) as bar:
            self.run_reads(chunk_tasks(requests, strategies, bar), arrays, batch=batch)

    def run_reads(
        self,
        tasks: Iterable[ChunkTask],
        arrays: Iterable[ArrayEntry] = (),
        threads: int | None = None,
        batch: CrcBatch | None = None,
    ) -> None:
        """Run chunk reads on the I/O threads, each array's first checking the array's own
        ``zarr.json`` against the manifest (spec R5.10) unless this engine did already.

        ``tasks`` is consumed lazily, as threads free up, so that a pass over millions of
        chunks holds only the tasks in flight and stops at the first failure. Each check is a
        task of the same pass, queued as many tasks ahead of its array's first chunk as there
        are threads, so that it has usually finished when the chunk is due; a chunk that comes
        first runs it itself (no chunk is read before its array checked, and no task waits for
        a task not yet started). The zarr.json of ``arrays`` without chunks to read are
        checked too. Returns once every copy to a device landed and every chunk that the tasks
        read straight into GPU memory (and left to ``batch``) passed its CRC; raises the
        first failure, destinations possibly partly written.
        """
        workers = threads or self.threads or default_read_threads()
        try:
            run_all(self.checks.gated(tasks, arrays, workers), workers)
            if batch is not None:
                batch.run()
        finally:
            self.wait_for_copies()

    def wait_for_copies(self) -> None:
        """Return once every asynchronous copy into a device destination has landed."""
        self._copies.wait()

    def close(self) -> None:
        """Release what the engine holds: its CUDA streams (after their copies landed) and the
        record of checked arrays."""
        self._copies.close()
        self.checks.clear()
