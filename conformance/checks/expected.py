"""What a written checkpoint must hold: the case's state as the manifest must list it.

The writer cases build an :class:`ExpectedCheckpoint` from the state they
ask a backend to write (for many ranks, merged as spec R16.8 orders it), and
the checks compare the checkpoint against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ExpectedCheckpoint", "ExpectedEntry", "ExpectedObject", "ExpectedTensor", "ExpectedValue", "Key"]

Key = tuple[str | int, ...]


@dataclass(frozen=True, slots=True, eq=False)
class ExpectedTensor:
    key: Key
    dtype: str
    bits: np.ndarray
    """The global tensor, of :func:`conformance.protocol.arrays.storage_dtype` (bits for bfloat16, float8)."""
    chunk_shape: tuple[int, ...] | None = None
    """The chunk shape the backend must use (it claims ``chunk_shapes``), else ``None``: any."""


@dataclass(frozen=True, slots=True)
class ExpectedObject:
    key: Key
    data: bytes


@dataclass(frozen=True, slots=True)
class ExpectedValue:
    key: Key
    encoding: str
    """``json`` or ``float`` (spec R3.16)."""
    value: Any
    """As the manifest spells it: any JSON value, or for ``float`` one of ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"`` (the protocol's spelling too, P11)."""


ExpectedEntry = ExpectedTensor | ExpectedObject | ExpectedValue


@dataclass(frozen=True, slots=True)
class ExpectedCheckpoint:
    entries: tuple[ExpectedEntry, ...]
    """In the order the manifest must list them (spec R3.9, R16.8)."""
    lists: tuple[Key, ...]
    """Order-free: the set of keys of list containers (spec R3.8)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    compression: dict[str, Any] | None = None
    """``{"name": "zstd", "level": n}`` if every array must carry zstd, else ``None``."""
