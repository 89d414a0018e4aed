"""``tessera verify``: every document against its schema, every chunk present and intact.

Unlike a load, which stops at the first error, verification collects every
problem (each with its spec error code and the file at fault), so one run
tells the whole state of a damaged checkpoint.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..engine.read_engine import ReadEngine
from ..engine.root import read_manifest
from ..errors import InconsistentCheckpointError, TesseraError
from ..format.keys import PathTree
from ..format.limits import DEFAULT_LIMITS, ReaderLimits
from ..format.manifest import ObjectEntry, TensorEntry
from ..format.schemas import validate
from ..format.strict_json import loads
from ..storage.base import CLAIM_FILE, FileMissingError
from ..storage.resolve import Location, storage_for
from ..util.parallel import run_all
from ..util.progress import Progress

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
    path: Location,
    *,
    progress: bool = False,
    threads: int | None = None,
    limits: ReaderLimits = DEFAULT_LIMITS,
) -> VerifyReport:
    """Check a checkpoint completely; never raises for a damaged checkpoint, reports instead.

    ``path`` is a path, a URL or a :class:`~tessera.storage.Storage`; ``threads`` is the number
    of I/O threads, as for :func:`tessera.open`. With ``progress``, a bar on stderr counts the
    bytes verified (the CLI draws it when stderr is a terminal)."""
    storage = storage_for(path)
    report = VerifyReport(storage.location)
    lock = threading.Lock()

    def guarded(check: Callable[[], object]) -> None:
        try:
            check()
        except TesseraError as exc:
            with lock:
                report.problems.append(Problem(exc.code, str(exc)))

    try:
        engine = ReadEngine(storage, read_manifest(storage, limits), limits=limits, threads=threads)
    except TesseraError as exc:
        report.problems.append(Problem(exc.code, str(exc)))
        return report
    guarded(partial(_check_claim, engine, limits))
    arrays = [e for e in engine.manifest.entries if isinstance(e, (TensorEntry, ObjectEntry))]
    tree = PathTree()
    for position, array in enumerate(arrays):
        tree.add(array.path, position)
    for group in tree.groups():
        guarded(partial(_check_group, engine, group, limits))
    report.arrays = len(arrays)
    with Progress(sum(a.layout.nbytes for a in arrays), "verifying", progress) as bar:
        checked = []
        for entry in arrays:
            try:
                engine.checks.check(entry)
            except TesseraError as exc:
                report.problems.append(Problem(exc.code, str(exc)))
                continue
            report.chunks += entry.layout.chunk_count
            report.nbytes += entry.layout.nbytes
            try:
                stored, extra = _stored_chunks(engine, entry)
            except TesseraError as exc:
                report.problems.append(Problem(exc.code, str(exc)))
                continue
            if extra is not None:
                report.problems.append(extra)
            report.problems.extend(_missing_chunks(engine, entry, stored))
            checked.append((entry, sorted(stored)))
        # Chunks are checked on many threads, finishing in any order: their problems are kept by
        # (array, chunk) and reported in manifest and chunk order, the same on every run.
        found: dict[tuple[int, tuple[int, ...]], Problem] = {}

        def keep(at: tuple[int, tuple[int, ...]]) -> Callable[[Callable[[], object]], None]:
            def guard(check: Callable[[], object]) -> None:
                try:
                    check()
                except TesseraError as exc:
                    with lock:
                        found[at] = Problem(exc.code, str(exc))

            return guard

        run_all(
            (
                _chunk_task(engine, entry, index, bar, keep((position, index)))
                for position, (entry, stored) in enumerate(checked)
                for index in stored
            ),
            threads,
        )
        report.problems.extend(found[at] for at in sorted(found))
    return report


MISSING_NAMED = 16
"""Missing chunks of one array named one by one; the rest are counted in one more problem."""


def _missing_chunks(
    engine: ReadEngine, entry: TensorEntry | ObjectEntry, stored: set[tuple[int, ...]]
) -> list[Problem]:
    """The chunks of the grid not stored (R5.7): the first few each a ``missing_chunk``, the
    rest counted, so that a hostile grid of 2^24 absent chunks costs neither minutes nor memory."""
    absent = entry.layout.chunk_count - len(stored)
    problems: list[Problem] = []
    if absent == 0:
        return problems
    for index in entry.layout.chunk_indices():
        if index not in stored:
            try:
                engine.files.size(entry, index)  # raises the missing chunk's own error
            except TesseraError as exc:
                problems.append(Problem(exc.code, str(exc)))
            if len(problems) == min(absent, MISSING_NAMED):
                break
    if absent > len(problems):
        problems.append(
            Problem(
                "missing_chunk",
                f"{entry.path}: {absent - len(problems)} more of its {entry.layout.chunk_count} chunks "
                f"are missing ({engine.storage.location})",
            )
        )
    return problems


def _chunk_task(
    engine: ReadEngine,
    entry: TensorEntry | ObjectEntry,
    index: tuple[int, ...],
    bar: Progress,
    guarded: Callable[[Callable[[], object]], None],
) -> Callable[[], None]:
    def task() -> None:
        guarded(partial(_check_chunk, engine, entry, index))
        region = entry.layout.chunk_region(index)
        bar.advance(math.prod(b - a for a, b in region) * entry.layout.dtype.itemsize)

    return task


def _check_chunk(engine: ReadEngine, entry: TensorEntry | ObjectEntry, index: tuple[int, ...]) -> None:
    """A chunk as a load reads it (size, CRC, decoding), and for ``bool`` only bytes 0 and 1:
    a writer writes no other, and a CRC computed over another still matches (R7.2)."""
    decoded = engine.files.read_chunk(entry, index)
    if entry.layout.dtype.name == "bool":
        raw = decoded.view(np.uint8)
        if raw.max(initial=0) > 1:
            where = engine.files.where(entry, index)
            raise InconsistentCheckpointError(
                f"{where} holds the byte {int(raw.max())} in a bool array, where only 0 and 1 "
                "are false and true (R7.2)"
            )


def _check_claim(engine: ReadEngine, limits: ReaderLimits) -> None:
    """The claim file, where present, must belong to the save that committed the root."""
    storage = engine.storage
    if storage.size(CLAIM_FILE) is None:
        return
    where = f"{storage.location}/{CLAIM_FILE}"
    doc = loads(storage.read_file(CLAIM_FILE, limits.max_json_bytes), where, limits)
    validate(doc, "claim", where)
    manifest = engine.manifest
    if doc["save_id"] != manifest.save_id:
        raise InconsistentCheckpointError(
            f"{where} was claimed by save {doc['save_id']} but the root was committed by "
            f"{manifest.save_id}: two writers mixed in one path"
        )
    writer = {"name": manifest.writer.name, "version": manifest.writer.version}
    for member, committed in (("created", manifest.created), ("writer", writer)):
        if doc[member] != committed:
            raise InconsistentCheckpointError(
                f"{where}: its {member} differs from the manifest's, though the save ids agree "
                "(R9.12): one of the two documents was altered"
            )


GROUP_DOCUMENT = {"zarr_format": 3, "node_type": "group", "attributes": {}}
"""The content of every intermediate group document (R2.4), as JSON (member order and
whitespace carry no meaning, R2.8)."""


def _check_group(engine: ReadEngine, group: str, limits: ReaderLimits) -> None:
    """A group on the way to an array: present, schema-valid, and exactly R2.4's content (R2.7)."""
    where = f"{engine.storage.location}/{group}/zarr.json"
    try:
        data = engine.storage.read_file(f"{group}/zarr.json", limits.max_json_bytes)
    except FileMissingError:
        raise InconsistentCheckpointError(
            f"{where} is missing: every group on the way to an array has one"
        ) from None
    doc = loads(data, where, limits)
    validate(doc, "group", where)
    if doc != GROUP_DOCUMENT or any(type(doc[k]) is not type(v) for k, v in GROUP_DOCUMENT.items()):
        raise InconsistentCheckpointError(
            f"{where} is a valid group document but not the one a writer writes "
            '({"zarr_format":3,"node_type":"group","attributes":{}}, R2.4)'
        )


