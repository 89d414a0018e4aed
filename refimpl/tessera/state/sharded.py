"""The sharded state dict model: a rank's part of a global tensor or of a grid of objects.

A ``ShardedTensor`` says where this rank's data sits in the global tensor: a
box (``global_offset``, box shape), or a flat range of such a box, which is
how a distributed optimizer holds its state (Megatron's ``flattened_range``).
``replica_id`` tells copies apart: the copies with ``replica_id == 0`` must
cover the global tensor exactly once; the others let the planner spread the
writing over every rank that holds the same bytes. PyTorch ``DTensor`` values
are turned into ``ShardedTensor`` s by :mod:`tessera.state.dtensor`, so a
model's own ``state_dict()`` can be saved as it is.

A ``ShardedObject`` is one cell of a grid of per-rank values (RNG states,
data-loader positions); it is stored under its key extended by its offset in
the grid (``rng/~0/~3``), an ordinary entry that any reader can load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ShardingError
from .boxes import Box, held_boxes

__all__ = ["Piece", "ShardedObject", "ShardedTensor"]


@dataclass(frozen=True, slots=True)
class Piece:
    """A box of a global tensor and the memory on this rank that holds it (box-shaped view)."""

    box: Box
    data: torch.Tensor | np.ndarray


@dataclass(frozen=True, slots=True, eq=False)
class ShardedTensor:
    """This rank's part of a global tensor.

    ``local`` holds the box ``[global_offset, global_offset + box_shape)``; with
    ``flat_range=(start, stop)`` it is 1-d and holds only those elements of the
    box in C order. ``box_shape`` defaults to ``local.shape``.
    """

    local: torch.Tensor | np.ndarray
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    box_shape: tuple[int, ...] | None = None
    flat_range: tuple[int, int] | None = None
    replica_id: int = 0
    """0 for the main copy; any other value for a copy that the planner may choose not to write."""
    _box: Box = field(init=False, repr=False)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.global_shape)
        offset = tuple(int(o) for o in self.global_offset)
        local_shape = tuple(self.local.shape)
        box_shape = tuple(int(s) for s in self.box_shape) if self.box_shape is not None else local_shape
        object.__setattr__(self, "global_shape", shape)
        object.__setattr__(self, "global_offset", offset)
        object.__setattr__(self, "box_shape", box_shape)
        where = f"ShardedTensor(global_shape={list(shape)}, global_offset={list(offset)})"
        if not (len(shape) == len(offset) == len(box_shape)):
            raise ShardingError(
                f"{where}: global_shape, global_offset and box shape {list(box_shape)} "
                "must have one entry per dimension"
            )
        if any(s < 0 for s in shape) or any(
            o < 0 or o + b > s for o, b, s in zip(offset, box_shape, shape, strict=True)
        ):
            raise ShardingError(f"{where}: the box of shape {list(box_shape)} lies outside the global tensor")
        if self.flat_range is None:
            if local_shape != box_shape:
                raise ShardingError(
                    f"{where}: local shape {list(local_shape)} is not the box shape {list(box_shape)}"
                )
        else:
            start, stop = (int(x) for x in self.flat_range)
            object.__setattr__(self, "flat_range", (start, stop))
            if (
                len(local_shape) != 1
                or not 0 <= start <= stop <= math.prod(box_shape)
                or local_shape[0] != stop - start
            ):
                raise ShardingError(
                    f"{where}: flat_range {[start, stop]} needs a 1-d local tensor "
                    f"of {stop - start} elements "
                    f"within the box's {math.prod(box_shape)} (got shape {list(local_shape)})"
                )
        if self.replica_id < 0:
            raise ShardingError(f"{where}: replica_id must be >= 0, got {self.replica_id}")
        object.__setattr__(self, "_box", Box(offset, box_shape))

    @classmethod
    def from_rank_offsets(
        cls, local: torch.Tensor | np.ndarray, *rank_offsets: tuple[int, int, int], replica_id: int = 0
    ) -> ShardedTensor:
        """A shard of an evenly split tensor: each ``(dim, index, count)`` says that ``dim`` is
        split into ``count`` equal parts and this is part ``index`` (as Megatron spells it)."""
        shape = list(local.shape)
        offset = [0] * len(shape)
        for dim, index, count in rank_offsets:
            if not (0 <= dim < len(shape) and 0 <= index < count):
                raise ShardingError(f"rank offset {(dim, index, count)} does not fit a {len(shape)}-d tensor")
            offset[dim] = index * shape[dim]
            shape[dim] *= count
        return cls(local, tuple(shape), tuple(offset), replica_id=replica_id)

    @property
    def box(self) -> Box:
        """The box this shard lies in (all of it is held unless ``flat_range`` is set)."""
        return self._box

    @property
    def dtype(self) -> Any:
        return self.local.dtype

    def pieces(self) -> list[Piece]:
        """Boxes held, each with a box-shaped view of ``local``; a flat range gives several."""
        assert self.box_shape is not None
        flat = self.local.reshape(-1) if self.flat_range is not None else None
        return [
            Piece(box, self.local if flat is None else flat[first : first + box.volume].reshape(box.shape))
            for box, first in held_boxes(self.global_offset, self.box_shape, self.flat_range)
        ]


@dataclass(frozen=True, slots=True, eq=False)
class ShardedObject:
    """One rank's cell of a grid of per-rank values, stored at ``key/~i/~j/...``."""

    value: Any
    """A tensor, an array, bytes or a JSON value (stored as any leaf of that kind)."""
    grid_shape: tuple[int, ...]
    grid_offset: tuple[int, ...]
    replica_id: int = 0

    def __post_init__(self) -> None:
        grid = tuple(int(g) for g in self.grid_shape)
        offset = tuple(int(o) for o in self.grid_offset)
        object.__setattr__(self, "grid_shape", grid)
        object.__setattr__(self, "grid_offset", offset)
        if (
            not grid
            or len(grid) != len(offset)
            or any(not 0 <= o < g for o, g in zip(offset, grid, strict=True))
        ):
            raise ShardingError(
                f"ShardedObject: grid_offset {list(offset)} is not a cell of grid {list(grid)}"
            )
        if self.replica_id < 0:
            raise ShardingError(f"ShardedObject: replica_id must be >= 0, got {self.replica_id}")
