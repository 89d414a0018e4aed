"""What the subcommands share: finding the checkpoint a location names, and what it holds.

A location given to a command (a path, or a URL of a registered scheme) goes through
:func:`~tessera.storage.resolve.storage_for`, as every entry point's does: a URL never becomes
a local path. It may be a checkpoint or a run directory; a run directory stands for the
checkpoint its ``latest`` names, because that is the one a resumed training run would load.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api.run_dir import LATEST, RunDirectory
from ..api.run_layout import STEP_NAME
from ..errors import CheckpointNotFoundError
from ..storage.base import ROOT_METADATA, Storage
from ..storage.resolve import storage_for

__all__ = ["Target", "disk_usage", "is_present", "is_run_directory", "resolve"]


@dataclass(frozen=True, slots=True)
class Target:
    """The checkpoint a command works on, and the run directory it was reached through, if any."""

    storage: Storage
    run_dir: RunDirectory | None = None


def is_present(storage: Storage) -> bool:
    """Whether anything is at the location: a local directory counts even when empty."""
    return storage.present()


def is_run_directory(storage: Storage) -> bool:
    """A location that is not itself a checkpoint and holds ``latest`` or ``step-*`` checkpoints."""
    names = storage.list("")
    if ROOT_METADATA in names:
        return False
    if LATEST in names:
        return True
    return any(STEP_NAME.fullmatch(n) for n in names) and bool(RunDirectory(storage).checkpoints())


def resolve(location: str) -> Target:
    """The checkpoint ``location`` names: itself, or the ``latest`` of a run directory.

    Raises ``UnsupportedLocationError`` for a URL whose scheme no storage is registered for,
    ``CheckpointNotFoundError`` for a location where nothing is, or a run directory with no
    committed checkpoint yet. A location that is neither is returned as is, so that opening
    it gives the precise error (uncommitted, not a Tessera checkpoint...).
    """
    storage = storage_for(location)
    if not is_present(storage):
        raise CheckpointNotFoundError(f"no checkpoint or run directory at {storage.location}")
    if is_run_directory(storage):
        run_dir = RunDirectory(storage)
        latest = run_dir.latest()
        if latest is None:
            raise CheckpointNotFoundError(
                f"run directory {storage.location} has no committed checkpoint yet (no {LATEST!r} file)"
            )
        return Target(storage_for(latest), run_dir)
    return Target(storage)


def disk_usage(storage: Storage) -> int:
    """Bytes of every file under the location, as its storage counts them (a local one: every
    regular file by ``lstat``, links not followed; an object store: one listing's sizes)."""
    return storage.stored_bytes()
