"""What the caller decides about a save: chunk size, compression, which keys may be pickled."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

__all__ = ["DEFAULT_CHUNK_BYTES", "SaveOptions"]

DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True, slots=True)
class SaveOptions:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Target size of a chunk: large enough for full-speed I/O, small enough for partial reads."""
    zstd_level: int | None = None
    """Compress every array with zstd at this level; ``None`` stores raw bytes."""
    pickle_keys: Collection[str] = ()
    """Keys (paths, as ``inspect`` prints them) whose values may be pickled."""
    chunk_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Chunk shapes fixed by the caller, by path, in place of the writer's choice: for tools that
    must reproduce a grid (conformance vectors, converters keeping another format's layout)."""
