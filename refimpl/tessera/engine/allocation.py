"""New tensors for what a read returns, refused before allocation when over the reader limit."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import LimitExceededError
from ..format.limits import ReaderLimits
from .array_checks import ArrayEntry

__all__ = ["allocate", "check_allocation"]


def check_allocation(location: str, limits: ReaderLimits, arrays: Sequence[tuple[ArrayEntry, int]]) -> None:
    """Refuse, before allocating, new tensors of more bytes in all than the reader limit
    ``max_load_bytes`` (spec R11.6): a manifest's declared shapes alone must not exhaust memory."""
    total = sum(nbytes for _, nbytes in arrays)
    if total > limits.max_load_bytes:
        largest, nbytes = max(arrays, key=lambda a: a[1])
        raise LimitExceededError(
            f"{location}: loading would allocate {total} bytes, over the limit "
            f"max_load_bytes={limits.max_load_bytes} (the largest, {largest.path}, is "
            f"{nbytes} bytes); load into a template, select keys, or raise the limit"
        )


def allocate(entry: ArrayEntry, shape: list[int]) -> torch.Tensor:
    """A new CPU tensor for ``entry``; memory that runs out (within ``max_load_bytes``, but
    taken by others) is ``limit_exceeded``, not the allocator's bare error."""
    try:
        return torch.empty(shape, dtype=entry.layout.dtype.torch_dtype)
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
            raise  # not an allocation failure: a bug to see, not to mask
        raise LimitExceededError(
            f"{entry.path}: cannot allocate {math.prod(shape) * entry.layout.dtype.itemsize} "
            "bytes to load it into (out of memory); load into a template or select fewer keys"
        ) from None
