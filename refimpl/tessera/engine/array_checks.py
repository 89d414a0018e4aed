"""Each array's own ``zarr.json`` checked against the manifest before any of its chunks is read
(spec R5.10), once per handle, on the I/O threads of the read pass itself.

The check of an array is a task of the same parallel pass as its chunk reads, queued a few tasks
ahead of the array's first chunk, rather than all checks serially before any read; each chunk
read still waits for its array's check (through a :class:`Gate`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial

from ..errors import InconsistentCheckpointError
from ..format.limits import ReaderLimits
from ..format.manifest import ObjectEntry, TensorEntry
from ..format.schemas import validate
from ..format.strict_json import loads
from ..storage.base import FileMissingError, Storage
from .root import check_not_deleted

__all__ = ["ArrayChecks", "ArrayEntry", "ChunkTask", "Gate"]

ArrayEntry = TensorEntry | ObjectEntry
ChunkTask = tuple[ArrayEntry, Callable[[], None]]
"""A task that reads one chunk, and the array the chunk belongs to."""


class Gate:
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


class ArrayChecks:
    """The arrays of one handle whose ``zarr.json`` passed, and the check itself."""

    def __init__(self, storage: Storage, limits: ReaderLimits) -> None:
        self._storage = storage
        self._limits = limits
        self._checked: set[str] = set()
        self._accepted_documents: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()

    def check(self, entry: ArrayEntry) -> None:
        """Check the array's own ``zarr.json`` against the manifest, once per handle."""
        path = entry.path
        if path in self._checked:
            return
        where = f"{self._storage.location}/{path}/zarr.json"
        try:
            data = self._storage.read_file(f"{path}/zarr.json", self._limits.max_json_bytes)
        except FileMissingError:
            check_not_deleted(self._storage, f"{path}/zarr.json")
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
            self._checked.add(path)

    def gated(
        self, tasks: Iterable[ChunkTask], arrays: Iterable[ArrayEntry], ahead: int
    ) -> Iterator[Callable[[], None]]:
        """The pass's tasks in order: each chunk read behind its array's check, each check
        ``ahead`` tasks before the array's first chunk read; then the checks of ``arrays``
        that have no chunk to read."""
        gates: dict[str, Gate] = {}
        window: deque[Callable[[], None]] = deque()
        for entry, task in tasks:
            path = entry.path
            if path not in self._checked:
                gate = gates.get(path)
                if gate is None:
                    gate = gates[path] = Gate(partial(self.check, entry))
                    yield gate.check
                task = partial(gate.run, task)
            window.append(task)
            if len(window) > ahead:
                yield window.popleft()
        yield from window
        for entry in arrays:
            if entry.path not in gates and entry.path not in self._checked:
                gates[entry.path] = Gate(partial(self.check, entry))
                yield gates[entry.path].check

    def clear(self) -> None:
        """Forget every check (a closed handle holds nothing)."""
        with self._lock:
            self._checked.clear()
            self._accepted_documents.clear()
