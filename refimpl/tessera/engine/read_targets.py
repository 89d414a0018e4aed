"""What a read pass fills: requests (a region of an array and its destination), and the targets
they split into (one chunk and the part of one destination it fills)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..format.layout import ChunkIndex
from ..state.tensors import as_numpy
from .array_checks import ArrayEntry
from .device_copies import DeviceCopies
from .regions import Bounds, intersect, within

__all__ = ["ReadRequest", "ReadTarget"]


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One checked request of a pass: the region of an array and the destination it fills."""

    entry: ArrayEntry
    bounds: Bounds
    dst: torch.Tensor
    """Viewed with the region's shape, as :attr:`ReadTarget.dst`."""
    copies: DeviceCopies | None

    def target(self, index: ChunkIndex) -> ReadTarget:
        return ReadTarget(self.entry, index, self.bounds, self.dst, self.copies)

    @property
    def nbytes(self) -> int:
        """Bytes of the region (what the request's reads fill in all)."""
        return math.prod(b - a for a, b in self.bounds) * self.entry.layout.dtype.itemsize


@dataclass(frozen=True, slots=True)
class ReadTarget:
    """A chunk and the part of one request's destination it fills."""

    entry: ArrayEntry
    index: ChunkIndex
    bounds: Bounds
    """The request's region of the array; ``dst`` holds exactly it."""
    dst: torch.Tensor
    """The request's destination, viewed with the region's shape (a dimension that an ``int``
    index drops is there with size 1); any device, any strides."""
    copies: DeviceCopies | None = None
    """How bytes reach ``dst``; ``None`` when it is plain host memory, written through NumPy."""

    def overlap(self) -> tuple[Bounds, Bounds]:
        """The chunk's part of the request, in array and in ``dst`` coordinates."""
        inner = intersect(self.bounds, self.entry.layout.chunk_region(self.index))
        return inner, tuple((a - o, b - o) for (a, b), (o, _) in zip(inner, self.bounds, strict=True))

    @property
    def nbytes(self) -> int:
        """Bytes of the chunk's part of the request."""
        inner, _ = self.overlap()
        return math.prod(b - a for a, b in inner) * self.entry.layout.dtype.itemsize

    def part(self) -> torch.Tensor:
        """The view of ``dst`` that the chunk fills."""
        _, local = self.overlap()
        return self.dst[tuple(slice(a, b) for a, b in local)]

    def put(self, part: np.ndarray) -> None:
        """Store the chunk's part of the request (``part`` holds exactly its elements)."""
        inner, _ = self.overlap()
        shaped = part.reshape([b - a for a, b in inner])
        if self.copies is None:
            as_numpy(self.part(), self.entry.layout.dtype)[...] = shaped
        else:
            self.copies.copy(self.part(), shaped, self.entry.layout.dtype)

    def fill_from(self, decoded: np.ndarray) -> None:
        """Store this target's part of the whole decoded chunk."""
        inner, _ = self.overlap()
        self.put(decoded[within(inner, self.entry.layout.chunk_region(self.index))])
