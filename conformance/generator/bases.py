"""The small good checkpoint that every broken vector starts from.

``w`` (float32 [4, 6] in chunks [2, 3]: four chunks ``c/0/0`` to ``c/1/1``),
``grp/v`` (int16 [5], one chunk), ``grp/b`` (int8 [3], a one-byte type) and
``grp/n`` (a JSON value), optionally with an object ``blob`` and zstd. Kept
tiny and alike across vectors, so that a vector differs from its base only by
its fault.
"""

from __future__ import annotations

from typing import Any

import tessera

from .data import tensor
from .vector import VectorWriter

__all__ = ["GOOD_KEYS", "save_base"]

GOOD_KEYS = [(("grp", "v"), None), (("grp", "n"), None)]
"""Entries that no fault of a vector about ``w`` touches: a read of only these must succeed."""


def base_state(*, blob: bool = False) -> dict[str, Any]:
    state: dict[str, Any] = {
        "w": tensor("float32", (4, 6), seed=1),
        "grp": {"v": tensor("int16", (5,), seed=2), "b": tensor("int8", (3,), seed=3), "n": 3},
    }
    if blob:
        state["blob"] = bytes(range(1, 12))
    return state


def save_base(vector: VectorWriter, *, blob: bool = False, zstd: bool = False) -> None:
    """Save the base state into ``vector`` (with an object ``blob``, with zstd level 3)."""
    options = tessera.SaveOptions(chunk_shapes={"w": [2, 3]}, compression=tessera.Zstd(3) if zstd else None)
    vector.save(base_state(blob=blob), options=options)