def _stored_chunks(
    engine: ReadEngine, entry: TensorEntry | ObjectEntry
) -> tuple[set[tuple[int, ...]], Problem | None]:
    """The chunks of the array's grid that have a file under its ``c/``, and the problem of any
    other file there (a foreign or stale write, R11.9)."""
    found: list[str] = []
    pending = ["c"]
    storage = engine.storage
    while pending:
        prefix = pending.pop()
        names = storage.list(f"{entry.path}/{prefix}")
        if not names and storage.size(f"{entry.path}/{prefix}") is not None:
            found.append(prefix)
        pending.extend(f"{prefix}/{n}" for n in names)
    grid = entry.layout.grid_shape
    stored = {index for index in map(partial(_grid_index, grid=grid), found) if index is not None}
    extra = sorted(name for name in found if _grid_index(name, grid) is None)
    if not extra:
        return stored, None
    message = f"{entry.path}: chunk files outside its grid of {list(grid)}: {extra[:5]}"
    return stored, Problem(InconsistentCheckpointError.code, message)


def _grid_index(name: str, grid: tuple[int, ...]) -> tuple[int, ...] | None:
    """The chunk index whose key (R5.2) is ``name``, if it names a chunk of ``grid``."""
    _, *parts = name.split("/")
    if len(parts) != len(grid) or not all(
        p.isdigit() and p.isascii() and len(p) < 20 and (p == "0" or not p.startswith("0")) for p in parts
    ):
        return None
    index = tuple(map(int, parts))
    return index if all(i < n for i, n in zip(index, grid, strict=True)) else None
