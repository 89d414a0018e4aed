"""The POSIX operations :class:`~.local.LocalStorage` is built from, each safe in a directory
that may hold anything (a FIFO, a device, a symlink to a private key or to another run).

Nothing here follows a symbolic link or blocks on a special file: entries are
looked at with ``lstat``, files opened with ``O_NOFOLLOW | O_NONBLOCK``, trees
deleted through directory descriptors. Durability is ``fsync`` of the file,
then of the directory holding its entry. Locks are ``flock`` (advisory, per
open file): of a directory itself, or of a lock file whose name must still
lead to the locked file once the lock is taken (R10.8, R10.9).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidKeyError, StorageError, TesseraError
from .base import ROOT_METADATA, EntryKind, Lock, check_relative_path

__all__ = [
    "FileLock",
    "SafeOpener",
    "empty_then_remove",
    "entry_kind",
    "fsync_dir",
    "fsync_file",
    "mode_kind",
    "lock_directory",
    "os_errors",
    "remove_tree",
    "remove_tree_root_first",
    "replace_file",
    "too_long",
]


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Turn an ``OSError`` into a :class:`StorageError` that names the file and the cause.

    Tessera's own errors pass unchanged: several are ``OSError`` s themselves (a missing file, a
    storage failure already named)."""
    try:
        yield
    except TesseraError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            hint = "the disk is full"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            hint = "permission denied"
        else:
            hint = exc.strerror or str(exc)
        raise StorageError(f"{what}: {hint}") from exc


def fsync_dir(path: Path | str) -> None:
    """Make the entries of directory ``path`` durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def fsync_file(path: Path | str) -> None:
    """Make what was written to ``path`` durable (fsync acts on the file, not the descriptor)."""
    _fsync(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _fsync(path: Path | str, flags: int) -> None:
    with os_errors(f"cannot make {path} durable"):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def entry_kind(path: Path) -> EntryKind | None:
    """What is at ``path``, by ``lstat`` (a symlink is ``"link"``, never followed); ``None`` if nothing."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot look at {path}: {_reason(exc)}") from None
    return mode_kind(mode)


def mode_kind(mode: int) -> EntryKind:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "link" if stat.S_ISLNK(mode) else "other"


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def replace_file(directory: Path, name: str, data: bytes) -> None:
    """Replace ``directory/name`` with ``data``: a temporary dot-file, fsync, rename, fsync (R10.3).

    The temporary name is unique to this call (pid and a random part), so two processes never
    write into each other's temporary file; it is removed if anything fails before the rename.
    Temporary files of the same name left by a process that died are removed first: the caller
    holds the directory's lock (:func:`lock_directory`), under which every such file is written.
    """
    prefix = f".{name}."
    with contextlib.suppress(OSError):
        for stale in os.listdir(directory):
            if stale.startswith(prefix) and stale.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(directory / stale)
    temporary = directory / f"{prefix}{os.getpid()}.{uuid.uuid4().hex}.tmp"
    with os_errors(f"cannot replace {directory / name}"):
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        fsync_dir(directory)


def _flock(fd: int, what: str, wait: float) -> bool:
    """Take ``fd``'s exclusive lock, waiting up to ``wait`` seconds; whether it was taken."""
    import fcntl

    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        except OSError as exc:
            raise StorageError(f"cannot lock {what}: {_reason(exc)}") from None


class _DirectoryLock(Lock):
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self, *, keep_marker: bool = False) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_directory(directory: Path, wait: float) -> Lock | None:
    """``flock`` on the directory itself: no file to leave behind; ``None`` if still held after ``wait``."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"cannot open directory {directory}: {_reason(exc)}") from None
    try:
        taken = _flock(fd, f"directory {directory}", wait)
    except BaseException:
        os.close(fd)
        raise
    if not taken:
        os.close(fd)
        return None
    return _DirectoryLock(fd)


class FileLock(Lock):
    """A lock file, created if asked and ``flock``-ed; released by removing it (unless kept), then
    unlocking, so that no one can lock a file about to vanish unseen.

    A lock taken on a file that another process has meanwhile removed is worthless, so
    :meth:`acquire` checks that the name still leads to the locked file and starts over if not.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, create: bool, wait: float) -> bool:
        """Take the lock; ``False`` if another process held it for ``wait`` seconds (or, without
        ``create``, if there is no lock file)."""
        base = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(100):
            created = False
            try:
                fd = os.open(self.path, base)
            except FileNotFoundError:
                if not create:
                    return False
                try:
                    fd = os.open(self.path, base | os.O_CREAT | os.O_EXCL, 0o644)
                    created = True
                except FileExistsError:
                    continue  # another process created it meanwhile: open that one
                except OSError as exc:
                    raise StorageError(f"cannot create lock file {self.path}: {_reason(exc)}") from None
            except OSError as exc:
                raise StorageError(f"cannot open lock file {self.path}: {_reason(exc)}") from None
            try:
                if not _flock(fd, str(self.path), wait):
                    os.close(fd)
                    return False
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                self._fd, self.created = fd, created
                return True
            os.close(fd)  # removed or replaced after we opened it: its lock guards nothing
            if not create:
                return False
        raise StorageError(f"lock file {self.path} keeps being replaced; check for a misbehaving process")

    def release(self, *, keep_marker: bool = False) -> None:
        if self._fd is None:
            return
        if not keep_marker:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def remove_tree_root_first(root: Path, name: str) -> None:
    """Delete the real directory ``root/name``, its root ``zarr.json`` first and durably (R10.6).

    Works through a descriptor of ``root``: a name that is (or has become) a symlink is never
    followed, and entries already gone (another process deleting too) are not an error.
    """
    with os_errors(f"cannot delete {root / name}"):
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                step_fd = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd
                )
            except FileNotFoundError:
                return
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ROOT_METADATA, dir_fd=step_fd)
                os.fsync(step_fd)  # the un-commit is durable before any chunk goes
            finally:
                os.close(step_fd)
            remove_tree(name, root_fd)
        finally:
            os.close(root_fd)


