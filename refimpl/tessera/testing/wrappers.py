"""Storages that wrap another one: the forwarding base, and one that records every call.

They are real :class:`~tessera.storage.base.Storage` implementations, passed to the API
(``tessera.save(state, RecordingStorage(LocalStorage(path)))``) where a test would otherwise
patch ``os`` or a storage class: the code under test runs unchanged, and the fault is one a
real medium can produce (a full disk, a lost race, a power cut, a truncated file).

Children (:meth:`Storage.child`, the steps of a run directory) are wrapped the same way and
share the parent's log and faults, so a run directory's steps are watched too.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..storage.base import Buffer, DeviceIO, EntryKind, Lock, ReadNext, Storage

__all__ = ["Call", "RecordingStorage", "StorageWrapper"]


class StorageWrapper(Storage):
    """Forwards every call to ``inner``; subclasses override what they watch or change.

    :meth:`child` wraps the inner storage's child with :meth:`wrap`, which a subclass
    overrides so that the child shares its state.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    def wrap(self, inner: Storage) -> StorageWrapper:
        """The wrapper of a child storage (by default, a plain forwarder)."""
        return StorageWrapper(inner)

    @property
    def location(self) -> str:
        return self.inner.location

    @property
    def device_io(self) -> DeviceIO | None:
        return self.inner.device_io

    @property
    def concurrency(self) -> int | None:
        return self.inner.concurrency

    def claim(self, doc: bytes) -> None:
        self.inner.claim(doc)

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        self.inner.write_file(path, buffers)

    def sync(self) -> None:
        self.inner.sync()

    def publish_root(self, data: bytes, save_id: str) -> None:
        self.inner.publish_root(data, save_id)

    def remove_unpublished(self, save_id: str) -> None:
        self.inner.remove_unpublished(save_id)

    def size(self, path: str) -> int | None:
        return self.inner.size(path)

    def read_file(self, path: str, max_bytes: int) -> bytes:
        return self.inner.read_file(path, max_bytes)

    def read_into(self, path: str, offset: int, fill: Callable[[int | None, ReadNext], None]) -> None:
        self.inner.read_into(path, offset, fill)

    def list(self, path: str) -> builtins.list[str]:
        return self.inner.list(path)

    def exists(self) -> bool:
        return self.inner.exists()

    def present(self) -> bool:
        return self.inner.present()

    def listed_sizes(self) -> dict[str, int] | None:
        return self.inner.listed_sizes()

    def stored_bytes(self) -> int:
        return self.inner.stored_bytes()

    def child(self, name: str) -> Storage:
        return self.wrap(self.inner.child(name))

    def kind(self, path: str) -> EntryKind | None:
        return self.inner.kind(path)

    def entries(self, path: str = "") -> builtins.list[tuple[str, EntryKind]]:
        return self.inner.entries(path)

    def replace_file(self, path: str, data: bytes) -> None:
        self.inner.replace_file(path, data)

    def lock(self, path: str | None, *, create: bool, wait: float) -> Lock | None:
        return self.inner.lock(path, create=create, wait=wait)

    def remove_checkpoint(self, path: str) -> None:
        self.inner.remove_checkpoint(path)


@dataclass(frozen=True, slots=True)
class Call:
    """One call a :class:`RecordingStorage` saw, in the order the calls began."""

    op: str
    """The method: ``claim``, ``write_file``, ``sync``, ``publish_root``, ``read_into``, ..."""
    location: str
    """The storage's location (a run directory's step has its own)."""
    path: str | None = None
    """The path the call named, if any (``publish_root``: ``zarr.json``)."""
    data: bytes | None = None
    """The bytes written, for every write (host buffers only; ``None`` for a CUDA buffer)."""
    thread: int = 0
    """``threading.get_ident()`` of the caller."""


@dataclass
class _Log:
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RecordingStorage(StorageWrapper):
    """Records every call (method, path, bytes written, thread) in :attr:`calls`, then forwards it."""

    def __init__(self, inner: Storage, *, _log: _Log | None = None) -> None:
        super().__init__(inner)
        self._log = _log or _Log()

    @property
    def calls(self) -> builtins.list[Call]:
        """Every call so far, of this storage and its children, in order (a copy)."""
        with self._log.lock:
            return builtins.list(self._log.calls)

    def ops(self, *names: str) -> builtins.list[Call]:
        """The calls of the methods ``names`` (all of them where none is given)."""
        return [c for c in self.calls if not names or c.op in names]

    def clear(self) -> None:
        with self._log.lock:
            self._log.calls.clear()

    def wrap(self, inner: Storage) -> RecordingStorage:
        return RecordingStorage(inner, _log=self._log)

    def _record(self, op: str, path: str | None = None, data: bytes | None = None) -> None:
        with self._log.lock:
            self._log.calls.append(Call(op, self.inner.location, path, data, threading.get_ident()))

    def claim(self, doc: bytes) -> None:
        self._record("claim", None, bytes(doc))
        super().claim(doc)

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        seen: builtins.list[Buffer] = []

        def watched() -> Iterator[Buffer]:
            for buffer in buffers:
                seen.append(
                    buffer if isinstance(buffer, torch.Tensor) else bytes(memoryview(buffer).cast("B"))
                )
                yield buffer

        super().write_file(path, watched())
        host = [b for b in seen if not isinstance(b, torch.Tensor)]
        self._record("write_file", path, b"".join(host) if len(host) == len(seen) else None)

    def sync(self) -> None:
        self._record("sync")
        super().sync()

    def publish_root(self, data: bytes, save_id: str) -> None:
        self._record("publish_root", "zarr.json", bytes(data))
        super().publish_root(data, save_id)

    def remove_unpublished(self, save_id: str) -> None:
        self._record("remove_unpublished")
        super().remove_unpublished(save_id)

    def size(self, path: str) -> int | None:
        self._record("size", path)
        return super().size(path)

    def read_file(self, path: str, max_bytes: int) -> bytes:
        self._record("read_file", path)
        return super().read_file(path, max_bytes)

    def read_into(self, path: str, offset: int, fill: Callable[[int | None, ReadNext], None]) -> None:
        self._record("read_into", path)
        super().read_into(path, offset, fill)

    def list(self, path: str) -> builtins.list[str]:
        self._record("list", path)
        return super().list(path)

    def replace_file(self, path: str, data: bytes) -> None:
        self._record("replace_file", path, bytes(data))
        super().replace_file(path, data)

    def lock(self, path: str | None, *, create: bool, wait: float) -> Lock | None:
        self._record("lock", path)
        return super().lock(path, create=create, wait=wait)

    def remove_checkpoint(self, path: str) -> None:
        self._record("remove_checkpoint", path)
        super().remove_checkpoint(path)
