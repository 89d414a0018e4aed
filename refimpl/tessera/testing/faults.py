"""A storage that makes chosen calls of another one fail the way a medium can (see
:class:`FaultyStorage`): a failed write, claim, sync or commit, a rival's commit or deletion,
a truncated file, and a power cut that loses what was never synced."""

from __future__ import annotations

import builtins
import fnmatch
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import StorageError
from ..storage.base import Buffer, ReadNext, Storage
from .wrappers import StorageWrapper

__all__ = ["CHUNKS", "Action", "FaultyStorage", "injected"]


def injected(what: str) -> StorageError:
    """The error a fault raises: an ``io_error`` naming the call (like a full disk would)."""
    return StorageError(f"{what}: the disk is full (injected fault)")


Action = Callable[[Storage, str], None]
"""What a fault does to the wrapped storage first: ``action(inner, path)``."""


CHUNKS = ("*/c/*", "*/c", "c/*", "c")
"""Globs matching every chunk file of a checkpoint (``c`` alone: a 0-d array's one chunk)."""


@dataclass
class _WriteRule:
    patterns: tuple[str, ...]
    nth: int | None
    torn: bool
    seen: int = 0

    def fails(self, path: str) -> bool:
        """Count ``path`` if it matches; whether this write is the one to fail."""
        if not any(fnmatch.fnmatchcase(path, p) for p in self.patterns):
            return False
        self.seen += 1
        return self.nth is None or self.seen == self.nth


@dataclass
class _Faults:
    lock: threading.Lock = field(default_factory=threading.Lock)
    write_rules: builtins.list[_WriteRule] = field(default_factory=builtins.list)
    fail_sync: bool = False
    fail_claim: bool = False
    fail_publish: bool = False
    before_publish: Action | None = None
    fail_replace: bool = False
    fail_remove: bool = False
    before_remove: Action | None = None
    short_reads: builtins.list[str] = field(default_factory=builtins.list)
    buffer_unsynced: bool = False
    pending: dict[str, builtins.list[tuple[str, bytes]]] = field(default_factory=dict)
    calls_left: int | None = None
    down: bool = False


