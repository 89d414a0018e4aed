"""A training run's directory: one checkpoint per step, a ``latest`` pointer, retention (spec §10).

``latest`` moves only after the checkpoint it names is committed, and only
forward (to a higher step), so that two processes saving into one run never
move it back; retention deletes only committed checkpoints that are not the
latest, and leftovers of dead saves below the latest, so a crash at any
moment leaves the previous checkpoint loadable. An asynchronous save does all
three in the background, in that order. A checkpoint is deleted root-first:
its ``zarr.json`` goes before its chunks, so a deletion cut short leaves an
uncommitted directory, never a committed one with holes.

The directory may be shared and may hold anything: :mod:`tessera.storage.run_files`
does every file operation without following symlinks or blocking, and holds
the locks that make saving, moving ``latest`` and retention safe between
processes (R10.7-R10.10). Once a checkpoint is committed its save succeeds:
what fails afterwards (moving ``latest``, retention) is a
:class:`~tessera.TesseraWarning`, never an error.
"""

from __future__ import annotations

import os
import re
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
    StorageError,
    TesseraError,
    TesseraWarning,
    UncommittedCheckpointError,
)
from ..format.manifest import Manifest
from ..planning.cache import PlanCache
from ..planning.options import SaveOptions
from ..storage import run_files
from ..storage.run_files import StepLock, entry_kind, is_committed
from .save_arguments import DeprecatedSaveKeywords
from .save_async import AsyncSave, SaveCall, default_saver

__all__ = ["CheckpointInfo", "RunDirectory", "LATEST"]

LATEST = "latest"
_STEP_NAME = re.compile(r"step-([0-9]{8,})")
_POINTER = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    name: str
    step: int
    committed: bool
    latest: bool


