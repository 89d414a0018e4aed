"""A rank's range of a flat buffer, seen as per-parameter shards in model space (spec R16.6).

ZeRO and Megatron's distributed optimizer keep optimizer state in one flat
buffer: the parameters flattened and concatenated, each data-parallel rank
holding a contiguous range of it. Saving that range as it is would tie the
checkpoint to the data-parallel size. Instead each parameter's part of the
range becomes a ``ShardedTensor`` with a flat range of the parameter's global
shape, so the checkpoint stores every parameter's state at its own shape and
loads under any other data-parallel size (or none) without conversion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import ShardingError
from .sharded import ShardedTensor

__all__ = ["flat_buffer_shards"]


def flat_buffer_shards(
    buffer: torch.Tensor, shapes: Mapping[str, tuple[int, ...]], buffer_range: tuple[int, int]
) -> dict[str, ShardedTensor]:
    """Per-parameter shards of ``buffer``, which holds elements ``[start, stop)`` of the
    concatenation of the parameters of ``shapes`` (in order, each flattened in C order).

    Each shard's ``local`` is a view of ``buffer``: saving reads it, loading fills it.
    Parameters the range does not reach are left out; a parameter of no elements is held, empty,
    by the ranges that start or stop at its offset.
    """
    start, stop = buffer_range
    if buffer.dim() != 1 or buffer.numel() != stop - start or start < 0:
        raise ShardingError(
            f"a flat buffer for range [{start}, {stop}) must be 1-d with {stop - start} elements, "
            f"got shape {list(buffer.shape)}"
        )
    shards: dict[str, ShardedTensor] = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        first, last = max(start, offset), min(stop, offset + size)
        # A parameter of no elements is reached by no range: the ranges next to its offset hold it,
        # empty, so that its state is saved (at its shape, R16.6) like every other parameter's.
        if first < last or (size == 0 and first == last):
            shards[name] = ShardedTensor(
                buffer[first - start : last - start],
                tuple(shape),
                (0,) * len(shape),
                box_shape=tuple(shape),
                flat_range=(first - offset, last - offset),
            )
        offset += size
    if stop > offset:
        raise ShardingError(f"range [{start}, {stop}) runs past the {offset} elements of the parameters")
    return shards
