"""The file operations of a run directory (spec §10), each safe against what the directory may hold.

A run directory is shared: several processes save into it, an operator or a
tool may have left anything in it (a FIFO, a device, a symlink to a private
key or to another run's checkpoint). So every operation here opens without
following symlinks or blocking, checks the kind of file before reading it,
reads with a small bound, and acts on directory entries through file
descriptors, so that nothing outside the run directory is ever read,
followed or deleted. Concurrency rests on two advisory locks (``flock``):
the run directory itself while ``latest`` moves, and one ``.<step>.lock``
file per step while a process saves or deletes that step (R10.8, R10.9).

This module has a private bounded reader (:func:`read_small`); the reader's
safe-open helper in ``storage/local.py`` does the same for checkpoint files,
and the two may become one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidKeyError, StorageError
from .base import CLAIM_FILE, ROOT_METADATA

__all__ = [
    "POINTER_MAX_BYTES",
    "LOCK_WAIT_SECONDS",
    "StepLock",
    "entry_kind",
    "is_committed",
    "latest_lock",
    "lock_name",
    "read_small",
    "remove_stale_pointer_files",
    "remove_step",
    "remove_unpublished",
    "replace_pointer",
]

POINTER_MAX_BYTES = 256
"""``latest`` holds one short name (R10.2); anything longer is refused unread."""

LOCK_WAIT_SECONDS = 60.0
"""How long a process waits for the ``latest`` lock, held by others only for one small write."""

_OPEN_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def _io_error(what: str, exc: OSError) -> StorageError:
    return StorageError(f"{what}: {exc.strerror or exc}")


def read_small(path: Path, limit: int, what: str) -> bytes | None:
    """The bytes of the regular file ``path`` if it holds at most ``limit``; ``None`` if it is absent.

    Never follows a symlink, never blocks on a FIFO or a device (R10.2), never
    reads more than ``limit + 1`` bytes, and never puts the file's content in
    an error: a file that is not a regular one, or too long, is
    :class:`~tessera.InvalidKeyError` naming only the path.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot look at {what} {path}: {_reason(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidKeyError(f"{what} {path} is {_kind(info.st_mode)}, not a regular file; remove it")
    if info.st_size > limit:
        raise InvalidKeyError(f"{what} {path} holds {info.st_size} bytes, more than {limit}; remove it")
    try:
        fd = os.open(path, _OPEN_READ)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidKeyError(f"{what} {path} is a symbolic link; remove it") from None
        raise StorageError(f"cannot open {what} {path}: {_reason(exc)}") from None
    try:
        # Between the lstat and the open the name may have been swapped: check what was opened.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidKeyError(f"{what} {path} is not a regular file; remove it")
        data = os.read(fd, limit + 1)
    except OSError as exc:
        raise StorageError(f"cannot read {what} {path}: {_reason(exc)}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidKeyError(f"{what} {path} holds more than {limit} bytes; remove it")
    return data


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def entry_kind(path: Path) -> str | None:
    """``"dir"`` for a real directory, ``"link"`` for a symlink, ``"other"``, or ``None`` if absent."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot look at {path}: {_reason(exc)}") from None
    if stat.S_ISDIR(mode):
        return "dir"
    return "link" if stat.S_ISLNK(mode) else "other"


def is_committed(checkpoint: Path) -> bool:
    """Whether the real directory ``checkpoint`` holds a root ``zarr.json`` that is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(checkpoint / ROOT_METADATA).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot look at {checkpoint / ROOT_METADATA}: {_reason(exc)}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_pointer(root: Path, name: str) -> None:
    """Write ``name`` to ``latest`` as R10.3 says: a temporary dot-file, fsync, rename, fsync.

    The temporary name is unique to this call (pid and a random part), so two
    processes never write into each other's temporary file; it is removed if
    anything fails before the rename.
    """
    temporary = root / f".latest.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            data = (name + "\n").encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, root / "latest")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(root)


def remove_stale_pointer_files(root: Path) -> None:
    """Remove ``.latest.*.tmp`` files of processes that died while moving ``latest``.

    Call only while holding :func:`latest_lock`: temporary pointer files are written
    under that lock, so any one seen then belongs to a process that is gone.
    """
    try:
        names = [n for n in os.listdir(root) if n.startswith(".latest.") and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(root / name)


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
            raise _io_error(f"cannot lock {what}", exc) from None


@contextlib.contextmanager
def latest_lock(root: Path) -> Iterator[None]:
    """Hold the run directory's lock (``flock`` on the directory itself) while ``latest`` moves.

    Reading ``latest``, comparing steps and replacing it is then one step for
    every process that moves it (R10.8), with no extra file to leave behind.
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _io_error(f"cannot open run directory {root}", exc) from None
    try:
        if not _flock(fd, f"run directory {root}", LOCK_WAIT_SECONDS):
            raise StorageError(
                f"run directory {root} stayed locked for {LOCK_WAIT_SECONDS:.0f} s by another process "
                "moving 'latest'; check for a hung process"
            )
        yield
    finally:
        os.close(fd)


def lock_name(step_name: str) -> str:
    """``.step-00000100.lock``: a dot-file, so listings skip it (R10.5)."""
    return f".{step_name}.lock"


class StepLock:
    """The lock a process holds on one step while it saves or deletes it (R10.9).

    A lock file ``.<step>.lock`` is created and ``flock``-ed; on release it is
    removed, then unlocked. A lock taken on a file that another process has
    meanwhile removed is worthless, so :meth:`acquire` checks that the name
    still leads to the locked file and starts over if not.
    """

    def __init__(self, root: Path, step_name: str) -> None:
        self.path = root / lock_name(step_name)
        self._fd: int | None = None
        self._created = False

    def exists(self) -> bool:
        """Whether a lock file is present (a save or deletion ran here through a run directory)."""
        return entry_kind(self.path) is not None

    def acquire(self, *, create: bool) -> bool:
        """Take the lock without waiting; ``False`` if another process holds it (or, without
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
                    raise _io_error(f"cannot create lock file {self.path}", exc) from None
            except OSError as exc:
                raise _io_error(f"cannot open lock file {self.path}", exc) from None
            try:
                if not _flock(fd, str(self.path), 0.0):
                    os.close(fd)
                    return False
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                self._fd, self._created = fd, created
                return True
            os.close(fd)  # removed or replaced after we opened it: its lock guards nothing
            if not create:
                return False
        raise StorageError(f"lock file {self.path} keeps being replaced; check for a misbehaving process")

    def release(self, *, touched: bool) -> None:
        """Unlock; remove the lock file first, unless it marks an uncommitted leftover.

        ``touched``: whether this holder changed the step's directory (saved or deleted
        into it). The lock file stays beside an uncommitted directory that this holder
        touched, or that was already marked (the file existed): it marks a leftover of a
        save or deletion made through a run directory, which retention may remove once no
        one holds the lock (R10.10). An unmarked directory this holder did not touch (a
        plain save's, maybe live) stays unmarked. Removing before unlocking means no one
        can lock a file about to vanish unseen.
        """
        if self._fd is None:
            return
        step = self.path.parent / self.path.name[1 : -len(".lock")]
        try:
            leftover = entry_kind(step) == "dir" and not is_committed(step)
        except StorageError:
            leftover = True
        if not leftover or (self._created and not touched):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def remove_step(root: Path, name: str) -> None:
    """Delete the real directory ``root/name``, its root ``zarr.json`` first (R10.6).

    Works through a descriptor of ``root``: a name that is (or has become) a
    symlink is never followed, and entries already gone (another process
    deleting too) are not an error. Raises ``OSError`` on any other failure.
    """
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

        _rmtree(name, root_fd)
    finally:
        os.close(root_fd)


def _rmtree(name: str, root_fd: int) -> None:
    """``shutil.rmtree`` relative to ``root_fd``, tolerating entries that vanish meanwhile."""

    def on_error(
        function: object, path: str, info: tuple[type[BaseException], BaseException, object]
    ) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    shutil.rmtree(name, dir_fd=root_fd, onerror=on_error)


def _claim_id(claim: bytes) -> object:
    try:
        doc = json.loads(claim)
    except ValueError:
        return None
    return doc.get("save_id") if isinstance(doc, dict) else None


def remove_unpublished(root: Path, save_id: str) -> None:
    """Remove what the save ``save_id`` wrote at ``root``, if it holds the claim and never committed.

    Called by the coordinator of a save that failed after claiming (R9.7), once
    every rank has stopped writing. Deletes nothing of a committed checkpoint
    or of another save: the claim must be a regular file naming ``save_id`` and
    no root ``zarr.json`` may exist. Every entry but the claim goes first, the
    claim last (so the directory stays claimed until it is empty), then the
    directory itself if it can be removed. Raises ``OSError`` or
    :class:`~tessera.TesseraError` if it cannot finish.
    """
    claim = read_small(root / CLAIM_FILE, 1 << 16, "claim file")
    if claim is None or _claim_id(claim) != save_id or entry_kind(root / ROOT_METADATA) is not None:
        return
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for entry in os.listdir(root_fd):
            if entry == CLAIM_FILE:
                continue
            if stat.S_ISDIR(os.lstat(entry, dir_fd=root_fd).st_mode):
                _rmtree(entry, root_fd)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=root_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(CLAIM_FILE, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    with contextlib.suppress(OSError):  # a mount point or a directory someone wrote into stays
        os.rmdir(root)
