"""The pieces of a run directory (spec §10) that act on its storage: the ``latest`` pointer, step
locks and the names; :class:`~tessera.api.run_dir.RunDirectory` composes them.

Every function takes the run root's :class:`~tessera.storage.base.Storage` and uses only its
run-directory operations (``kind``, ``read_file``, ``replace_file``, ``lock``).
"""

from __future__ import annotations

import re

from ..errors import InvalidKeyError, LimitExceededError, StorageError, TesseraError
from ..storage.base import ROOT_METADATA, EntryKind, FileMissingError, Lock, Storage

__all__ = [
    "LATEST",
    "LOCK_WAIT_SECONDS",
    "POINTER_MAX_BYTES",
    "STEP_NAME",
    "committed",
    "describe",
    "lock_name",
    "point_latest",
    "read_pointer",
    "read_pointer_quietly",
    "release_step",
    "step_of",
]

LATEST = "latest"
POINTER_MAX_BYTES = 256
"""``latest`` holds one short name (R10.2); anything longer is refused unread."""
LOCK_WAIT_SECONDS = 60.0
"""How long a process waits for the run's lock, held by others only while ``latest`` moves."""
STEP_NAME = re.compile(r"step-([0-9]{8,})")
_POINTER = re.compile(r"[A-Za-z0-9._-]+")


def committed(storage: Storage, name: str) -> bool:
    """Whether the real directory ``name`` holds a root ``zarr.json`` that is a regular file."""
    return storage.kind(f"{name}/{ROOT_METADATA}") == "file"


def _where(storage: Storage, name: str) -> str:
    return f"{storage.location}/{name}"


def read_pointer(storage: Storage) -> str | None:
    """The name ``latest`` holds (R10.2), or ``None`` if there is no ``latest``."""
    pointer = _where(storage, LATEST)
    try:
        data = storage.read_file(LATEST, POINTER_MAX_BYTES)
    except FileMissingError:
        kind = storage.kind(LATEST)
        if kind is None:
            return None
        raise InvalidKeyError(f"{pointer} is {describe(kind)}, not a regular file; remove it") from None
    except LimitExceededError:
        raise InvalidKeyError(f"{pointer} holds more than {POINTER_MAX_BYTES} bytes; remove it") from None
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidKeyError(f"{pointer} is not UTF-8 text; it must hold a checkpoint name") from None
    if not _POINTER.fullmatch(name) or name in (".", ".."):
        raise InvalidKeyError(
            f"{pointer} does not hold a checkpoint name (one line of [A-Za-z0-9._-]); repair it"
        )
    return name


def read_pointer_quietly(storage: Storage) -> str | None:
    try:
        return read_pointer(storage)
    except TesseraError:
        return None


def point_latest(storage: Storage, name: str) -> bool:
    """Move ``latest`` to ``name`` unless it names a higher step already (R10.8); whether it moved.

    Under the run's lock, reading ``latest``, comparing steps and replacing it is one step
    for every process that moves it."""
    step = step_of(name)
    lock = storage.lock(None, create=False, wait=LOCK_WAIT_SECONDS)
    if lock is None:
        raise StorageError(
            f"run directory {storage.location} stayed locked for {LOCK_WAIT_SECONDS:.0f} s by "
            f"another process moving {LATEST!r}; check for a hung process"
        )
    try:
        current = read_pointer_quietly(storage)
        if current is not None and step is not None:
            current_step = step_of(current)
            valid = storage.kind(current) == "dir" and committed(storage, current)
            if current_step is not None and current_step >= step and valid:
                return current == name
        storage.replace_file(LATEST, (name + "\n").encode())
    finally:
        lock.release()
    return True


def release_step(storage: Storage, lock: Lock, name: str, *, touched: bool) -> None:
    """Unlock step ``name``; its marker stays beside an uncommitted directory this holder
    touched (saved or deleted into), or that was already marked: it marks a leftover of a
    save or deletion made through a run directory, which retention may remove once no one
    holds the lock (R10.10). An unmarked directory this holder did not touch (a plain
    save's, maybe live) stays unmarked."""
    try:
        leftover = storage.kind(name) == "dir" and not committed(storage, name)
    except StorageError:
        leftover = True
    lock.release(keep_marker=leftover and not (lock.created and not touched))


def lock_name(step_name: str) -> str:
    """``.step-00000100.lock``: a dot-name, so listings skip it (R10.5, R10.9)."""
    return f".{step_name}.lock"


def describe(kind: EntryKind) -> str:
    return {
        "link": "a symbolic link",
        "file": "not a directory",
        "dir": "a directory",
        "other": "not a directory",
    }[kind]


def step_of(name: str) -> int | None:
    match = STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None
