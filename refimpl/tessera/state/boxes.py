"""Boxes of a global tensor: where a shard, a chunk or a requested region lies (spec §16).

A box is a half-open hyper-rectangle ``[offset, offset + shape)`` in global
coordinates. Every sharding this library meets reduces to boxes: a ``Shard``
or an uneven split is one box, a strided shard is a product of runs, and a
flat range of a distributed optimizer's buffer is at most ``2 * ndim - 1``
boxes (:func:`flat_range_boxes`). Planning, coverage checks and resharded
reads are then box intersections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Box", "corners", "flat_range_boxes", "held_boxes"]


@dataclass(frozen=True, slots=True)
class Box:
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offset, self.shape, strict=True))

    @property
    def volume(self) -> int:
        return math.prod(self.shape)

    def intersect(self, other: Box) -> Box | None:
        """The common part, or ``None`` when it is empty (boxes of zero volume never intersect)."""
        starts = tuple(max(a, b) for a, b in zip(self.offset, other.offset, strict=True))
        stops = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        if any(b <= a for a, b in zip(starts, stops, strict=True)) or self.volume == 0:
            return None
        return Box(starts, tuple(b - a for a, b in zip(starts, stops, strict=True)))

    def contains(self, other: Box) -> bool:
        return all(
            o >= so and o + s <= so + ss
            for o, s, so, ss in zip(other.offset, other.shape, self.offset, self.shape, strict=True)
        )

    def relative_to(self, origin: tuple[int, ...]) -> tuple[slice, ...]:
        """This box as slices of an array whose element 0 sits at ``origin``."""
        return tuple(
            slice(o - base, o - base + s) for o, s, base in zip(self.offset, self.shape, origin, strict=True)
        )


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[Box, int]]:
    """The boxes that elements ``[start, stop)`` of ``shape`` (C order) form, with each box's
    first flat index; ascending, so each box is the next contiguous run of the range."""
    if start >= stop:
        return []
    if not shape:
        return [(Box((), ()), 0)]
    inner = math.prod(shape[1:])
    if inner == 0:
        return []
    first_row, head = divmod(start, inner)
    last_row, tail = divmod(stop, inner)
    if first_row == last_row:
        return _in_row(shape, first_row, head, tail, inner)
    boxes: list[tuple[Box, int]] = []
    if head:
        boxes += _in_row(shape, first_row, head, inner, inner)
        first_row += 1
    if last_row > first_row:
        boxes.append(
            (Box((first_row, *[0] * (len(shape) - 1)), (last_row - first_row, *shape[1:])), first_row * inner)
        )
    if tail:
        boxes += _in_row(shape, last_row, 0, tail, inner)
    return boxes


def _in_row(shape: tuple[int, ...], row: int, start: int, stop: int, inner: int) -> list[tuple[Box, int]]:
    return [
        (Box((row, *box.offset), (1, *box.shape)), row * inner + first)
        for box, first in flat_range_boxes(shape[1:], start, stop)
    ]


def held_boxes(
    offset: tuple[int, ...], box_shape: tuple[int, ...], flat_range: tuple[int, int] | None
) -> list[tuple[Box, int]]:
    """The global boxes a shard holds, each with the index of its first element in the shard's
    local data: one box, or the boxes of a flat range. Empty boxes are left out."""
    if flat_range is None:
        box = Box(offset, box_shape)
        return [(box, 0)] if box.volume else []
    start = flat_range[0]
    return [
        (Box(tuple(o + g for o, g in zip(box.offset, offset, strict=True)), box.shape), first - start)
        for box, first in flat_range_boxes(box_shape, *flat_range)
    ]


def corners(boxes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop corners of boxes given as ``(offset, shape)``, one row per box, for
    vectorized overlap and containment tests."""
    ndim = len(boxes[0][0]) if boxes else 0
    starts = np.array([offset for offset, _ in boxes], np.int64).reshape(len(boxes), ndim)
    shapes = np.array([shape for _, shape in boxes], np.int64).reshape(len(boxes), ndim)
    return starts, starts + shapes
