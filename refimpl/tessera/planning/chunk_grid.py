"""Choosing an array's one regular chunk grid (spec §5, R16.4).

Chunks should be contiguous byte ranges of the tensor (written and read in
place) and close to the target size. When several ranks hold parts of the
tensor, a grid whose lines include every shard boundary puts each chunk inside
one rank's shard, so no bytes move between ranks; when that grid's chunks
would be tiny (uneven splits, flat optimizer ranges), the plain grid is used
and the pieces of each chunk are moved to its one owner instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..state.boxes import Box

__all__ = [
    "DIRECT_IO_BLOCK",
    "MIN_ALIGNED_CHUNK_BYTES",
    "MIN_GATHERED_CHUNK_BYTES",
    "choose_chunk_shape",
    "chunk_shape_for",
]

MIN_ALIGNED_CHUNK_BYTES = 2**20
"""Smallest chunk worth aligning to shard boundaries; below it, pieces move to one owner instead."""

DIRECT_IO_BLOCK = 4096
"""The block of direct I/O (``O_DIRECT``, GPUDirect Storage): file offsets and sizes in whole
blocks of it move without a read-modify-write or a bounce buffer."""

MIN_GATHERED_CHUNK_BYTES = 8 * 2**20
"""Where pieces must move anyway, chunks no smaller than this: fewer files and a smaller plan."""


def choose_chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """A chunk shape whose chunks are contiguous in C order and close to ``chunk_bytes``.

    The chunk is ``[1, ..., 1, n, *shape[k+1:]]`` for the outermost dimension
    ``k`` whose trailing block fits: every chunk is then one contiguous byte
    range of the tensor, written and read in place with no gather. Where the
    tensor takes several chunks along ``k``, ``n`` is rounded down so that a
    chunk's bytes fill whole :data:`DIRECT_IO_BLOCK` blocks where it can
    (spec R6.9): direct I/O then moves every chunk's data in whole blocks.
    """
    if not shape:
        return ()
    trailing = [math.prod(shape[d + 1 :]) * itemsize for d in range(len(shape))]
    for k, block in enumerate(trailing):
        # The innermost dimension always fits: a chunk is at least one element.
        if block <= chunk_bytes or k == len(shape) - 1:
            n = max(1, min(shape[k], chunk_bytes // max(block, 1)))
            step = DIRECT_IO_BLOCK // math.gcd(block, DIRECT_IO_BLOCK) if block else 1
            if step <= n < shape[k]:
                n -= n % step
            return (*([1] * k), n, *(max(s, 1) for s in shape[k + 1 :]))
    raise AssertionError("unreachable: the loop returns at the innermost dimension")


def chunk_shape_for(
    shape: tuple[int, ...],
    itemsize: int,
    shards: Sequence[Box],
    pieces: Sequence[Box],
    typical_shard: int,
    chunk_bytes: int,
) -> tuple[int, ...]:
    """The chunk shape of an array whose main copies are ``shards`` (boxes), held as ``pieces``
    (the same, or the boxes of flat ranges of them); ``typical_shard`` (the median) in elements.

    First choice: chunks inside one piece each, so no bytes move between ranks. Flat ranges at
    odd offsets leave no such grid of useful size; then chunks stay inside one shard box and
    shrink towards a quarter of a typical shard (not below ``MIN_GATHERED_CHUNK_BYTES``), so
    that mostly the chunks where one rank's range ends and the next begins are gathered.
    """
    floor = min(MIN_ALIGNED_CHUNK_BYTES, math.prod(shape) * itemsize)
    for boxes, target in (
        (pieces, chunk_bytes),
        (shards, min(chunk_bytes, max(MIN_GATHERED_CHUNK_BYTES, typical_shard * itemsize // 4))),
    ):
        steps = _boundary_gcds(shape, boxes)
        if all(step is None for step in steps):
            return choose_chunk_shape(shape, itemsize, target)
        cell = tuple(step or size for step, size in zip(steps, shape, strict=True))
        aligned = tuple(
            c if step is None else _largest_divisor_at_most(step, c)
            for c, step in zip(choose_chunk_shape(cell, itemsize, target), steps, strict=True)
        )
        if math.prod(aligned) * itemsize >= floor:
            return aligned
    return choose_chunk_shape(shape, itemsize, target)


def _boundary_gcds(shape: tuple[int, ...], shards: Iterable[Box]) -> list[int | None]:
    """Per dimension, the gcd of the shard boundaries strictly inside the array (``None``: none)."""
    steps: list[int | None] = [None] * len(shape)
    for box in shards:
        for d, (start, stop) in enumerate(zip(box.offset, box.stop, strict=True)):
            for edge in (start, stop):
                if 0 < edge < shape[d]:
                    steps[d] = math.gcd(steps[d] or 0, edge)
    return steps


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best = 1
    for small in range(1, math.isqrt(n) + 1):
        if n % small == 0:
            for d in (small, n // small):
                if best < d <= limit:
                    best = d
    return best
