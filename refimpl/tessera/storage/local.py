"""POSIX directory storage: durable writes, first-wins commit, no escape from the root.

Why each step (spec §9): zarr-python's ``LocalStore`` renames atomically but
never fsyncs, so a power loss can publish a root whose chunks are gone; here
every file is fsynced when written and every new directory before the root
appears. The root is published with ``os.link`` of a synced temporary file,
which fails if ``zarr.json`` exists, where ``os.replace`` would silently
overwrite a rival's commit.

Reads open every file with ``O_NOFOLLOW`` and check that its directory
resolves inside the root, so neither ``..`` nor a symlink leads out.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import (
    CheckpointExistsError,
    InvalidKeyError,
    LimitExceededError,
    StorageError,
)
from .base import CLAIM_FILE, ROOT_METADATA, Buffer, Storage, check_relative_path

__all__ = ["LocalStorage"]


@contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """Turn an ``OSError`` into a :class:`StorageError` that names the file and the cause."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            hint = "the disk is full"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            hint = "permission denied"
        else:
            hint = exc.strerror or str(exc)
        raise StorageError(f"{what}: {hint}") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """A checkpoint in a local (or POSIX network) directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).absolute()
        self._created_dirs: set[Path] = set()
        self._written_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._real_root: Path | None = None

    @property
    def location(self) -> str:
        return str(self._root)

    # -- writing ---------------------------------------------------------------------------

    def claim(self, doc: bytes) -> None:
        with _os_errors(f"cannot create checkpoint directory {self._root}"):
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
            with _os_errors(f"cannot claim {claim}"):
                raise exc
        with _os_errors(f"cannot write {claim}"):
            try:
                self._write_all(fd, [doc])
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self._root)
            # New directories are only durable once their parents' entries are.
            for new in missing:
                _fsync_dir(new.parent)

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        target = self._root / check_relative_path(path)
        self._make_parents(target.parent)
        with _os_errors(f"cannot write {target}"):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                self._write_all(fd, buffers)
                os.fsync(fd)
            finally:
                os.close(fd)
        with self._lock:
            self._written_dirs.add(target.parent)

    def _make_parents(self, directory: Path) -> None:
        if directory.is_dir():
            return
        with _os_errors(f"cannot create directory {directory}"):
            new = [p for p in (directory, *directory.parents) if not p.exists()]
            directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._created_dirs.update(new)

    @staticmethod
    def _write_all(fd: int, buffers: Sequence[Buffer]) -> None:
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            while view:
                written = os.write(fd, view)
                view = view[written:]

    def sync(self) -> None:
        with self._lock:
            created, self._created_dirs = self._created_dirs, set()
            written, self._written_dirs = self._written_dirs, set()
        # A file's entry lives in its directory and a directory's in its parent. The directory
        # of every file written here is synced even if another rank created it (spec R16.14).
        with _os_errors(f"cannot sync directories under {self._root}"):
            directories = {d.parent for d in created} | created | written
            for directory in sorted(directories, key=lambda p: -len(p.parts)):
                _fsync_dir(directory)

    def publish_root(self, data: bytes, save_id: str) -> None:
        temporary = f"{ROOT_METADATA}.{save_id}.tmp"
        self.write_file(temporary, [data])
        final = self._root / ROOT_METADATA
        try:
            os.link(self._root / temporary, final)
        except FileExistsError:
            raise CheckpointExistsError(
                f"{final} appeared during the save: another writer committed first"
            ) from None
        except OSError as exc:
            with _os_errors(f"cannot publish {final}"):
                raise exc
        finally:
            with _os_errors(f"cannot remove {temporary}"):
                os.unlink(self._root / temporary)
        with _os_errors(f"cannot sync {self._root}"):
            _fsync_dir(self._root)

    # -- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        return self._root.is_dir() and any(self._root.iterdir())

    def _open(self, path: str) -> int:
        target = self._root / check_relative_path(path)
        self._check_inside(target.parent, path)
        try:
            return os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidKeyError(f"{target} is a symbolic link; refused") from None
            raise

    def _check_inside(self, directory: Path, path: str) -> None:
        if self._real_root is None:
            self._real_root = self._root.resolve()
        real = directory.resolve()
        if real != self._real_root and self._real_root not in real.parents:
            raise InvalidKeyError(f"{path!r} resolves outside the checkpoint at {self._root}")

    def size(self, path: str) -> int | None:
        try:
            fd = self._open(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            with _os_errors(f"cannot open {self._root / path}"):
                raise exc
        try:
            status = os.fstat(fd)
        finally:
            os.close(fd)
        # A directory where a file should be (an emptied chunk folder) is no file at all.
        return status.st_size if stat.S_ISREG(status.st_mode) else None

    def read_file(self, path: str, max_bytes: int) -> bytes:
        with _os_errors(f"cannot read {self._root / path}"):
            fd = self._open(path)
            try:
                size = os.fstat(fd).st_size
                if size > max_bytes:
                    raise LimitExceededError(
                        f"{self._root / path} is {size} bytes, over the limit of {max_bytes}"
                    )
                out = bytearray(size)
                self._read_exact(fd, 0, memoryview(out), path)
                return bytes(out)
            finally:
                os.close(fd)

    def read_into(self, path: str, offset: int, outs: Sequence[memoryview]) -> None:
        with _os_errors(f"cannot read {self._root / path}"):
            fd = self._open(path)
            try:
                for out in outs:
                    self._read_exact(fd, offset, out, path)
                    offset += out.nbytes
            finally:
                os.close(fd)

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
            return sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            with _os_errors(f"cannot list {directory}"):
                raise exc
            raise
