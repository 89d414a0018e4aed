"""Regions of arrays as half-open bounds: a user's index turned into bounds, and the bounds math
of a read (which part of a request a chunk holds, and where that part sits in the chunk)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import TensorMismatchError

__all__ = ["Bounds", "Region", "bounds_of", "intersect", "overlaps", "within"]

Bounds = tuple[tuple[int, int], ...]
"""``[start, stop)`` per dimension."""

Region = Sequence[slice | int] | None
"""A NumPy-style basic index: one ``slice`` (step 1) or ``int`` per leading dimension."""


def bounds_of(region: Region, shape: tuple[int, ...], key: str) -> tuple[Bounds, tuple[int, ...]]:
    """Half-open bounds per dimension, and which dimensions an ``int`` index drops."""
    items = list(region or ())
    if len(items) > len(shape):
        raise TensorMismatchError(f"{key}: region has {len(items)} indices for {len(shape)} dimensions")
    bounds: list[tuple[int, int]] = []
    dropped: list[int] = []
    for dim, size in enumerate(shape):
        item = items[dim] if dim < len(items) else slice(None)
        if isinstance(item, int) and not isinstance(item, bool):
            index = item + size if item < 0 else item
            if not 0 <= index < size:
                raise TensorMismatchError(f"{key}: index {item} out of range for dimension {dim} of {size}")
            bounds.append((index, index + 1))
            dropped.append(dim)
        elif isinstance(item, slice) and item.step in (None, 1):
            start, stop, _ = item.indices(size)
            bounds.append((start, max(start, stop)))
        elif isinstance(item, slice):  # an argument mistake, not a region outside the array (R14.2)
            raise ValueError(f"{key}: region slices must have step 1, got {item!r}")
        else:
            raise TypeError(f"{key}: region items must be ints or slices with step 1, got {item!r}")
    return tuple(bounds), tuple(dropped)


def overlaps(bounds: Bounds, region: Bounds) -> bool:
    """Whether ``bounds`` and ``region`` share any element."""
    return all(max(a, ra) < min(b, rb) for (a, b), (ra, rb) in zip(bounds, region, strict=True))


def intersect(bounds: Bounds, region: Bounds) -> Bounds:
    """The part of ``bounds`` inside ``region`` (both ``[start, stop)`` per dimension)."""
    return tuple((max(a, ra), min(b, rb)) for (a, b), (ra, rb) in zip(bounds, region, strict=True))


def within(inner: Bounds, region: Bounds) -> tuple[slice, ...]:
    """``inner`` as slices of an array holding ``region`` (as a decoded chunk holds its region)."""
    return tuple(slice(a - ra, b - ra) for (a, b), (ra, _) in zip(inner, region, strict=True))
