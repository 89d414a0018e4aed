"""``tessera verify``: every document against its schema, every chunk present and intact.

Unlike a load, which stops at the first error, verification collects every
problem (each with its spec error code and the file at fault), so one run
tells the whole state of a damaged checkpoint.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from .errors import InconsistentCheckpointError, TesseraError
from .format.keys import parent_paths
from .format.layout import chunk_key
from .format.limits import DEFAULT_LIMITS, ReaderLimits
from .format.manifest import ObjectEntry, TensorEntry
from .format.schemas import validate
from .format.strict_json import loads
from .parallel import run_all
from .progress import Progress
from .reader import Checkpoint, read_manifest
from .storage.base import CLAIM_FILE
from .storage.local import LocalStorage

__all__ = ["Problem", "VerifyReport", "verify"]


@dataclass(frozen=True, slots=True)
class Problem:
    code: str
    """The spec's error code (``checksum_mismatch``, ``missing_chunk``...)."""
    message: str


@dataclass(slots=True)
class VerifyReport:
    location: str
    problems: list[Problem] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    path: str | os.PathLike[str],
    *,
    progress: bool = False,
    threads: int | None = None,
    limits: ReaderLimits = DEFAULT_LIMITS,
) -> VerifyReport:
    """Check a checkpoint completely; never raises for a damaged checkpoint, reports instead."""
    storage = LocalStorage(path)
    report = VerifyReport(storage.location)
    lock = threading.Lock()

    def guarded(check: Callable[[], object]) -> None:
        try:
            check()
        except TesseraError as exc:
            with lock:
                report.problems.append(Problem(exc.code, str(exc)))

    try:
        checkpoint = Checkpoint(storage, read_manifest(storage, limits), limits=limits, threads=threads)
    except TesseraError as exc:
        report.problems.append(Problem(exc.code, str(exc)))
        return report
    guarded(partial(_check_claim, checkpoint, limits))
    arrays = [e for e in checkpoint.manifest.entries if isinstance(e, (TensorEntry, ObjectEntry))]
    for group in sorted({group for a in arrays for group in parent_paths(a.path)}):
        guarded(partial(_check_group, checkpoint, group, limits))
    report.arrays = len(arrays)
    with Progress(sum(a.layout.nbytes for a in arrays), "verifying", progress) as bar:
        tasks: list[Callable[[], None]] = []
        for entry in arrays:
            try:
                checkpoint.check_array_metadata(entry)
            except TesseraError as exc:
                report.problems.append(Problem(exc.code, str(exc)))
                continue
            guarded(partial(_check_no_extra_chunks, checkpoint, entry))
            for index in entry.layout.chunk_indices():
                tasks.append(_chunk_task(checkpoint, entry, index, bar, guarded))
            report.chunks += entry.layout.chunk_count
            report.nbytes += entry.layout.nbytes
        run_all(tasks, threads)
    return report


def _chunk_task(
    checkpoint: Checkpoint,
    entry: TensorEntry | ObjectEntry,
    index: tuple[int, ...],
    bar: Progress,
    guarded: Callable[[Callable[[], object]], None],
) -> Callable[[], None]:
    def task() -> None:
        guarded(partial(checkpoint.read_chunk, entry, index))
        bar.advance(entry.layout.nbytes // max(entry.layout.chunk_count, 1))

    return task


def _check_claim(checkpoint: Checkpoint, limits: ReaderLimits) -> None:
    """The claim file, where present, must belong to the save that committed the root."""
    storage = checkpoint.storage
    if storage.size(CLAIM_FILE) is None:
        return
    where = f"{storage.location}/{CLAIM_FILE}"
    doc = loads(storage.read_file(CLAIM_FILE, limits.max_json_bytes), where, limits)
    validate(doc, "claim", where)
    if doc["save_id"] != checkpoint.manifest.save_id:
        raise InconsistentCheckpointError(
            f"{where} was claimed by save {doc['save_id']} but the root was committed by "
            f"{checkpoint.manifest.save_id}: two writers mixed in one path"
        )


def _check_group(checkpoint: Checkpoint, group: str, limits: ReaderLimits) -> None:
    where = f"{checkpoint.storage.location}/{group}/zarr.json"
    if checkpoint.storage.size(f"{group}/zarr.json") is None:
        raise InconsistentCheckpointError(f"{where} is missing: every group on the way to an array has one")
    validate(
        loads(checkpoint.storage.read_file(f"{group}/zarr.json", limits.max_json_bytes), where, limits),
        "group",
        where,
    )


def _check_no_extra_chunks(checkpoint: Checkpoint, entry: TensorEntry | ObjectEntry) -> None:
    """Files under the array's ``c/`` that the grid does not name mean a foreign or stale write."""
    expected = {chunk_key(i) for i in entry.layout.chunk_indices()}
    found: list[str] = []
    pending = ["c"]
    storage = checkpoint.storage
    while pending:
        prefix = pending.pop()
        names = storage.list(f"{entry.path}/{prefix}")
        if not names and storage.size(f"{entry.path}/{prefix}") is not None:
            found.append(prefix)
        pending.extend(f"{prefix}/{n}" for n in names)
    extra = sorted(set(found) - expected)
    if extra:
        raise InconsistentCheckpointError(
            f"{entry.path}: chunk files outside its grid of {list(entry.layout.grid_shape)}: {extra[:5]}"
        )
