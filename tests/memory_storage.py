"""A storage written outside the package, as a user would write one: files in a dict.

It shows that the seam is open (``save``, ``load``, ``open``, ``verify``, ``RunDirectory`` and
the CLI run on it unchanged) and it is the third implementation the storage kit checks.
Several :class:`MemoryStorage` objects on one :class:`Medium` with the same location see the
same files, as processes sharing a bucket do; the medium's lock makes each operation atomic.
Everything is durable at once, so ``sync`` has nothing to do.
"""

from __future__ import annotations

import builtins
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tessera.errors import CheckpointExistsError, LimitExceededError, StorageError
from tessera.storage.base import (
    CLAIM_FILE,
    ROOT_METADATA,
    Buffer,
    EntryKind,
    FileMissingError,
    Lock,
    ReadNext,
    Storage,
    check_relative_path,
)
from tessera.storage.resolve import register_scheme

SCHEME = "mem"


@dataclass
class Medium:
    """Every file (full key to bytes), the directories made, and the locks held."""

    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def under(self, prefix: str) -> builtins.list[str]:
        return [k for k in self.files if k.startswith(prefix + "/")]


MEDIUM = Medium()
"""The medium ``mem://`` URLs resolve to in this process."""


def register() -> None:
    """Make ``mem://name`` a location everywhere (the API and the CLI)."""
    register_scheme(SCHEME, lambda url: MemoryStorage(MEDIUM, url.rstrip("/")))


class _MemoryLock(Lock):
    def __init__(self, storage: MemoryStorage, key: str, created: bool) -> None:
        self._storage, self._key, self.created = storage, key, created
        self._held = True

    def release(self, *, keep_marker: bool = False) -> None:
        medium = self._storage.medium
        with medium.lock:
            if not self._held:
                return
            self._held = False
            if not keep_marker:
                medium.files.pop(self._key, None)
            medium.held.discard(self._key)


