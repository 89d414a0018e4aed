"""A read pass's requests turned into one task per chunk, made lazily, each chunk read once."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ..util.progress import Progress
from .array_checks import ChunkTask
from .read_strategies import ReadStrategies
from .read_targets import ReadRequest, ReadTarget
from .regions import overlaps

__all__ = ["chunk_tasks"]


def chunk_tasks(
    requests: Sequence[ReadRequest], strategies: ReadStrategies, progress: Progress
) -> Iterator[ChunkTask]:
    """One task per chunk, made lazily: a chunk that several requests overlap (the boxes of one
    flat range, neighbouring shards) is read and checked once and copied into each, by the task
    of the first request that needs it. Each task advances ``progress`` by the bytes it filled."""
    by_path: dict[str, list[ReadRequest]] = {}
    for request in requests:
        by_path.setdefault(request.entry.path, []).append(request)
    seen: dict[str, int] = {}
    for request in requests:
        entry = request.entry
        same = by_path[entry.path]
        if len(same) == 1:
            for index in entry.layout.chunks_overlapping(request.bounds):
                yield entry, _counted([request.target(index)], strategies, progress)
            continue
        position = seen[entry.path] = seen.get(entry.path, -1) + 1
        for index in entry.layout.chunks_overlapping(request.bounds):
            region = entry.layout.chunk_region(index)
            if any(overlaps(other.bounds, region) for other in same[:position]):
                continue  # read by an earlier request's task
            group = [other.target(index) for other in same[position:] if overlaps(other.bounds, region)]
            yield entry, _counted(group, strategies, progress)


def _counted(targets: list[ReadTarget], strategies: ReadStrategies, progress: Progress) -> Callable[[], None]:
    """The chunk's task, then its bytes counted (a disabled bar counts nothing, at no cost)."""
    task = strategies.task(targets)
    if not progress.enabled:
        return task
    nbytes = sum(t.nbytes for t in targets)

    def counted() -> None:
        task()
        progress.advance(nbytes)

    return counted
