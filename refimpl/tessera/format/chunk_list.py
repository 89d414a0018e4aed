"""An array entry's chunk list (spec R3.19): the CRC-32C of every chunk, bound to its index.

A chunk's own CRC (R6.4) says its bytes are intact, not that they belong where
they lie: a valid chunk copied or moved to another chunk's key passes it. The
manifest therefore lists each chunk's CRC, 8 lowercase hex digits per chunk in
C order of the grid index, as one string; a reader compares the CRC stored in
the chunk with the listed one (R6.6). The string is kept as it is and indexed
into, so that an array of millions of chunks costs no Python object per chunk.
"""

from __future__ import annotations

import numpy as np

from ..errors import InconsistentCheckpointError, SchemaViolationError
from .layout import ArrayLayout, ChunkIndex

__all__ = [
    "CRC_HEX_DIGITS",
    "check_chunk_list",
    "encode_chunk_list",
    "flat_chunk_index",
    "grid_strides",
    "listed_crc",
]

CRC_HEX_DIGITS = 8
"""Hex digits per chunk in ``chunk_crc32c``."""


def encode_chunk_list(crcs: np.ndarray) -> str:
    """``chunk_crc32c`` for the CRCs of every chunk in C order (``format(crc, "08x")`` each)."""
    return np.ascontiguousarray(crcs, dtype=">u4").tobytes().hex()


def check_chunk_list(text: str, layout: ArrayLayout, where: str) -> None:
    """Refuse a chunk list that does not hold exactly one CRC per chunk (R3.19: ``inconsistent``).

    Runs when the entry is parsed, before any chunk is looked up in it; the schema already
    checked that it holds only lowercase hex digits.
    """
    if text.endswith("\n"):  # the one character the schema's ``$`` lets past (Python's re)
        raise SchemaViolationError(f"{where}: chunk_crc32c holds a character that is not a hex digit")
    expected = CRC_HEX_DIGITS * layout.chunk_count
    if len(text) != expected:
        raise InconsistentCheckpointError(
            f"{where}: chunk_crc32c has {len(text)} hex digits; {layout.chunk_count} chunks "
            f"need {expected} (8 per chunk)"
        )


def grid_strides(layout: ArrayLayout) -> tuple[int, ...]:
    """Chunks between neighbours along each dimension of the grid, in C order (``()`` for 0-d)."""
    strides: list[int] = []
    step = 1
    for n in reversed(layout.grid_shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def flat_chunk_index(layout: ArrayLayout, index: ChunkIndex) -> int:
    """The position of chunk ``index`` in C (row-major) order of the chunk grid."""
    return sum(i * s for i, s in zip(index, grid_strides(layout), strict=True))


def listed_crc(text: str, layout: ArrayLayout, index: ChunkIndex) -> int:
    """The CRC the chunk list gives chunk ``index`` (the list passed :func:`check_chunk_list`)."""
    start = CRC_HEX_DIGITS * flat_chunk_index(layout, index)
    return int(text[start : start + CRC_HEX_DIGITS], 16)


