"""What the subcommands share: finding the checkpoint a path names, and what it holds on disk.

A path given to ``inspect`` or ``verify`` may be a checkpoint or a run
directory; a run directory stands for the checkpoint its ``latest`` names,
because that is the one a resumed training run would load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..api.run_dir import LATEST, RunDirectory
from ..errors import CheckpointNotFoundError
from ..storage.base import ROOT_METADATA

__all__ = ["Target", "disk_usage", "is_run_directory", "resolve"]


@dataclass(frozen=True, slots=True)
class Target:
    """The checkpoint a command works on, and the run directory it was reached through, if any."""

    path: Path
    run_dir: Path | None = None


def is_run_directory(path: Path) -> bool:
    """A directory that is not itself a checkpoint and holds ``latest`` or ``step-*`` checkpoints."""
    if not path.is_dir() or os.path.lexists(path / ROOT_METADATA):
        return False
    return os.path.lexists(path / LATEST) or bool(RunDirectory(path).checkpoints())


def resolve(path: str | os.PathLike[str]) -> Target:
    """The checkpoint ``path`` names: itself, or the ``latest`` of a run directory.

    Raises ``CheckpointNotFoundError`` for a path that does not exist, or a
    run directory with no committed checkpoint yet. A directory that is
    neither is returned as is, so that opening it gives the precise error
    (uncommitted, not a Tessera checkpoint...).
    """
    target = Path(path)
    if not target.exists():
        raise CheckpointNotFoundError(f"no checkpoint or run directory at {target}")
    if is_run_directory(target):
        latest = RunDirectory(target).latest()
        if latest is None:
            raise CheckpointNotFoundError(
                f"run directory {target} has no committed checkpoint yet (no {LATEST!r} file)"
            )
        return Target(latest, target)
    return Target(target)


def disk_usage(path: Path) -> int:
    """Bytes of every regular file under ``path`` (symlinks are not followed)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            total += stat.st_size
    return total


