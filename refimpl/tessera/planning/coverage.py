"""Does every element of a global tensor have exactly one main copy? (spec R16.2)

Checked on metadata alone, before a byte is written, with errors that name the
key and the ranks: two main copies of one element (overlap) or none (gap).
Flat ranges are first checked within their box (sorted 1-d intervals); the
boxes are then checked against each other, vectorized, so that a layout of a
thousand ranks is checked in well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ShardingError
from ..state.boxes import Box, corners

__all__ = ["MainClaim", "check_coverage"]

MainClaim = tuple[tuple[int, ...], tuple[int, ...], "tuple[int, int] | None", int]
"""``(offset, box shape, flat range or None, rank)`` of one main copy."""

_BLOCK = 256


def check_coverage(path: str, shape: tuple[int, ...], claims: Sequence[MainClaim]) -> list[Box]:
    """The main copies' boxes, after checking they tile ``shape`` exactly once."""
    by_box: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[tuple[int, int] | None, int]]] = {}
    for offset, box_shape, flat, rank in claims:
        if len(offset) != len(shape) or any(
            o < 0 or o + b > s for o, b, s in zip(offset, box_shape, shape, strict=False)
        ):
            raise ShardingError(
                f"{path}: rank {rank} holds box offset {list(offset)} shape {list(box_shape)}, "
                f"outside the global shape {list(shape)}"
            )
        if flat is None or flat[0] < flat[1]:
            by_box.setdefault((offset, box_shape), []).append((flat, rank))
    boxes: list[Box] = []
    ranks: list[list[int]] = []
    for (offset, box_shape), held in by_box.items():
        box = Box(offset, box_shape)
        if box.volume == 0:
            continue
        _check_box_filled(path, box, held)
        boxes.append(box)
        ranks.append(sorted({rank for _, rank in held}))
    _check_disjoint(path, boxes, ranks)
    covered = sum(box.volume for box in boxes)
    if covered != math.prod(shape):
        raise ShardingError(
            f"{path}: the main copies (replica_id 0) cover {covered} of {math.prod(shape)} elements of "
            f"the global shape {list(shape)}; {_gap_example(shape, boxes)} is held by no rank"
        )
    return boxes


def _check_box_filled(path: str, box: Box, held: list[tuple[tuple[int, int] | None, int]]) -> None:
    """All of ``box`` is held once: one whole copy, or flat ranges that tile it."""
    where = f"{path}: box offset {list(box.offset)} shape {list(box.shape)}"
    whole = [rank for flat, rank in held if flat is None]
    if whole:
        if len(held) > 1:
            raise ShardingError(
                f"{where} has more than one main copy (ranks {sorted({r for _, r in held})}); "
                "give the copies distinct replica ids"
            )
        return
    position, previous = 0, None
    for (start, stop), rank in sorted((flat, rank) for flat, rank in held if flat is not None):
        if start < position:
            raise ShardingError(
                f"{where}: ranks {previous} and {rank} both hold "
                f"flat elements [{start}, {min(stop, position)})"
            )
        if start > position:
            raise ShardingError(f"{where}: no rank holds flat elements [{position}, {start})")
        position, previous = stop, rank
    if position != box.volume:
        raise ShardingError(f"{where}: no rank holds flat elements [{position}, {box.volume})")


def _check_disjoint(path: str, boxes: list[Box], ranks: list[list[int]]) -> None:
    if len(boxes) < 2:
        return
    starts, stops = corners([(b.offset, b.shape) for b in boxes])
    for first in range(0, len(boxes), _BLOCK):
        block = slice(first, first + _BLOCK)
        overlap = np.all(
            (starts[block, None, :] < stops[None, :, :]) & (starts[None, :, :] < stops[block, None, :]),
            axis=2,
        )
        rows = np.arange(overlap.shape[0])
        overlap[rows, rows + first] = False
        if overlap.any():
            i, j = (int(x) for x in np.argwhere(overlap)[0])
            a, b = boxes[first + i], boxes[j]
            raise ShardingError(
                f"{path}: the main copies of ranks {ranks[first + i]} (offset {list(a.offset)}, shape "
                f"{list(a.shape)}) and ranks {ranks[j]} (offset {list(b.offset)}, "
                f"shape {list(b.shape)}) overlap"
            )


def _gap_example(shape: tuple[int, ...], boxes: list[Box]) -> str:
    """A region no box covers, found on the grid of all box edges (error path only)."""
    edges = [
        sorted({0, s, *(b.offset[d] for b in boxes), *(b.stop[d] for b in boxes)})
        for d, s in enumerate(shape)
    ]
    if math.prod(len(e) - 1 for e in edges) > 10**6:
        return "some region"
    covered = np.zeros([len(e) - 1 for e in edges], dtype=bool)
    for box in boxes:
        covered[
            tuple(slice(e.index(o), e.index(t)) for e, o, t in zip(edges, box.offset, box.stop, strict=True))
        ] = True
    cell = tuple(int(i) for i in np.argwhere(~covered)[0])
    offset = [e[i] for e, i in zip(edges, cell, strict=True)]
    extent = [e[i + 1] - e[i] for e, i in zip(edges, cell, strict=True)]
    return f"the region at offset {offset} of shape {extent}"
