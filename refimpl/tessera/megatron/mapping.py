"""Megatron's sharded leaves as Tessera's, and back (no I/O here).

A Megatron ``ShardedTensor`` is stored as the Tessera array ``tensors/<key>``: its box is
``global_offset`` with shape ``(1,) * prepend_axis_num + local_shape`` (the prepended axes
are Megatron's stacked layers), and ``flattened_range`` (a distributed optimizer's slice of
that box in C order) is Tessera's ``flat_range``. ``axis_fragmentations`` is not stored:
Tessera chunks each array on its own grid, which is what lets a load read any other
sharding. A ``ShardedObject`` is the cell ``objects/<key>/~i/~j...`` of its grid. Only
main replicas (``replica_id`` 0 or all zeros) are handed to Tessera, as Megatron's own
strategies do; Tessera's planner still balances and deduplicates what it is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..errors import ShardingError, UnsafeEncodingError
from ..state.flatten import is_json
from ..state.sharded import ShardedObject, ShardedTensor

__all__ = [
    "OBJECTS",
    "TENSORS",
    "box_shape",
    "grid_of",
    "is_main",
    "object_value",
    "tessera_object",
    "tessera_tensor",
]

TENSORS = "tensors"
"""The top-level key under which every Megatron ``ShardedTensor`` is stored."""
OBJECTS = "objects"
"""The top-level key under which every Megatron ``ShardedObject`` cell is stored."""


def is_main(replica_id: int | Iterable[int]) -> bool:
    """Megatron's main replica: ``0``, or a tuple of zeros."""
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


def box_shape(sharded: Any) -> tuple[int, ...]:
    """The box a Megatron ``ShardedTensor`` covers: its local shape under the prepended axes."""
    return (1,) * int(sharded.prepend_axis_num) + tuple(int(s) for s in sharded.local_shape)


def tessera_tensor(sharded: Any, local: torch.Tensor) -> ShardedTensor:
    """The Tessera shard for a Megatron ``ShardedTensor`` whose data is (or will be) ``local``."""
    box = box_shape(sharded)
    flat = sharded.flattened_range
    where = f"Megatron ShardedTensor {sharded.key!r}"
    if flat is not None and (flat.step not in (None, 1)):
        raise ShardingError(f"{where}: flattened_range {flat} has a step; only contiguous ranges exist")
    try:
        if flat is None:
            return ShardedTensor(
                local.reshape(box),
                tuple(sharded.global_shape),
                tuple(sharded.global_offset),
                box_shape=box,
            )
        return ShardedTensor(
            local.reshape(-1),
            tuple(sharded.global_shape),
            tuple(sharded.global_offset),
            box_shape=box,
            flat_range=(int(flat.start), int(flat.stop)),
        )
    except ShardingError as exc:
        raise ShardingError(f"{where}: {exc}") from None
    except RuntimeError as exc:  # a reshape of data whose size is not the box's
        raise ShardingError(
            f"{where}: data of shape {list(local.shape)} does not fill its box {list(box)}"
            + (f" flattened to {flat}" if flat is not None else "")
        ) from exc


def empty_local(sharded: Any) -> torch.Tensor:
    """A new tensor to load a Megatron ``ShardedTensor`` into (on its data's device, if any)."""
    device = sharded.data.device if isinstance(sharded.data, torch.Tensor) else torch.device("cpu")
    flat = sharded.flattened_range
    shape = (int(flat.stop) - int(flat.start),) if flat is not None else tuple(sharded.local_shape)
    return torch.empty(shape, dtype=sharded.dtype, device=device)


def grid_of(sharded: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A ``ShardedObject``'s grid and cell; a 0-d grid (one object for all) is the grid ``(1,)``."""
    shape = tuple(int(s) for s in sharded.global_shape)
    offset = tuple(int(o) for o in sharded.global_offset)
    return (shape, offset) if shape else ((1,), (0,))


def object_value(key: str, value: Any) -> Any:
    """A ``ShardedObject``'s data as Tessera stores it, never pickled: a tensor, an array,
    bytes or JSON. Anything else is refused, naming the key."""
    if isinstance(value, (torch.Tensor, np.ndarray, bytes, bytearray)) or is_json(value):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return value
    raise UnsafeEncodingError(
        f"Megatron ShardedObject {key!r}: its data, a {type(value).__module__}."
        f"{type(value).__qualname__}, is neither a tensor, an array, bytes nor JSON, and "
        "tessera.megatron never pickles; store it as one of those (e.g. a dict of numbers, "
        "or bytes you encode yourself)"
    )


def tessera_object(sharded: Any) -> ShardedObject:
    """The Tessera cell for a Megatron ``ShardedObject`` (its data checked as :func:`object_value`)."""
    grid, cell = grid_of(sharded)
    try:
        return ShardedObject(object_value(sharded.key, sharded.data), grid, cell)
    except ShardingError as exc:
        raise ShardingError(f"Megatron ShardedObject {sharded.key!r}: {exc}") from None


def combined_tensor(shards: list[Any]) -> ShardedTensor:
    """One Tessera shard for several Megatron shards of one key on one rank (a pipeline stage's
    layers, stacked along a prepended axis): copied into the box they tile, which they must
    fill exactly. ``flattened_range`` shards cannot be combined."""
    key = shards[0].key
    if any(s.flattened_range is not None for s in shards):
        raise ShardingError(
            f"Megatron ShardedTensor {key!r}: this rank holds {len(shards)} flattened_range shards "
            "of it; give each a key of its own"
        )
    ndim = len(shards[0].global_shape)
    boxes = [(tuple(int(o) for o in s.global_offset), box_shape(s)) for s in shards]
    low = tuple(min(o[d] for o, _ in boxes) for d in range(ndim))
    high = tuple(max(o[d] + b[d] for o, b in boxes) for d in range(ndim))
    shape = tuple(h - lo for h, lo in zip(high, low, strict=True))
    if sum(math.prod(b) for _, b in boxes) != math.prod(shape):
        raise ShardingError(
            f"Megatron ShardedTensor {key!r}: this rank's {len(shards)} main-replica shards do not "
            f"tile the box {list(low)} + {list(shape)}; Tessera takes one box of a key per rank"
        )
    data = shards[0].data
    out = torch.empty(shape, dtype=data.dtype, device=data.device)
    for shard, (offset, box) in zip(shards, boxes, strict=True):
        where = tuple(slice(o - lo, o - lo + b) for o, lo, b in zip(offset, low, box, strict=True))
        out[where] = shard.data.reshape(box)
    return ShardedTensor(out, tuple(shards[0].global_shape), low)
