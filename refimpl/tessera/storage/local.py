"""POSIX directory storage: durable writes, first-wins commit, no escape from the root.

Why each step (spec §9): zarr-python's ``LocalStore`` renames atomically but
never fsyncs, so a power loss can publish a root whose chunks are gone; here
every file and every new directory is fsynced before the root appears. The
fsyncs are batched: each file is written, its writeback started
(:mod:`.writeback`) and closed; ``sync`` then fsyncs all of them at once, from
several threads, so the disk is never idle waiting for one file's flush.
The root is published with ``os.link`` of a synced temporary file, which
fails if ``zarr.json`` exists, where ``os.replace`` would silently overwrite
a rival's commit.

Given a :class:`~.base.DeviceIO`, it writes CUDA tensors' bytes into the files it
opened, and reads file bytes into CUDA tensors, straight from and to device memory.

Reads open every file through one helper, :class:`~.posix.SafeOpener`:
``O_NOFOLLOW`` and a check that its directory resolves inside the root, so
neither ``..`` nor a symlink leads out; ``O_NONBLOCK``, so that a FIFO or a
device node where a file should be cannot block the open; then ``fstat`` on
the descriptor, so that only a regular file is ever read, and its size is
known (and checked against the reader's bound) before its first byte is
(spec R11.3).
"""

from __future__ import annotations

import builtins
import errno
import os
import threading
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch

from ..errors import (
    CheckpointExistsError,
    InvalidKeyError,
    LimitExceededError,
    StorageError,
)
from ..util.parallel import run_all
from .base import (
    CLAIM_FILE,
    ROOT_METADATA,
    Buffer,
    DeviceIO,
    EntryKind,
    FileMissingError,
    Lock,
    PendingRead,
    ReadNext,
    Storage,
    check_relative_path,
    claim_names,
)
from .posix import (
    FileLock,
    SafeOpener,
    empty_then_remove,
    entry_kind,
    fsync_dir,
    fsync_file,
    lock_directory,
    mode_kind,
    os_errors,
    remove_tree_root_first,
    replace_file,
    too_long,
)
from .writeback import start_writeback

__all__ = ["LocalStorage"]


def _wait_for(pending: list[tuple[PendingRead, int]]) -> tuple[BaseException | None, bool]:
    """Wait for every started device read: the first that failed, and whether one came short."""
    error, short = None, False
    for wait, nbytes in pending:
        try:
            short = short or wait() != nbytes
        except Exception as exc:  # noqa: BLE001 - kept to raise once every read landed
            error = error or exc
    return error, short


