"""Loading together: every chunk that any rank needs is read by one rank, once (spec R14.8).

Ranks that load the same chunks (data-parallel replicas of one shard, or a
new layout whose boxes cut across the saved chunks) would each read them from
storage. Loading together, the ranks share what each needs (metadata only),
every needed chunk gets one reader among the ranks that need it, spread so
that no rank reads much more than another, and the reader sends each other
rank exactly the part of the chunk it needs over the process group. Storage
then serves each byte once; the rest moves over the interconnect.
The plan is a pure function of everyone's needs, so every rank computes the
same one and no coordinator is involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..engine.array_checks import ChunkTask
from ..engine.read_engine import ReadEngine, ReadRequestSpec
from ..engine.read_targets import ReadTarget
from ..engine.regions import Bounds, intersect, within
from ..errors import CollectiveError, TesseraError
from ..format.layout import ChunkIndex
from ..util.progress import Progress
from .collective import Collective

__all__ = ["read_together"]

_Need = tuple[str, Bounds]
"""A request's array path and region, as sent to the other ranks."""
_Chunk = tuple[str, ChunkIndex]


@dataclass(frozen=True, slots=True)
class _Piece:
    """The part of a chunk that ``rank`` needs for its request ``need`` (an index into its needs)."""

    rank: int
    need: int
    bounds: Bounds


def read_together(
    engine: ReadEngine,
    requests: Sequence[ReadRequestSpec],
    collective: Collective,
    threads: int | None = None,
    progress: bool = False,
) -> None:
    """Fill every rank's requests, each needed chunk read by exactly one rank; with
    ``progress``, a bar on stderr counts the bytes of this rank's requests as they arrive."""
    try:
        targets = engine.targets_of(requests)
        error = None
    except TesseraError as exc:  # the other ranks must learn of it, not wait for this rank
        targets, error = [], exc
    needs = sorted({(t.entry.path, t.bounds) for t in targets})
    need_index = {need: i for i, need in enumerate(needs)}
    waiting: dict[tuple[int, _Chunk], list[ReadTarget]] = {}
    for t in targets:
        path = t.entry.path
        waiting.setdefault((need_index[(path, t.bounds)], (path, t.index)), []).append(t)
    shared = collective.all_gather((error, needs), "sharing what each rank loads")
    _raise_if_any([e for e, _ in shared], error)
    everyone: list[list[_Need]] = [n for _, n in shared]
    me = collective.rank
    sends: list[tuple[int, int, np.ndarray]] = []
    receives: list[tuple[int, int, int]] = []
    incoming: list[list[ReadTarget]] = []
    tasks: list[ChunkTask] = []
    tag = 0
    bar = Progress(sum(t.nbytes for t in targets), "loading", progress)
    for chunk, (reader, pieces) in _assign_readers(engine, everyone).items():
        moving = []
        for piece in pieces:
            if piece.rank != reader:
                moving.append((tag, piece))
                tag += 1
        if reader == me:
            own = [t for p in pieces if p.rank == me for t in waiting[(p.need, chunk)]]
            tasks.append((engine.array_entry(chunk[0]), _read_chunk(engine, chunk, own, moving, sends, bar)))
            continue
        for tag_of, piece in moving:
            if piece.rank == me:
                group = waiting[(piece.need, chunk)]
                inner, _ = group[0].overlap()
                itemsize = group[0].entry.layout.dtype.itemsize
                receives.append((reader, tag_of, math.prod(b - a for a, b in inner) * itemsize))
                incoming.append(group)
    with bar:
        try:
            # The zarr.json of each array this rank reads is checked here, with the chunk reads;
            # a rank that receives its part of a chunk relies on the reader's check.
            engine.run_reads(tasks, threads=threads)
            error = None
        except TesseraError as exc:  # a damaged chunk fails every rank that needs it, at once
            error = exc
        _raise_if_any(collective.all_gather(error, "reporting the chunks each rank read"), error)
        sends.sort(key=lambda s: s[1])
        received = collective.exchange(
            sends, receives, "sending loaded chunks' pieces to the ranks that need them"
        )
        try:
            for group, raw in zip(incoming, received, strict=True):
                for target in group:
                    target.put(raw.view(target.entry.layout.dtype.numpy_dtype))
                bar.advance(sum(t.nbytes for t in group))
        finally:
            engine.wait_for_copies()


def _raise_if_any(errors: list[TesseraError | None], mine: TesseraError | None) -> None:
    """Every rank raises when any failed: the failing rank its own error, the others a CollectiveError."""
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if mine is not None:
        raise mine
    if failed:
        raise CollectiveError(
            f"rank {failed[0][0]} failed to load its part: {failed[0][1]}; the load was abandoned"
        )


def _assign_readers(
    engine: ReadEngine, everyone: list[list[_Need]]
) -> dict[_Chunk, tuple[int, list[_Piece]]]:
    """Each needed chunk, in one order all ranks agree on: its reader (a rank that needs it,
    least loaded first) and every rank's piece of it."""
    needers: dict[_Chunk, list[_Piece]] = {}
    for rank, needs in enumerate(everyone):
        for need, (path, bounds) in enumerate(needs):
            for index in engine.array_entry(path).layout.chunks_overlapping(bounds):
                needers.setdefault((path, index), []).append(_Piece(rank, need, bounds))
    loads = [0] * len(everyone)
    readers: dict[_Chunk, tuple[int, list[_Piece]]] = {}
    for chunk in sorted(needers):
        pieces = needers[chunk]
        reader = min({p.rank for p in pieces}, key=lambda r: (loads[r], r))
        loads[reader] += engine.array_entry(chunk[0]).layout.chunk_nbytes
        readers[chunk] = (reader, pieces)
    return readers


def _read_chunk(
    engine: ReadEngine,
    chunk: _Chunk,
    own: list[ReadTarget],
    moving: list[tuple[int, _Piece]],
    sends: list[tuple[int, int, np.ndarray]],
    bar: Progress,
) -> Callable[[], None]:
    """Read the chunk once; fill this rank's targets and cut every other rank's piece."""

    def task() -> None:
        entry = engine.array_entry(chunk[0])
        decoded = engine.files.read_chunk(entry, chunk[1])
        region = entry.layout.chunk_region(chunk[1])
        for target in own:
            target.fill_from(decoded)
        for tag, piece in moving:
            part = decoded[within(intersect(piece.bounds, region), region)]
            sends.append((piece.rank, tag, np.array(part, order="C")))
        bar.advance(sum(t.nbytes for t in own))

    return task
