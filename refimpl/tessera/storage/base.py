"""The storage interface: where a checkpoint's files live, and the guarantees the commit needs.

Call order of a save (one writer; the distributed writer keeps it per rank):

1. ``claim(doc)``: exclusive creation of the claim file; fails if any other
   save claimed or committed the path (spec §9).
2. ``write_file(path, buffers)``: each chunk and ``zarr.json``, once each,
   possibly from many threads. The buffers may be a lazy iterable (a chunk's
   checksum is computed as its bytes are written); a file need not be durable
   when the call returns, so a medium can batch the flushes. A buffer may be
   a CUDA tensor where the storage was given a :class:`DeviceIO` (GPU-direct
   I/O): its bytes go from device memory to the file.
3. ``sync()``: every file written and every directory created is durable.
4. ``publish_root(data, save_id)``: the root ``zarr.json``, first-wins; its
   presence is the commit (spec §9).

If the save fails after step 1, the coordinator calls
``remove_unpublished(save_id)`` once every rank has stopped writing (R9.7).

Readers call only ``read_file``, ``read_into``, ``size`` and ``list``. Each
opens its file without blocking and reads only a regular file inside the
checkpoint, whose size it learns from the open file before reading: a FIFO, a
device node, a socket, a symbolic link, a path that resolves outside the root
and a name too long for the medium are ``InvalidKeyError`` (spec R11.3), a
directory where a file should be is no file. Readers open each file once:
``read_file`` for a whole small document, ``read_into`` to learn a chunk's
size and then stream its bytes into the caller's buffers, block by block
(into a CUDA tensor too, given a :class:`DeviceIO`). Every ``path`` is
relative to the checkpoint root, ``/``-separated, and checked by
:func:`check_relative_path` before it reaches the medium.

Run directories (spec §10; :class:`~tessera.RunDirectory` is the only caller)
need a few more operations, on the storage of the run's root: ``child(name)``
gives the storage of one step, which a save then uses as above; ``kind`` and
``entries`` look at entries without following a link; ``lock`` takes the
run's lock (``None``: while ``latest`` moves) or a step's lock (a marker entry
beside the step, R10.9); ``read_file`` and ``replace_file`` read and move the
``latest`` pointer (under the run's lock); ``remove_checkpoint`` deletes a
step, its root ``zarr.json`` first. Call order of a save into a run (the
coordinator): ``lock(".step-N.lock", create=True)``, ``kind``/``entries`` of the
step (and ``remove_checkpoint`` of a dead save's leftover there, R10.11), the save on
``child("step-N")``; then ``lock(None)``, ``read_file("latest")``,
``replace_file("latest", ...)``, release; then retention: ``entries()``, and per
doomed step ``lock(marker)``, ``remove_checkpoint``, release. A storage that
cannot hold run directories leaves these methods as they are here: each raises
:class:`StorageError` saying so.
"""

from __future__ import annotations

import builtins
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Literal, Protocol

import torch

from ..errors import InvalidKeyError, StorageError

__all__ = [
    "Buffer",
    "DeviceIO",
    "EntryKind",
    "Lock",
    "FileMissingError",
    "claim_names",
    "PendingRead",
    "ReadNext",
    "Storage",
    "check_relative_path",
    "ROOT_METADATA",
    "CLAIM_FILE",
]

Buffer = bytes | bytearray | memoryview | torch.Tensor
"""Bytes to write: host memory, or a contiguous CUDA tensor (only where the storage has a
:class:`DeviceIO`)."""

ROOT_METADATA = "zarr.json"
CLAIM_FILE = ".tessera-claim.json"

ReadNext = Callable[[memoryview | torch.Tensor], None]
"""Fills a whole buffer (host memory, or a contiguous CUDA tensor where the storage has a
:class:`DeviceIO`) with an open file's next bytes; a file that ends first is an error.

A CUDA tensor's read may still be landing when the call returns (the next host read then runs
beside it); it has landed, and a short read has raised, when ``read_into`` returns."""

PendingRead = Callable[[], int]
"""Waits for a read that :meth:`DeviceIO.start_read` started; the bytes read."""