def remove_tree(name: str, dir_fd: int) -> None:
    """``shutil.rmtree`` relative to ``dir_fd`` (never through a symlink), tolerating entries
    that vanish meanwhile."""

    def on_error(
        function: object, path: str, info: tuple[type[BaseException], BaseException, object]
    ) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    shutil.rmtree(name, dir_fd=dir_fd, onerror=on_error)


def too_long(path: str) -> InvalidKeyError:
    return InvalidKeyError(f"{path[:80]!r}...: a name too long for the file system; refused (spec R11.3)")


class SafeOpener:
    """Opens files under ``root`` for reading, and nothing else (spec R11.3): ``O_NOFOLLOW``
    and a check that the file's directory resolves inside the root, so neither ``..`` nor a
    symlink leads out; ``O_NONBLOCK``, so a FIFO or a device node cannot block the open; then
    ``fstat`` on the descriptor, so only a regular file is read, its size known first."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._real_root: str | None = None
        # Directories known to resolve inside the root, as strings: a load checks one per file
        # it opens, and pathlib's objects cost more to build and hash than the check itself.
        self._inside: set[str] = {str(root)}

    def open(self, path: str) -> int:
        """A descriptor of ``path``, opened without following a final symbolic link and
        without blocking (a FIFO opens at once; what it is, the caller checks with fstat)."""
        target = os.path.join(self._root, check_relative_path(path))
        try:
            self.check_inside(os.path.dirname(target), path)
            return os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidKeyError(f"{target} is a symbolic link; refused") from None
            if exc.errno == errno.ENAMETOOLONG:
                self._check_root()
                raise too_long(path) from None
            if exc.errno == errno.ENXIO:  # a socket: no file to open
                raise InvalidKeyError(f"{target} is not a regular file (a socket); refused") from None
            raise

    def _check_root(self) -> None:
        """A root whose own name is too long is a wrong location (``io_error``), not a bad key."""
        try:
            os.lstat(self._root)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise StorageError(f"cannot open {str(self._root)[:200]}...: {exc.strerror}") from None

    def check_inside(self, directory: str, path: str) -> None:
        """Refuse a ``directory`` (under the root) that resolves outside the root.

        Resolving costs a system call per path component, and a load opens files in hundreds
        of directories: a directory whose parent lies inside lies inside too unless it is itself
        a symbolic link. So walk up to the nearest directory known to lie inside, one lstat per
        step, and resolve in full only a symbolic link met on the way.
        """
        inside = self._inside
        unknown: list[str] = []
        while directory not in inside:
            if os.path.islink(directory) or os.path.dirname(directory) == directory:
                if self._real_root is None:
                    self._real_root = os.path.realpath(self._root)
                real = os.path.realpath(directory)
                if real != self._real_root and not real.startswith(self._real_root.rstrip(os.sep) + os.sep):
                    raise InvalidKeyError(f"{path!r} resolves outside the checkpoint at {self._root}")
                unknown.append(directory)
                break
            unknown.append(directory)
            directory = os.path.dirname(directory)
        inside.update(unknown)

    def open_file(self, path: str) -> tuple[int, int] | None:
        """An open descriptor of the regular file at ``path`` and its size; ``None`` if there is none."""
        try:
            fd = self.open(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            status = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISDIR(status.st_mode):
            # A directory where a file should be (an emptied chunk folder) is no file at all.
            os.close(fd)
            return None
        if not stat.S_ISREG(status.st_mode):
            os.close(fd)
            kind = "a FIFO" if stat.S_ISFIFO(status.st_mode) else "a device or other special file"
            raise InvalidKeyError(
                f"{self._root / path} is {kind}, not a regular file; refused unread (spec R11.3)"
            )
        return fd, status.st_size


def empty_then_remove(root: Path, keep_last: str) -> None:
    """Remove every entry of the directory ``root`` but ``keep_last``, then ``keep_last``, then
    ``root`` itself if it can be; all through a descriptor of ``root``, never following a link,
    entries that vanish meanwhile being no error."""
    with os_errors(f"cannot remove what is in {root}"):
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for entry in os.listdir(root_fd):
                if entry == keep_last:
                    continue
                if stat.S_ISDIR(os.lstat(entry, dir_fd=root_fd).st_mode):
                    remove_tree(entry, root_fd)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry, dir_fd=root_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(keep_last, dir_fd=root_fd)
        finally:
            os.close(root_fd)
    with contextlib.suppress(OSError):  # a mount point or a directory someone wrote into stays
        os.rmdir(root)
