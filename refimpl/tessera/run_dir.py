"""A training run's directory: one checkpoint per step, a ``latest`` pointer, retention (spec §10).

``latest`` moves only after the checkpoint it names is committed, and
retention deletes only committed checkpoints that are not the latest, so a
crash at any moment leaves the previous checkpoint loadable. An asynchronous
save does all three in the background, in that order. A checkpoint is
deleted root-first: its ``zarr.json`` goes before its chunks, so a deletion
cut short leaves an uncommitted directory, never a committed one with holes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from .async_save import AsyncSave, default_saver, snapshot_options
from .collective import collective_for
from .errors import InvalidKeyError, StorageError, TesseraError, UncommittedCheckpointError
from .format.manifest import Manifest
from .storage.base import ROOT_METADATA
from .writer import save

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
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._last_async: AsyncSave | None = None

    @staticmethod
    def name_of(step: int) -> str:
        return f"step-{step:08d}"

    @overload
    def save(
        self,
        state_dict: Mapping[Any, Any],
        step: int,
        *,
        asynchronous: Literal[False] = False,
        **options: Any,
    ) -> Manifest: ...

    @overload
    def save(
        self, state_dict: Mapping[Any, Any], step: int, *, asynchronous: Literal[True], **options: Any
    ) -> AsyncSave: ...

    @overload
    def save(
        self, state_dict: Mapping[Any, Any], step: int, *, asynchronous: bool, **options: Any
    ) -> Manifest | AsyncSave: ...

    def save(
        self, state_dict: Mapping[Any, Any], step: int, *, asynchronous: bool = False, **options: Any
    ) -> Manifest | AsyncSave:
        """Save the step's checkpoint, then move ``latest`` to it, then apply retention.

        With ``asynchronous=True`` the state is copied to host memory and the rest happens in
        the background (as ``tessera.save(..., asynchronous=True)``, on the same saver), so
        ``latest`` names the previous checkpoint until this one is committed; the handle is
        returned. A synchronous save first waits for the asynchronous ones (:meth:`wait`), so
        that ``latest`` moves in call order.
        """
        metadata = {"step": step, **options.pop("metadata", {})}
        path = self.root / self.name_of(step)
        if not asynchronous:
            self.wait()
            return self._save_now(state_dict, path, metadata=metadata, **options)
        saver = default_saver(options.pop("process_group", None))
        options = snapshot_options({**options, "metadata": metadata})
        handle = saver.submit(
            state_dict,
            path,
            lambda staged, group: self._save_now(staged, path, process_group=group, **options),
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

    def _save_now(self, state_dict: Mapping[Any, Any], path: Path, **options: Any) -> Manifest:
        """The save, then ``latest`` and retention on the coordinator, with every rank waiting for it."""
        manifest = save(state_dict, path, **options)
        assert isinstance(manifest, Manifest), "a synchronous save returns the manifest"
        # Under torch.distributed only the coordinator moves the pointer and deletes; the
        # other ranks wait for it, so that every rank sees the new ``latest`` on return.
        collective = collective_for(options.get("process_group"))
        error: TesseraError | None = None
        if collective.rank == 0:
            try:
                self._point_latest(path.name)
                self.apply_retention()
            except OSError as exc:
                error = StorageError(f"{self.root}: cannot move {LATEST} or apply retention: {exc}")
        error = collective.broadcast(error, "moving the latest pointer")
        if error is not None:
            raise error
        return manifest

    def latest(self) -> Path | None:
        """The committed checkpoint ``latest`` names, or ``None`` for a run with none yet."""
        pointer = self.root / LATEST
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not _POINTER.fullmatch(name) or name in (".", ".."):
            raise InvalidKeyError(f"{pointer} holds {name[:80]!r}, not a checkpoint name")
        target = self.root / name
        if not (target / ROOT_METADATA).is_file():
            raise UncommittedCheckpointError(f"{pointer} names {name}, which is not committed")
        return target

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every step directory, oldest first, with its state."""
        try:
            latest = self.latest()
        except (InvalidKeyError, UncommittedCheckpointError):
            latest = None
        found = []
        for child in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            match = _STEP_NAME.fullmatch(child.name)
            if match and child.is_dir():
                found.append(
                    CheckpointInfo(
                        child.name,
                        int(match.group(1)),
                        (child / ROOT_METADATA).is_file(),
                        latest is not None and child.name == latest.name,
                    )
                )
        return sorted(found, key=lambda c: c.step)

    def apply_retention(self) -> list[str]:
        """Delete committed, non-latest checkpoints beyond ``keep_last`` that ``keep_every`` spares."""
        if self.keep_last is None:
            return []
        committed = [c for c in self.checkpoints() if c.committed]
        keep = {c.name for c in committed[-self.keep_last :]}
        deleted = []
        for info in committed:
            spared = self.keep_every is not None and info.step % self.keep_every == 0
            if info.name in keep or info.latest or spared:
                continue
            (self.root / info.name / ROOT_METADATA).unlink()
            shutil.rmtree(self.root / info.name)
            deleted.append(info.name)
        return deleted

    def _point_latest(self, name: str) -> None:
        temporary = self.root / f".{LATEST}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.root / LATEST)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
