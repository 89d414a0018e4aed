"""A training run's directory: one checkpoint per step, a ``latest`` pointer, retention (spec §10).

``latest`` moves only after the checkpoint it names is committed, and only
forward (to a higher step), so that two processes saving into one run never
move it back; retention deletes only committed checkpoints that are not the
latest, and leftovers of dead saves below the latest, so a crash at any
moment leaves the previous checkpoint loadable. An asynchronous save does all
three in the background, in that order. A checkpoint is deleted root-first:
its ``zarr.json`` goes before its chunks, so a deletion cut short leaves an
uncommitted directory, never a committed one with holes.

Every operation goes through the run root's :class:`~tessera.storage.base.Storage`
(its run-directory operations: ``child``, ``kind``, ``entries``, ``lock``,
``replace_file``, ``remove_checkpoint``), so a run directory lives on any storage
that implements them. The directory may be shared and may hold anything: the
storage never follows a link or blocks on a special file, and its locks make
saving, moving ``latest`` and retention safe between processes (R10.7-R10.10).
Once a checkpoint is committed its save succeeds: what fails afterwards (moving
``latest``, retention) is a :class:`~tessera.TesseraWarning`, never an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import torch.distributed as dist

from ..distributed.collective import collective_for
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    InvalidKeyError,
    TesseraError,
    TesseraWarning,
    UncommittedCheckpointError,
)
from ..format.manifest import Manifest
from ..planning.cache import PlanCache
from ..planning.options import SaveOptions
from ..storage.base import Lock, Storage
from ..storage.local import LocalStorage
from ..storage.resolve import Location, storage_for
from .run_layout import (
    LATEST,
    LOCK_WAIT_SECONDS,
    POINTER_MAX_BYTES,
    STEP_NAME,
    committed,
    describe,
    lock_name,
    point_latest,
    read_pointer,
    read_pointer_quietly,
    release_step,
    step_of,
)
from .save_arguments import DeprecatedSaveKeywords
from .save_async import AsyncSave, SaveCall, default_saver

__all__ = ["CheckpointInfo", "RunDirectory", "LATEST", "LOCK_WAIT_SECONDS", "POINTER_MAX_BYTES"]


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    name: str
    step: int
    committed: bool
    latest: bool


class RunDirectory:
    """Checkpoints ``step-00000100/`` ... of one run, newest named by ``latest``.

    ``location`` is the run's root: a local path, a URL of a registered scheme, or a
    :class:`~tessera.storage.base.Storage` implementing the run-directory operations.
    """

    def __init__(
        self,
        location: Location,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int or None, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if isinstance(location, str | os.PathLike) and "\0" in str(os.fspath(location)):
            raise ValueError(f"a run directory path cannot hold a NUL character: {str(location)!r}")
        self.storage: Storage = storage_for(location)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._last_async: AsyncSave | None = None

    @property
    def root(self) -> Path:
        """The run's directory, for a run on a local storage (others have only :attr:`storage`)."""
        if not isinstance(self.storage, LocalStorage):
            raise TypeError(f"the run directory at {self.storage.location} is not a local path; use .storage")
        return Path(self.storage.location)

    @staticmethod
    def name_of(step: int) -> str:
        """``step-00000100``: the checkpoint name of step ``step`` (R10.1), a non-negative integer."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"a step is a non-negative int, not {step!r}")
        if step < 0:
            raise ValueError(f"a step is a non-negative int, not {step}")
        return f"step-{step:08d}"

    def save(
        self,
        state_dict: Mapping[Any, Any],
        step: int,
        *,
        options: SaveOptions | None = None,
        metadata: Mapping[str, Any] | None = None,
        process_group: dist.ProcessGroup | None = None,
        plan_cache: PlanCache | None = None,
        parallelism: Mapping[str, Any] | None = None,
        progress: bool = False,
        **deprecated: Unpack[DeprecatedSaveKeywords],
    ) -> Manifest:
        """Save the step (``tessera.save``'s arguments; ``metadata`` gains ``step``), move ``latest``
        to it, apply retention; the manifest. Waits for the run's asynchronous saves first
        (:meth:`wait`), so that ``latest`` moves in call order."""
        metadata = {"step": step, **(metadata or {})}
        call = SaveCall.of(
            "RunDirectory.save", options, deprecated, metadata, plan_cache, parallelism, progress
        )
        self.wait()
        return self._save_now(state_dict, self.name_of(step), process_group, call)

    def save_async(
        self,
        state_dict: Mapping[Any, Any],
        step: int,
        *,
        options: SaveOptions | None = None,
        metadata: Mapping[str, Any] | None = None,
        process_group: dist.ProcessGroup | None = None,
        plan_cache: PlanCache | None = None,
        parallelism: Mapping[str, Any] | None = None,
        progress: bool = False,
        **deprecated: Unpack[DeprecatedSaveKeywords],
    ) -> AsyncSave:
        """:meth:`save` in the background (as ``tessera.save_async``, on its saver): the handle, once
        the state is in host memory; ``latest`` names the previous checkpoint until this commits."""
        metadata = {"step": step, **(metadata or {})}
        call = SaveCall.of(
            "RunDirectory.save_async", options, deprecated, metadata, plan_cache, parallelism, progress
        )
        name = self.name_of(step)
        handle = default_saver(process_group).submit(
            state_dict, self._where(name), lambda staged, group: self._save_now(staged, name, group, call)
        )
        self._last_async = handle
        return handle

    def wait(self) -> None:
        """Wait for this run's asynchronous saves, and raise the last one's failure if no one has yet.

        Saves run one after another in call order, so waiting for the last one waits for all; an
        earlier one's failure was raised by the save call after it.
        """
        handle, self._last_async = self._last_async, None
        if handle is not None and not handle.observed:
            handle.wait()

    def _save_now(
        self,
        state_dict: Mapping[Any, Any],
        name: str,
        process_group: dist.ProcessGroup | None,
        call: SaveCall,
    ) -> Manifest:
        """The save of step ``name`` under its lock, then ``latest`` and retention, all on the coordinator.

        Under torch.distributed only the coordinator takes the lock, moves the pointer and
        deletes; the other ranks wait for it, so that every rank sees the new ``latest`` on
        return. Once the checkpoint is committed nothing raises: a failure to move ``latest``
        or to apply retention is a :class:`~tessera.TesseraWarning` on every rank.
        """
        collective = collective_for(process_group)
        lock: Lock | None = None
        error: TesseraError | None = None
        if collective.rank == 0:
            try:
                lock = self._claim_step(name)
            except TesseraError as exc:
                error = exc
        error = collective.broadcast(error, "checking the step directory")
        if error is not None:
            raise error
        try:
            manifest = call.run(state_dict, call.storage(self.storage.child(name)), process_group)
            problem: str | None = None
            if collective.rank == 0:
                problem = self._after_commit(name)
        finally:
            if lock is not None:
                release_step(self.storage, lock, name, touched=True)
        problem = collective.broadcast(problem, "moving the latest pointer")
        if problem is not None:
            warnings.warn(problem, TesseraWarning, stacklevel=2)
        return manifest

    def _where(self, name: str) -> str:
        return f"{self.storage.location}/{name}"

    def _claim_step(self, name: str) -> Lock:
        """Coordinator: lock the step and make sure it can be saved (R10.9, R10.11).

        A leftover of a dead save of this step (uncommitted, its lock marker there, the lock
        free) is removed, so that a job restarted after a crash saves the same step again; an
        uncommitted directory without a marker, a committed step, and a step whose lock is held
        are refused."""
        lock = self.storage.lock(lock_name(name), create=True, wait=0.0)
        if lock is None:
            raise CheckpointExistsError(
                f"{self._where(name)} is being saved or deleted by another process "
                f"({lock_name(name)} is locked); save another step"
            )
        try:
            kind = self.storage.kind(name)
            if kind not in (None, "dir"):
                raise InvalidKeyError(
                    f"{self._where(name)} is {describe(kind)}; a run directory saves only into "
                    "real directories of its own: remove it"
                )
            if kind == "dir" and committed(self.storage, name):
                raise CheckpointExistsError(self._committed_already(name, marked=not lock.created))
            if kind == "dir" and self.storage.entries(name):
                if lock.created:
                    raise CheckpointExistsError(
                        f"{self._where(name)} holds an uncommitted checkpoint that was not saved "
                        f"through a run directory (no {lock_name(name)}; maybe a plain save, maybe "
                        f"live); if no save of step {name} is running, remove it with "
                        f"RunDirectory.discard({step_of(name)}) and save again"
                    )
                # Its marker was there and nobody holds its lock: the leftover of a save or
                # deletion whose process is gone (R10.11). Removed root-first, then saved again.
                self.storage.remove_checkpoint(name)
        except BaseException:
            release_step(self.storage, lock, name, touched=False)
            raise
        return lock

    def _committed_already(self, name: str, *, marked: bool) -> str:
        """The refusal of a save of a committed step. Where its lock marker was left (its saver
        died after the commit, maybe before moving ``latest``), ``latest`` is first moved forward
        to it, as that save would have done (R10.8, R10.11): a restarted job resumes from it."""
        where = f"{self._where(name)} is committed already (checkpoints are never overwritten)"
        if marked:
            try:
                if point_latest(self.storage, name):
                    return (
                        f"{where}; its save was killed before it finished, and {LATEST} names "
                        "it now: resume from it, or save another step"
                    )
            except TesseraError:
                pass  # the refusal stands; latest is moved by the next save that commits
        return f"{where}; load it, or save another step"

    def _after_commit(self, name: str) -> str | None:
        """Move ``latest`` forward to ``name`` and apply retention; what failed, as a warning's text."""
        problems = []
        try:
            point_latest(self.storage, name)
        except Exception as exc:  # the checkpoint is committed: from here on nothing raises
            problems.append(
                f"could not move {LATEST} to it ({_reason(exc)}); "
                f"{LATEST} still names the previous checkpoint"
            )
        try:
            self.apply_retention()
        except Exception as exc:
            problems.append(f"retention failed ({_reason(exc)}); it runs again after the next save")
        if not problems:
            return None
        return f"{self._where(name)} is committed, but " + "; and ".join(problems)

    def latest(self) -> Path | Storage | None:
        """The committed checkpoint ``latest`` names (a path for a local run, else the step's
        storage; either loads), or ``None`` for a run with none yet.

        ``latest`` is read without following a symlink or blocking and with a bound of
        :data:`POINTER_MAX_BYTES` (R10.2); it must name a real directory of the run directory
        (never a symlink out of it). Errors never quote the file's content, which may be anything.
        """
        name = read_pointer(self.storage)
        if name is None:
            return None
        pointer = self._where(LATEST)
        kind = self.storage.kind(name)
        if kind is None:
            raise UncommittedCheckpointError(
                f"{pointer} names {name}, which does not exist; repair {LATEST} or load a "
                "checkpoint by its path"
            )
        if kind != "dir":
            raise InvalidKeyError(
                f"{pointer} names {name}, which is {describe(kind)}; "
                "a run directory follows no links: repair it"
            )
        if not committed(self.storage, name):
            raise UncommittedCheckpointError(f"{pointer} names {name}, which is not committed")
        if isinstance(self.storage, LocalStorage):
            return self.root / name
        return self.storage.child(name)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every step directory, oldest first, with its state.

        A ``step-*`` entry that is a symlink (or not a directory) is skipped with a
        :class:`~tessera.TesseraWarning`: a run directory never follows a link.
        """
        try:
            latest = read_pointer(self.storage) if self.latest() is not None else None
        except TesseraError:
            latest = None
        found = []
        for name, kind in self.storage.entries():
            match = STEP_NAME.fullmatch(name)
            if match is None:
                continue  # R10.5: dot-files, latest, anything else
            if kind != "dir":
                warnings.warn(
                    f"{self._where(name)} is {describe(kind)}; skipped (a run directory never "
                    "follows links or deletes through them)",
                    TesseraWarning,
                    stacklevel=2,
                )
                continue
            found.append(
                CheckpointInfo(name, int(match.group(1)), committed(self.storage, name), name == latest)
            )
        return sorted(found, key=lambda c: c.step)

    def apply_retention(self) -> list[str]:
        """Delete committed, non-latest checkpoints beyond ``keep_last`` that ``keep_every`` spares,
        and leftovers of dead saves below the latest (R10.6, R10.10); the names deleted.

        Each deletion holds the step's lock, and rechecks under it that the checkpoint is
        still what it was when listed: a step another process is saving or deleting is
        skipped, one already gone is not an error.
        """
        infos = self.checkpoints()
        committed = [c for c in infos if c.committed]
        latest = next((c for c in infos if c.latest), None)
        doomed = []
        if self.keep_last is not None:
            keep = {c.name for c in committed[-self.keep_last :]}
            for info in committed:
                spared = self.keep_every is not None and info.step % self.keep_every == 0
                if not (info.name in keep or info.latest or spared):
                    doomed.append((info.name, True))
        if latest is not None:
            # Leftovers: uncommitted, below the latest, and left by a save (or deletion) whose
            # lock marker is still there but no longer held: its process is gone (R10.10).
            doomed += [(c.name, False) for c in infos if not c.committed and c.step < latest.step]
        return [name for name, was_committed in sorted(doomed) if self._delete(name, was_committed)]

    def _delete(self, name: str, was_committed: bool) -> bool:
        """Delete step ``name`` under its lock if it is still committed (or still a dead leftover)."""
        if not was_committed and self.storage.kind(lock_name(name)) is None:
            return False  # no lock marker: not saved through a run directory, maybe live (R10.10)
        lock = self.storage.lock(lock_name(name), create=was_committed, wait=0.0)
        if lock is None:
            return False
        touched = False
        try:
            if self.storage.kind(name) != "dir" or committed(self.storage, name) != was_committed:
                return False
            if was_committed and read_pointer_quietly(self.storage) == name:
                return False
            touched = True
            self.storage.remove_checkpoint(name)
            return True
        finally:
            release_step(self.storage, lock, name, touched=touched)

    def discard(self, step: int) -> None:
        """Delete step ``step``'s uncommitted checkpoint: what a failed or killed save left (R9.7).

        Refuses a committed checkpoint (checkpoints are deleted by retention only), a
        symlink, and a step another process is saving or deleting (its lock is held).
        Call it only when no save of that step runs on another machine: a lock does not
        reach across machines on every file system.
        """
        name = self.name_of(step)
        kind = self.storage.kind(name)
        if kind is None:
            raise CheckpointNotFoundError(f"{self._where(name)} does not exist; nothing to discard")
        if kind != "dir":
            raise InvalidKeyError(
                f"{self._where(name)} is {describe(kind)}, not a checkpoint of the run; remove it by hand"
            )
        lock = self.storage.lock(lock_name(name), create=True, wait=0.0)
        if lock is None:
            raise CheckpointExistsError(
                f"{self._where(name)} is being saved or deleted by another process; not discarded"
            )
        touched = False
        try:
            if committed(self.storage, name):
                raise CheckpointExistsError(
                    f"{self._where(name)} is committed; discard removes only uncommitted checkpoints "
                    "(committed ones go by retention)"
                )
            touched = True
            self.storage.remove_checkpoint(name)
        finally:
            release_step(self.storage, lock, name, touched=touched)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TesseraError):  # first: several are OSErrors too
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return type(exc).__name__  # not ours: its text might quote anything