class DeviceIO(Protocol):
    """Moves bytes between an open file and GPU memory with no host copy the caller sees
    (GPU-direct I/O); the storage opens, checks and syncs the files, this only moves bytes."""

    def write(self, fd: int, offset: int, data: torch.Tensor) -> None:
        """Write all bytes of ``data`` (contiguous, on a CUDA device) at ``offset``."""

    def start_read(self, fd: int, offset: int, out: torch.Tensor) -> PendingRead:
        """Start filling ``out`` (contiguous, on a CUDA device) from ``offset``; the returned
        function waits for it and gives the bytes read, fewer (or an ``OSError``) where the
        file ends first. The caller keeps ``fd`` open, and calls it, before it returns."""


EntryKind = Literal["file", "dir", "link", "other"]
"""What an entry is: a regular file, a real directory (or prefix), a symbolic link (never
followed), or anything else (a FIFO, a device, a socket)."""


class Lock(ABC):
    """An exclusive lock :meth:`Storage.lock` took; the holder releases it exactly once."""

    created: bool = False
    """Whether taking the lock made its marker (there was none before). A marker that was there
    and whose lock could be taken was left by a holder that is gone: a run directory removes
    the uncommitted step it marks (R10.11, R10.12), so this must be exact."""

    @abstractmethod
    def release(self, *, keep_marker: bool = False) -> None:
        """Unlock. A named lock's marker is removed first (so no one locks a marker about to
        vanish), unless ``keep_marker``: then it stays, unlocked, for :meth:`Storage.lock`
        with ``create=False`` to find (R10.10 marks leftovers this way)."""


class FileMissingError(StorageError, FileNotFoundError):
    """A read found no file at the path (nothing there, or a directory): the caller says
    what that means (a missing chunk, an incomplete checkpoint). A ``FileNotFoundError``, the
    class a storage built on the file system would meet anyway."""


def claim_names(storage: Storage, save_id: str) -> bool:
    """Whether ``storage`` holds a claim (R9.3) whose ``save_id`` is ``save_id``: the first
    condition under which ``remove_unpublished`` may delete anything (R9.7). A missing or
    unreadable claim names no save."""
    try:
        claim = json.loads(storage.read_file(CLAIM_FILE, 1 << 16))
    except (FileMissingError, ValueError):
        return False
    return isinstance(claim, dict) and claim.get("save_id") == save_id