class RunDirectory:
    """Checkpoints ``step-00000100/`` ... of one run, newest named by ``latest``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.root = Path(root)
        if "\0" in str(self.root):
            raise InvalidKeyError(f"a run directory path cannot hold a NUL character: {str(self.root)!r}")
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._last_async: AsyncSave | None = None

    @staticmethod
    def name_of(step: int) -> str:
        """``step-00000100``: the checkpoint name of step ``step`` (R10.1), a non-negative integer."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidKeyError(f"a step is a non-negative integer, not {step!r}")
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
        return self._save_now(state_dict, self.root / self.name_of(step), process_group, call)

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
        path = self.root / self.name_of(step)
        handle = default_saver(process_group).submit(
            state_dict, str(path), lambda staged, group: self._save_now(staged, path, group, call)
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
        path: Path,
        process_group: dist.ProcessGroup | None,
        call: SaveCall,
    ) -> Manifest:
        """The save under the step's lock, then ``latest`` and retention, all on the coordinator.

        Under torch.distributed only the coordinator takes the lock, moves the pointer and
        deletes; the other ranks wait for it, so that every rank sees the new ``latest`` on
        return. Once the checkpoint is committed nothing raises: a failure to move ``latest``
        or to apply retention is a :class:`~tessera.TesseraWarning` on every rank.
        """
        collective = collective_for(process_group)
        lock = StepLock(self.root, path.name)
        error: TesseraError | None = None
        if collective.rank == 0:
            error = self._claim_step(path, lock)
        error = collective.broadcast(error, "checking the step directory")
        if error is not None:
            raise error
        try:
            manifest = call.run(state_dict, call.storage(path), process_group)
            problem: str | None = None
            if collective.rank == 0:
                problem = self._after_commit(path)
        finally:
            lock.release(touched=True)
        problem = collective.broadcast(problem, "moving the latest pointer")
        if problem is not None:
            warnings.warn(problem, TesseraWarning, stacklevel=2)
        return manifest

    def _claim_step(self, path: Path, lock: StepLock) -> TesseraError | None:
        """Coordinator: make sure the step can be saved, and lock it; the error every rank raises."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not lock.acquire(create=True):
                raise CheckpointExistsError(
                    f"{path} is being saved or deleted by another process ({lock.path} is locked); "
                    "save another step"
                )
            kind = entry_kind(path)
            if kind == "link" or kind == "other":
                lock.release(touched=False)
                raise InvalidKeyError(
                    f"{path} is {'a symbolic link' if kind == 'link' else 'not a directory'}; "
                    "a run directory saves only into real directories of its own: remove it"
                )
            if kind == "dir" and not is_committed(path) and _holds_anything(path):
                lock.release(touched=False)
                raise CheckpointExistsError(
                    f"{path} holds an uncommitted checkpoint (a save that failed or was killed); "
                    f"if no save of step {path.name} is running, remove it with "
                    f"RunDirectory.discard({_step_of(path.name)}) and save again"
                )
        except TesseraError as exc:
            return exc
        except OSError as exc:
            lock.release(touched=False)
            return StorageError(f"cannot prepare {path}: {exc.strerror or exc}")
        return None

    def _after_commit(self, path: Path) -> str | None:
        """Move ``latest`` forward to ``path`` and apply retention; what failed, as a warning's text."""
        problems = []
        try:
            self._point_latest(path.name)
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
        return f"{path} is committed, but " + "; and ".join(problems)

    def latest(self) -> Path | None:
        """The committed checkpoint ``latest`` names, or ``None`` for a run with none yet.

        ``latest`` is read without following a symlink or blocking and with a bound of
        :data:`~tessera.storage.run_files.POINTER_MAX_BYTES` (R10.2); it must name a real
        directory of the run directory (never a symlink out of it). Errors never quote
        the file's content, which may be anything.
        """
        name = self._read_pointer()
        if name is None:
            return None
        target = self.root / name
        kind = entry_kind(target)
        if kind is None:
            raise UncommittedCheckpointError(
                f"{self.root / LATEST} names {name}, which does not exist; repair {LATEST} or load a "
                "checkpoint by its path"
            )
        if kind != "dir":
            raise InvalidKeyError(
                f"{self.root / LATEST} names {name}, which is "
                f"{'a symbolic link' if kind == 'link' else 'not a directory'}; a run directory "
                "follows no links: repair it"
            )
        if not is_committed(target):
            raise UncommittedCheckpointError(f"{self.root / LATEST} names {name}, which is not committed")
        return target

    def _read_pointer(self) -> str | None:
        """The name ``latest`` holds (R10.2), or ``None`` if there is no ``latest``."""
        pointer = self.root / LATEST
        data = run_files.read_small(pointer, run_files.POINTER_MAX_BYTES, f"{LATEST} pointer")
        if data is None:
            return None
        try:
            name = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidKeyError(f"{pointer} is not UTF-8 text; it must hold a checkpoint name") from None
        if not _POINTER.fullmatch(name) or name in (".", ".."):
            raise InvalidKeyError(
                f"{pointer} does not hold a checkpoint name (one line of [A-Za-z0-9._-]); repair it"
            )
        return name

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every step directory, oldest first, with its state.

        A ``step-*`` entry that is a symlink (or not a directory) is skipped with a
        :class:`~tessera.TesseraWarning`: a run directory never follows a link.
        """
        try:
            latest = self.latest()
        except TesseraError:
            latest = None
        found = []
        for name, kind in self._step_entries():
            match = _STEP_NAME.fullmatch(name)
            assert match is not None
            if kind != "dir":
                warnings.warn(
                    f"{self.root / name} is {'a symbolic link' if kind == 'link' else 'not a directory'}; "
                    "skipped (a run directory never follows links or deletes through them)",
                    TesseraWarning,
                    stacklevel=2,
                )
                continue
            found.append(
                CheckpointInfo(
                    name,
                    int(match.group(1)),
                    is_committed(self.root / name),
                    latest is not None and name == latest.name,
                )
            )
        return sorted(found, key=lambda c: c.step)

    def _step_entries(self) -> list[tuple[str, str]]:
        """``(name, kind)`` of each entry named ``step-*`` (R10.5), kind as :func:`entry_kind` says."""
        try:
            with os.scandir(self.root) as entries:
                result = []
                for entry in entries:
                    if not _STEP_NAME.fullmatch(entry.name):
                        continue
                    if entry.is_symlink():
                        result.append((entry.name, "link"))
                    else:
                        result.append((entry.name, "dir" if entry.is_dir(follow_symlinks=False) else "other"))
                return result
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StorageError(f"cannot list run directory {self.root}: {exc.strerror or exc}") from None

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
            # lock file is still there but no longer held: its process is gone (R10.10).
            doomed += [(c.name, False) for c in infos if not c.committed and c.step < latest.step]
        deleted = []
        for name, was_committed in sorted(doomed):
            if self._delete(name, was_committed):
                deleted.append(name)
        return deleted

    def _delete(self, name: str, committed: bool) -> bool:
        """Delete step ``name`` under its lock if it is still committed (or still a dead leftover)."""
        lock = StepLock(self.root, name)
        if not committed and not lock.exists():
            return False  # no lock file: not saved through a run directory, maybe live (R10.10)
        if not lock.acquire(create=committed):
            return False
        touched = False
        try:
            path = self.root / name
            if entry_kind(path) != "dir" or is_committed(path) != committed:
                return False
            if committed and self._read_pointer_quietly() == name:
                return False
            touched = True
            run_files.remove_step(self.root, name)
            return True
        except OSError as exc:
            raise StorageError(f"cannot delete {self.root / name}: {exc.strerror or exc}") from None
        finally:
            lock.release(touched=touched)

    def _read_pointer_quietly(self) -> str | None:
        try:
            return self._read_pointer()
        except TesseraError:
            return None

    def discard(self, step: int) -> None:
        """Delete step ``step``'s uncommitted checkpoint: what a failed or killed save left (R9.7).

        Refuses a committed checkpoint (checkpoints are deleted by retention only), a
        symlink, and a step another process is saving or deleting (its lock is held).
        Call it only when no save of that step runs on another machine: a lock does not
        reach across machines on every file system.
        """
        name = self.name_of(step)
        path = self.root / name
        kind = entry_kind(path)
        if kind is None:
            raise CheckpointNotFoundError(f"{path} does not exist; nothing to discard")
        if kind != "dir":
            what = "a symbolic link" if kind == "link" else "not a directory"
            raise InvalidKeyError(f"{path} is {what}, not a checkpoint of the run; remove it by hand")
        lock = StepLock(self.root, name)
        if not lock.acquire(create=True):
            raise CheckpointExistsError(f"{path} is being saved or deleted by another process; not discarded")
        touched = False
        try:
            if is_committed(path):
                raise CheckpointExistsError(
                    f"{path} is committed; discard removes only uncommitted checkpoints "
                    "(committed ones go by retention)"
                )
            touched = True
            run_files.remove_step(self.root, name)
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror or exc}") from None
        finally:
            lock.release(touched=touched)

    def _point_latest(self, name: str) -> bool:
        """Move ``latest`` to ``name`` unless it names a higher step already (R10.8); whether it moved."""
        step = _step_of(name)
        with run_files.latest_lock(self.root):
            current = self._read_pointer_quietly()
            run_files.remove_stale_pointer_files(self.root)
            if current is not None and step is not None:
                current_step = _step_of(current)
                target = self.root / current
                valid = entry_kind(target) == "dir" and is_committed(target)
                if current_step is not None and current_step >= step and valid:
                    return current == name
            run_files.replace_pointer(self.root, name)
        return True


def _step_of(name: str) -> int | None:
    match = _STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _holds_anything(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    if isinstance(exc, TesseraError):
        return str(exc)
    return type(exc).__name__  # not ours: its text might quote anything