class MemoryStorage(Storage):
    """A checkpoint (or run directory) at ``location`` on ``medium``."""

    def __init__(self, medium: Medium, location: str) -> None:
        self.medium = medium
        self._location = location

    @property
    def location(self) -> str:
        return self._location

    def _key(self, path: str) -> str:
        return f"{self._location}/{check_relative_path(path)}"

    def _make_dirs(self, key: str) -> None:
        parts = key.split("/")
        for i in range(len(parts) - 1, 2, -1):  # "mem:", "", "name", ...: never above the scheme
            self.medium.dirs.add("/".join(parts[:i]))

    def _is_dir(self, key: str) -> bool:
        return key in self.medium.dirs or bool(self.medium.under(key))

    # -- writing -----------------------------------------------------------------------------

    def claim(self, doc: bytes) -> None:
        with self.medium.lock:
            names = self._names(self._location)
            if ROOT_METADATA in names:
                raise CheckpointExistsError(f"{self._location} already holds a committed checkpoint")
            if CLAIM_FILE in names:
                raise CheckpointExistsError(f"{self._location} was already claimed by another save")
            if names:
                raise CheckpointExistsError(f"{self._location} is not empty; save to a new location")
            key = self._key(CLAIM_FILE)
            self._make_dirs(key)
            self.medium.files[key] = bytes(doc)

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        key = self._key(path)
        parts = []
        for buffer in buffers:
            if isinstance(buffer, torch.Tensor):
                raise TypeError("a memory storage has no device I/O: pass host buffers")
            parts.append(bytes(memoryview(buffer).cast("B")))
        with self.medium.lock:
            if key in self.medium.files or self._is_dir(key):
                raise StorageError(f"cannot write {key}: it exists (files are written once)")
            self._make_dirs(key)
            self.medium.files[key] = b"".join(parts)

    def sync(self) -> None:
        """Nothing to do: a write is durable once ``write_file`` returns."""

    def publish_root(self, data: bytes, save_id: str) -> None:
        key = self._key(ROOT_METADATA)
        with self.medium.lock:
            if key in self.medium.files:
                raise CheckpointExistsError(f"{key} appeared during the save: another writer committed first")
            self._make_dirs(key)
            self.medium.files[key] = bytes(data)

    def remove_unpublished(self, save_id: str) -> None:
        with self.medium.lock:
            claim = self.medium.files.get(self._key(CLAIM_FILE))
            try:
                owner = json.loads(claim).get("save_id") if claim is not None else None
            except (ValueError, AttributeError):
                owner = None
            if owner != save_id or self._key(ROOT_METADATA) in self.medium.files:
                return
            claim_key = self._key(CLAIM_FILE)
            for key in self.medium.under(self._location):
                if key != claim_key:
                    del self.medium.files[key]
            del self.medium.files[claim_key]
            self.medium.dirs = {d for d in self.medium.dirs if not self._inside(d)}

    def _inside(self, key: str) -> bool:
        return key == self._location or key.startswith(self._location + "/")

    # -- reading -----------------------------------------------------------------------------

    def size(self, path: str) -> int | None:
        data = self.medium.files.get(self._key(path))
        return None if data is None else len(data)

    def read_file(self, path: str, max_bytes: int) -> bytes:
        key = self._key(path)
        data = self.medium.files.get(key)
        if data is None:
            raise FileMissingError(f"cannot read {key}: no such file")
        if len(data) > max_bytes:
            raise LimitExceededError(f"{key} is {len(data)} bytes, over the limit of {max_bytes}")
        return data

    def read_into(self, path: str, offset: int, fill: Callable[[int | None, ReadNext], None]) -> None:
        key = self._key(path)
        data = self.medium.files.get(key)
        if data is None:

            def missing(out: memoryview | torch.Tensor) -> None:
                raise FileMissingError(f"cannot read {key}: no such file")

            fill(None, missing)
            return
        position = offset

        def read(out: memoryview | torch.Tensor) -> None:
            nonlocal position
            if isinstance(out, torch.Tensor):
                raise TypeError("a memory storage has no device I/O: read into host buffers")
            view = out.cast("B")
            if position + view.nbytes > len(data):
                raise StorageError(f"{key} ended early (truncated file)")
            view[:] = data[position : position + view.nbytes]
            position += view.nbytes

        fill(len(data), read)

    def _names(self, prefix: str) -> set[str]:
        start = len(prefix) + 1
        found = {k[start:].split("/", 1)[0] for k in self.medium.under(prefix)}
        found |= {d[start:].split("/", 1)[0] for d in self.medium.dirs if d.startswith(prefix + "/")}
        return found

    def list(self, path: str) -> builtins.list[str]:
        prefix = self._key(path) if path else self._location
        with self.medium.lock:
            return sorted(self._names(prefix))

    def exists(self) -> bool:
        with self.medium.lock:
            return bool(self._names(self._location))

    # -- run directories ---------------------------------------------------------------------

    def child(self, name: str) -> MemoryStorage:
        return MemoryStorage(self.medium, self._key(name))

    def kind(self, path: str) -> EntryKind | None:
        key = self._key(path)
        with self.medium.lock:
            if key in self.medium.files:
                return "file"
            return "dir" if self._is_dir(key) else None

    def entries(self, path: str = "") -> builtins.list[tuple[str, EntryKind]]:
        prefix = self._key(path) if path else self._location
        with self.medium.lock:
            return [
                (name, "file" if f"{prefix}/{name}" in self.medium.files else "dir")
                for name in sorted(self._names(prefix))
            ]

    def replace_file(self, path: str, data: bytes) -> None:
        key = self._key(path)
        with self.medium.lock:
            if self._is_dir(key):
                raise StorageError(f"cannot replace {key}: a directory is there")
            self._make_dirs(key)
            self.medium.files[key] = bytes(data)

    def lock(self, path: str | None, *, create: bool, wait: float) -> Lock | None:
        key = self._location + "/" if path is None else self._key(path)
        deadline = time.monotonic() + wait
        while True:
            with self.medium.lock:
                if path is None and not self._is_dir(self._location):
                    raise StorageError(f"cannot lock {self._location}: nothing is there")
                marked = path is None or key in self.medium.files
                if not marked and not create:
                    return None
                if key not in self.medium.held:
                    created = not marked
                    if created:
                        self._make_dirs(key)
                        self.medium.files[key] = b""
                    self.medium.held.add(key)
                    return _MemoryLock(self, key, created)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def remove_checkpoint(self, path: str) -> None:
        target = self.child(path)
        with self.medium.lock:
            self.medium.files.pop(target._key(ROOT_METADATA), None)  # the un-commit first (R10.6)
            for key in self.medium.under(target.location):
                del self.medium.files[key]
            self.medium.dirs = {d for d in self.medium.dirs if not target._inside(d)}