class FaultyStorage(StorageWrapper):
    """Makes chosen calls of the wrapped storage fail the way a medium can.

    Configure it with its methods before use (each returns the storage, so they chain);
    children share the faults. An injected failure is a :class:`~tessera.StorageError`
    (``io_error``) whose message says ``injected fault``; what a rival does (a root that lands
    first, a deletion by another process) is done to the wrapped storage, so its own answer
    (``already_exists``, nothing to delete) is what the caller sees.
    """

    def __init__(self, inner: Storage, *, _faults: _Faults | None = None) -> None:
        super().__init__(inner)
        self._faults = _faults or _Faults()

    def wrap(self, inner: Storage) -> FaultyStorage:
        return FaultyStorage(inner, _faults=self._faults)

    # -- configuring -------------------------------------------------------------------------

    def fail_write(
        self, *, nth: int | None = None, matching: str | Sequence[str] = "*", torn: bool = False
    ) -> FaultyStorage:
        """Fail the ``nth`` ``write_file`` (1-based, counted over this storage and its children)
        whose path matches the glob ``matching`` (or one of them), or every such write where
        ``nth`` is None; ``CHUNKS`` matches chunk files. ``torn``: half of the file's bytes
        land before the failure (a write cut short)."""
        patterns = (matching,) if isinstance(matching, str) else tuple(matching)
        with self._faults.lock:
            self._faults.write_rules.append(_WriteRule(patterns, nth, torn))
        return self

    def fail_claim(self) -> FaultyStorage:
        """``claim`` fails (the directory cannot be created)."""
        self._faults.fail_claim = True
        return self

    def fail_sync(self) -> FaultyStorage:
        """``sync`` fails (an fsync reporting a writeback error)."""
        self._faults.fail_sync = True
        return self

    def fail_publish(self, before: Action | None = None) -> FaultyStorage:
        """``publish_root`` fails, after ``before(inner, "zarr.json")`` if given."""
        self._faults.fail_publish = True
        self._faults.before_publish = before
        return self

    def rival_publishes(self, root: bytes = b'{"rival": true}') -> FaultyStorage:
        """Another writer's root ``zarr.json`` lands just before ``publish_root``, which the
        wrapped storage must then refuse (first wins, R9.9)."""

        def land(inner: Storage, path: str) -> None:
            inner.write_file(path, [root])
            inner.sync()

        self._faults.before_publish = land
        return self

    def fail_replace(self) -> FaultyStorage:
        """``replace_file`` fails (a run directory's ``latest`` cannot move)."""
        self._faults.fail_replace = True
        return self

    def fail_remove(self, partial: Action | None = None) -> FaultyStorage:
        """``remove_checkpoint`` fails, after ``partial(inner, path)`` (how far it got) if given."""
        self._faults.fail_remove = True
        self._faults.before_remove = partial
        return self

    def before_remove(self, action: Action) -> FaultyStorage:
        """Run ``action(inner, path)`` before each ``remove_checkpoint`` (a rival deleting too)."""
        self._faults.before_remove = action
        return self

    def short_read(self, pattern: str) -> FaultyStorage:
        """Files whose path matches the glob ``pattern`` end early: reads past half their size
        fail as a truncated file does."""
        self._faults.short_reads.append(pattern)
        return self

    def lose_unsynced(self, *, power_cut_after: int | None = None) -> FaultyStorage:
        """Keep each ``write_file``'s bytes here until ``sync``: a :meth:`power_cut` then loses
        them, as a crash loses what was never made durable. ``power_cut_after``: the power goes
        by itself after that many further write-side calls (claim, write_file, sync,
        publish_root, remove_unpublished), that call failing."""
        self._faults.buffer_unsynced = True
        self._faults.calls_left = power_cut_after
        return self

    def power_cut(self) -> None:
        """Lose every write not yet synced; from now on every call fails (the machine is down)."""
        with self._faults.lock:
            self._faults.pending.clear()
            self._faults.down = True

    # -- the calls ---------------------------------------------------------------------------

    def _tick(self, what: str) -> None:
        """Count a write-side call towards a planned power cut; fail if the power is off."""
        faults = self._faults
        with faults.lock:
            if faults.calls_left is not None and not faults.down:
                if faults.calls_left == 0:
                    faults.pending.clear()
                    faults.down = True
                faults.calls_left -= 1
            if faults.down:
                raise StorageError(f"{what}: the power went off (injected fault)")

    def claim(self, doc: bytes) -> None:
        self._tick(f"cannot claim {self.location}")
        if self._faults.fail_claim:
            raise injected(f"cannot claim {self.location}")
        super().claim(doc)

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        faults = self._faults
        self._tick(f"cannot write {self.location}/{path}")
        with faults.lock:
            failing = [rule for rule in faults.write_rules if rule.fails(path)]
        if failing:
            if any(rule.torn for rule in failing):
                data = _host_bytes(buffers)
                super().write_file(path, [data[: len(data) // 2]])
            raise injected(f"cannot write {self.location}/{path}")
        if not faults.buffer_unsynced:
            super().write_file(path, buffers)
            return
        data = _host_bytes(buffers)
        with faults.lock:
            faults.pending.setdefault(self.location, []).append((path, data))

    def sync(self) -> None:
        self._tick(f"cannot make {self.location} durable")
        if self._faults.fail_sync:
            raise injected(f"cannot make {self.location} durable")
        with self._faults.lock:
            pending = self._faults.pending.pop(self.location, [])
        for path, data in pending:
            self.inner.write_file(path, [data])
        super().sync()

    def publish_root(self, data: bytes, save_id: str) -> None:
        self._tick(f"cannot publish {self.location}/zarr.json")
        if self._faults.before_publish is not None:
            self._faults.before_publish(self.inner, "zarr.json")
        if self._faults.fail_publish:
            raise injected(f"cannot publish {self.location}/zarr.json")
        super().publish_root(data, save_id)

    def remove_unpublished(self, save_id: str) -> None:
        self._tick(f"cannot remove the unfinished save at {self.location}")
        super().remove_unpublished(save_id)

    def replace_file(self, path: str, data: bytes) -> None:
        if self._faults.fail_replace:
            raise injected(f"cannot replace {self.location}/{path}")
        super().replace_file(path, data)

    def remove_checkpoint(self, path: str) -> None:
        if self._faults.before_remove is not None:
            self._faults.before_remove(self.inner, path)
        if self._faults.fail_remove:
            raise injected(f"cannot delete {self.location}/{path}")
        super().remove_checkpoint(path)

    def read_file(self, path: str, max_bytes: int) -> bytes:
        data = super().read_file(path, max_bytes)
        if self._short(path):
            raise StorageError(f"{self.location}/{path} ended early (truncated file, injected fault)")
        return data

    def read_into(self, path: str, offset: int, fill: Callable[[int | None, ReadNext], None]) -> None:
        if not self._short(path):
            super().read_into(path, offset, fill)
            return
        where = f"{self.location}/{path}"

        def short_fill(size: int | None, read: ReadNext) -> None:
            if size is None:
                fill(size, read)
                return
            budget = [max(size // 2 - offset, 0)]

            def short(out: memoryview | torch.Tensor) -> None:
                nbytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else out.nbytes
                if nbytes > budget[0]:
                    raise StorageError(f"{where} ended early (truncated file, injected fault)")
                budget[0] -= nbytes
                read(out)

            fill(size, short)

        super().read_into(path, offset, short_fill)

    def _short(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self._faults.short_reads)


def _host_bytes(buffers: Iterable[Buffer]) -> bytes:
    """A file's bytes, consumed from its buffers (CUDA tensors copied to the host)."""
    parts = []
    for buffer in buffers:
        if isinstance(buffer, torch.Tensor):
            parts.append(buffer.cpu().view(torch.uint8).numpy().tobytes())
        else:
            parts.append(bytes(memoryview(buffer).cast("B")))
    return b"".join(parts)