def check_relative_path(path: str) -> str:
    """Refuse any path that could leave the checkpoint root (spec §11)."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise InvalidKeyError(f"path {path!r} is not a plain relative path inside the checkpoint")
    return path


class Storage(ABC):
    """One checkpoint's location on some medium (a directory, an object-store prefix)."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the checkpoint lives, as shown in messages."""

    @property
    def device_io(self) -> DeviceIO | None:
        """How this storage moves bytes between its files and GPU memory, if it can (GPU-direct
        I/O): then ``write_file`` and ``read_into`` take CUDA tensors too."""
        return None

    @property
    def concurrency(self) -> int | None:
        """How many requests in flight suit this medium, where the engine's defaults (sized for a
        local disk: a few per core) do not: an object store is latency-bound, so it wants many
        more. The save and load engines use it as their thread count when the caller set none;
        ``None``: the defaults."""
        return None

    @abstractmethod
    def claim(self, doc: bytes) -> None:
        """Create the claim file exclusively; raise ``CheckpointExistsError`` if taken."""

    @abstractmethod
    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        """Create ``path`` (never overwrite) with the buffers' bytes, consumed in order."""

    @abstractmethod
    def sync(self) -> None:
        """Make every file written and every directory created by ``write_file`` durable."""

    @abstractmethod
    def publish_root(self, data: bytes, save_id: str) -> None:
        """Publish the root ``zarr.json``: first-wins, durable; raise if a rival won."""

    @abstractmethod
    def remove_unpublished(self, save_id: str) -> None:
        """Remove what the save ``save_id`` wrote, claim last, if it still holds the claim and
        never committed; never anything of a committed checkpoint or of another save (R9.7)."""

    @abstractmethod
    def size(self, path: str) -> int | None:
        """Byte size of ``path``, or ``None`` when it does not exist."""

    @abstractmethod
    def read_file(self, path: str, max_bytes: int) -> bytes:
        """The whole file, opened once; raise ``LimitExceededError`` beyond ``max_bytes``
        (before reading) and :class:`FileMissingError` where no file is."""

    @abstractmethod
    def read_into(self, path: str, offset: int, fill: Callable[[int | None, ReadNext], None]) -> None:
        """Open ``path`` once and call ``fill(size, read)`` while it is open.

        ``size`` is the file's size in bytes, or ``None`` where no file is (``read`` must
        then not be called). Each ``read(buffer)`` fills ``buffer`` with the file's next
        bytes, the first from ``offset``, as one request, so that ``fill`` can check the
        size before reading anything and work on each block (checksum it, copy it on)
        while the next one is not yet asked for. Whatever ``fill`` raises propagates.
        """

    @abstractmethod
    def list(self, path: str) -> list[str]:
        """Names directly under the directory (or prefix) ``path``; ``""`` is the root."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether anything is at the location at all."""

    def present(self) -> bool:
        """Whether the location itself is there, even holding nothing: a local empty directory
        (or a file where the directory should be) is; an object store has no empty prefix, so
        by default this is :meth:`exists`. The CLI tells "nothing here" from "empty" by it."""
        return self.exists()

    def listed_sizes(self) -> dict[str, int] | None:
        """Every file under the location (its path here) with its size, where one listing
        gives them all (an object store's, a page per 1,000 objects); ``None`` where it does
        not, and the caller asks :meth:`size` of each file it needs, as the default does."""
        return None

    def stored_bytes(self) -> int:
        """Bytes of every file under the location, as the medium counts them (links not
        followed): :meth:`listed_sizes` where there is a listing, else a walk of :meth:`list`
        and :meth:`size`, one call per file; a storage that can do better overrides it."""
        listed = self.listed_sizes()
        return sum(listed.values()) if listed is not None else _stored_bytes(self, "")

    # -- run directories (optional: the defaults refuse) -------------------------------------

    def child(self, name: str) -> Storage:
        """The storage of the directory (or prefix) ``name`` under this one; nothing is created
        until the child is written to. Device I/O carries over."""
        raise self._no_run_directories()

    def kind(self, path: str) -> EntryKind | None:
        """What is at ``path`` (a link is ``"link"``, never followed); ``None`` where nothing is."""
        raise self._no_run_directories()

    def entries(self, path: str = "") -> builtins.list[tuple[str, EntryKind]]:
        """Each name directly under ``path`` (``""``: the root) with its kind; ``[]`` where
        there is no directory."""
        raise self._no_run_directories()

    def replace_file(self, path: str, data: bytes) -> None:
        """Replace the small file ``path`` durably and atomically: a reader sees the old bytes or
        the new ones, never a mix; a link at ``path`` is replaced, never followed. The caller
        holds ``lock(None)``, which lets this remove what a call that died left (R10.3, R10.8)."""
        raise self._no_run_directories()

    def lock(self, path: str | None, *, create: bool, wait: float) -> Lock | None:
        """An exclusive lock between processes, or ``None`` if another holder kept it ``wait``
        seconds (or, without ``create``, if there is no marker at ``path``).

        ``None`` locks the storage's root itself (which must exist) and leaves nothing behind;
        a ``path`` locks one name, marked by an entry at ``path`` (a dot-name, so listings skip
        it) that exists while the lock is held, and afterwards if released with
        ``keep_marker``. ``create`` makes the marker, and the root, where they are missing.
        """
        raise self._no_run_directories()

    def remove_checkpoint(self, path: str) -> None:
        """Delete the checkpoint directory ``path``: its root ``zarr.json`` first, durably, then
        the rest, so a deletion cut short leaves an uncommitted checkpoint (R10.6). Never
        through a link; entries that vanish meanwhile (another deleter) are no error."""
        raise self._no_run_directories()

    def _no_run_directories(self) -> StorageError:
        return StorageError(
            f"{type(self).__name__} at {self.location} cannot hold a run directory (it implements "
            "no child/kind/entries/replace_file/lock/remove_checkpoint); save checkpoints by path"
        )


def _stored_bytes(storage: Storage, prefix: str) -> int:
    total = 0
    for name in storage.list(prefix):
        path = f"{prefix}/{name}" if prefix else name
        size = storage.size(path)
        total += _stored_bytes(storage, path) if size is None else size
    return total
