"""The stored values of a state dict, by key: what a read of each entry must give back.

The walk follows spec §8 (R8.1-R8.4): a JSON subtree is one value, a
non-finite float a ``float`` value, bytes an object, a tensor or NumPy array a
tensor; other lists, tuples and dicts are walked. It is written here again,
not borrowed from the reference writer, so that the expectations do not rest
on the code they check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Key", "Leaf", "NonFinite", "leaves_of"]

Key = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class NonFinite:
    """A non-finite float leaf, as the manifest spells it (R3.16)."""

    spelling: str

    @classmethod
    def of(cls, value: float) -> NonFinite:
        return cls("NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity")


Leaf = Any
"""A stored value: a ``torch.Tensor``, a NumPy array, ``bytes``, a :class:`NonFinite` or a JSON value."""


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(type(k) is str and _is_json(v) for k, v in value.items())
    return False


def leaves_of(state: Mapping[Any, Any] | list[Any] | tuple[Any, ...], prefix: Key = ()) -> dict[Key, Leaf]:
    """Every stored value of ``state`` by key, in the state dict's order."""
    found: dict[Key, Leaf] = {}
    items = state.items() if isinstance(state, Mapping) else enumerate(state)
    for component, value in items:
        key = (*prefix, component)
        if isinstance(value, (Mapping, list, tuple)) and not _is_json(value):
            found.update(leaves_of(value, key))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            found[key] = bytes(value)
        elif isinstance(value, np.generic):
            found[key] = np.asarray(value)
        elif isinstance(value, float) and not math.isfinite(value):
            found[key] = NonFinite.of(value)
        else:
            found[key] = value
    return found