class LocalStorage(Storage):
    """A checkpoint in a local (or POSIX network) directory."""

    def __init__(self, root: str | os.PathLike[str], device_io: DeviceIO | None = None) -> None:
        self._root = Path(root).absolute()
        self._device_io = device_io
        self._unsynced_files: list[Path] = []
        self._created_dirs: set[Path] = set()
        self._written_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._files = SafeOpener(self._root)

    @property
    def location(self) -> str:
        return str(self._root)

    @property
    def device_io(self) -> DeviceIO | None:
        return self._device_io

    # -- writing ---------------------------------------------------------------------------

    def claim(self, doc: bytes) -> None:
        with os_errors(f"cannot create checkpoint directory {self._root}"):
            missing = [p for p in (self._root, *self._root.parents) if not p.exists()]
            self._root.mkdir(parents=True, exist_ok=True)
        if not missing:
            leftover = [n for n in os.listdir(self._root) if n != CLAIM_FILE]
            if ROOT_METADATA in leftover:
                raise CheckpointExistsError(
                    f"{self._root} already holds a committed checkpoint; "
                    "save to a new path (checkpoints are never overwritten)"
                )
            if leftover and CLAIM_FILE not in os.listdir(self._root):
                raise CheckpointExistsError(
                    f"{self._root} exists and is not empty ({sorted(leftover)[:5]}); "
                    "save into a new or empty directory"
                )
        claim = self._root / CLAIM_FILE
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise CheckpointExistsError(
                f"{self._root} was already claimed by another save ({CLAIM_FILE} exists) and "
                "two writers never share a path; if that save died uncommitted, delete the directory"
            ) from None
        except OSError as exc:
            with os_errors(f"cannot claim {claim}"):
                raise exc
        with os_errors(f"cannot write {claim}"):
            try:
                self._write_all(fd, [doc])
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self._root)
            # New directories are only durable once their parents' entries are.
            for new in missing:
                fsync_dir(new.parent)

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        target = self._write(path, buffers, durable=False)
        with self._lock:
            self._unsynced_files.append(target)
            self._written_dirs.add(target.parent)

    def _write(self, path: str, buffers: Iterable[Buffer], *, durable: bool) -> Path:
        """Create ``path`` exclusively with the buffers' bytes; fsync it now, or start its writeback."""
        target = self._root / check_relative_path(path)
        self._make_parents(target.parent)
        with os_errors(f"cannot write {target}"):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                self._write_all(fd, buffers)
                if durable:
                    os.fsync(fd)
                else:
                    start_writeback(fd)
            finally:
                os.close(fd)
        return target

    def _make_parents(self, directory: Path) -> None:
        with os_errors(f"cannot create directory {directory}"):
            if directory.is_dir():
                return
            new = [p for p in (directory, *directory.parents) if not p.exists()]
            directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._created_dirs.update(new)

    def _write_all(self, fd: int, buffers: Iterable[Buffer]) -> None:
        for buffer in buffers:
            if isinstance(buffer, torch.Tensor):
                position = os.lseek(fd, 0, os.SEEK_CUR)
                self._device(buffer).write(fd, position, buffer)
                os.lseek(fd, position + buffer.numel() * buffer.element_size(), os.SEEK_SET)
                continue
            view = memoryview(buffer).cast("B")
            while view:
                written = os.write(fd, view)
                view = view[written:]

    def sync(self) -> None:
        with self._lock:
            files, self._unsynced_files = self._unsynced_files, []
            created, self._created_dirs = self._created_dirs, set()
            written, self._written_dirs = self._written_dirs, set()
        # fsync acts on the file, not on the descriptor: one opened now flushes what the closed
        # one wrote (and, since Linux 4.13, reports a writeback error no descriptor has seen).
        run_all([partial(fsync_file, f) for f in files])
        # A file's entry lives in its directory and a directory's in its parent. The directory
        # of every file written here is synced even if another rank created it (spec R16.14).
        directories = {d.parent for d in created} | created | written
        run_all([partial(fsync_dir, d) for d in directories])

    def publish_root(self, data: bytes, save_id: str) -> None:
        temporary = f"{ROOT_METADATA}.{save_id}.tmp"
        self._write(temporary, [data], durable=True)
        final = self._root / ROOT_METADATA
        try:
            os.link(self._root / temporary, final)
        except FileExistsError:
            raise CheckpointExistsError(
                f"{final} appeared during the save: another writer committed first"
            ) from None
        except OSError as exc:
            with os_errors(f"cannot publish {final}"):
                raise exc
        finally:
            with os_errors(f"cannot remove {temporary}"):
                os.unlink(self._root / temporary)
        with os_errors(f"cannot sync {self._root}"):
            fsync_dir(self._root)

    def remove_unpublished(self, save_id: str) -> None:
        """Every entry but the claim first, the claim last (so the directory stays claimed until
        it is empty), then the directory itself if it can be removed; all through a descriptor of
        the root, never following a link. Nothing happens unless the claim is a regular file
        naming ``save_id`` and no root ``zarr.json`` exists."""
        if not claim_names(self, save_id):
            return
        if self.kind(ROOT_METADATA) is not None:
            return
        empty_then_remove(self._root, keep_last=CLAIM_FILE)

    # -- run directories -------------------------------------------------------------------

    def child(self, name: str) -> LocalStorage:
        return LocalStorage(self._root / check_relative_path(name), device_io=self._device_io)

    def kind(self, path: str) -> EntryKind | None:
        return entry_kind(self._root / check_relative_path(path))

    def entries(self, path: str = "") -> builtins.list[tuple[str, EntryKind]]:
        directory = self._root / check_relative_path(path) if path else self._root
        try:
            with os.scandir(directory) as found:
                return [(e.name, mode_kind(e.stat(follow_symlinks=False).st_mode)) for e in found]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            with os_errors(f"cannot list {directory}"):
                raise exc
            raise

    def replace_file(self, path: str, data: bytes) -> None:
        target = self._root / check_relative_path(path)
        replace_file(target.parent, target.name, data)

    def lock(self, path: str | None, *, create: bool, wait: float) -> Lock | None:
        if path is None:
            return lock_directory(self._root, wait)
        target = self._root / check_relative_path(path)
        if create:
            self._make_parents(target.parent)
        lock = FileLock(target)
        return lock if lock.acquire(create=create, wait=wait) else None

    def remove_checkpoint(self, path: str) -> None:
        target = self._root / check_relative_path(path)
        remove_tree_root_first(target.parent, target.name)

    # -- reading ---------------------------------------------------------------------------

    def present(self) -> bool:
        return os.path.lexists(self._root)

    def stored_bytes(self) -> int:
        """Every regular file's size by ``lstat`` (links not followed); files that vanish
        meanwhile are not counted."""
        total = 0
        for directory, _, files in os.walk(self._root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(directory, name)).st_size
                except FileNotFoundError:
                    continue
        return total

    def exists(self) -> bool:
        """Whether the root is a directory (or a link to one) holding anything; ``stat`` and
        ``listdir`` only, so a FIFO or device at the root cannot block it."""
        try:
            with os.scandir(self._root) as entries:
                return any(True for _ in entries)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except ValueError:  # a NUL byte in the path: no file system names it
            raise InvalidKeyError(f"{self._root!r} cannot be a checkpoint path (a NUL byte)") from None
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
                where = str(self._root)[:200]
                raise InvalidKeyError(f"{where} cannot be a checkpoint: {exc.strerror}") from None
            with os_errors(f"cannot open {self._root}"):
                raise exc
            raise

    def size(self, path: str) -> int | None:
        with os_errors(f"cannot open {self._root / path}"):
            opened = self._files.open_file(path)
        if opened is None:
            return None
        os.close(opened[0])
        return opened[1]

    def read_file(self, path: str, max_bytes: int) -> bytes:
        with os_errors(f"cannot read {self._root / path}"):
            opened = self._files.open_file(path)
            if opened is None:
                raise FileMissingError(f"cannot read {self._root / path}: no such file")
            fd, size = opened
            try:
                if size > max_bytes:
                    raise LimitExceededError(
                        f"{self._root / path} is {size} bytes, over the limit of {max_bytes}"
                    )
                data = os.pread(fd, size, 0)  # into the bytes object returned: no copy
                while len(data) < size:
                    more = os.pread(fd, size - len(data), len(data))
                    if not more:
                        raise StorageError(f"{self._root / path} ended early (truncated file)")
                    data += more
                return data
            finally:
                os.close(fd)

    def read_into(self, path: str, offset: int, fill: Callable[[int | None, ReadNext], None]) -> None:
        with os_errors(f"cannot read {self._root / path}"):
            opened = self._files.open_file(path)
            if opened is None:
                fill(None, self._no_file(path))
                return
            fd, size = opened
            position = offset
            # Device reads run beside the host reads after them (a chunk's CRC behind its data)
            # and are waited for before the file closes, whatever ``fill`` did.
            pending: list[tuple[PendingRead, int]] = []

            def read(out: memoryview | torch.Tensor) -> None:
                nonlocal position
                if isinstance(out, torch.Tensor):
                    nbytes = out.numel() * out.element_size()
                    pending.append((self._device(out).start_read(fd, position, out), nbytes))
                    position += nbytes
                else:
                    self._read_exact(fd, position, out, path)
                    position += out.nbytes

            try:
                fill(size, read)
            finally:
                error, short = _wait_for(pending)
                os.close(fd)
            if error is not None:
                raise error
            if short:
                raise StorageError(f"{self._root / path} ended early (truncated file)")

    def _device(self, buffer: torch.Tensor) -> DeviceIO:
        if self._device_io is None or buffer.device.type != "cuda" or not buffer.is_contiguous():
            raise TypeError("a tensor buffer needs a storage with device I/O and a contiguous CUDA tensor")
        return self._device_io

    def _no_file(self, path: str) -> ReadNext:
        def read(out: memoryview | torch.Tensor) -> None:
            raise FileMissingError(f"cannot read {self._root / path}: no such file")

        return read

    def _read_exact(self, fd: int, offset: int, out: memoryview, path: str) -> None:
        view = out.cast("B")
        while view:
            got = os.preadv(fd, [view], offset)
            if got == 0:
                raise StorageError(f"{self._root / path} ended early (truncated file)")
            view = view[got:]
            offset += got

    def list(self, path: str) -> list[str]:
        directory = self._root / check_relative_path(path) if path else self._root
        try:
            self._files.check_inside(str(directory), path)
            return sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise too_long(path) from None
            with os_errors(f"cannot list {directory}"):
                raise exc
            raise
