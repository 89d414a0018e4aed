"""A checkpoint's chunk files as a reader meets them: where each one is (for messages), whether
it is there and of a size a valid chunk has, and one whole chunk read, checked and decoded."""

from __future__ import annotations

import numpy as np

from ..errors import InconsistentCheckpointError, LimitExceededError, MissingChunkError
from ..format.chunk_codec import decode_chunk
from ..format.layout import CRC32C_SIZE, ArrayLayout, ChunkIndex, chunk_key
from ..format.manifest import listed_chunk_crc
from ..storage.base import FileMissingError, Storage
from .array_checks import ArrayEntry
from .root import check_not_deleted

__all__ = ["ChunkFiles", "largest_chunk_file"]


def largest_chunk_file(layout: ArrayLayout) -> int:
    """The most bytes a valid chunk file of ``layout`` can hold (zstd's worst case, plus the CRC)."""
    return layout.chunk_nbytes + layout.chunk_nbytes // 128 + 1024 + CRC32C_SIZE


class ChunkFiles:
    """The chunk files of the checkpoint in ``storage``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def where(self, entry: ArrayEntry, index: ChunkIndex) -> str:
        """The chunk as messages name it: array, chunk key and checkpoint."""
        return f"{entry.path} chunk {chunk_key(index)} ({self.storage.location})"

    def size(self, entry: ArrayEntry, index: ChunkIndex) -> int:
        """The stored size of a chunk, checked: missing and misshapen chunks raise here."""
        size = self.storage.size(f"{entry.path}/{chunk_key(index)}")
        self.check_file(entry, index, size)
        assert size is not None
        return size

    def check_file(self, entry: ArrayEntry, index: ChunkIndex, size: int | None) -> None:
        """Refuse a chunk file that is missing (``None``) or of a size no valid chunk has."""
        layout = entry.layout
        where = self.where(entry, index)
        if size is None:
            check_not_deleted(self.storage, f"{entry.path}/{chunk_key(index)}")
            raise MissingChunkError(
                f"{where} is missing; the checkpoint is damaged (never read as fill value)"
            )
        if layout.zstd_level is None and size != layout.chunk_nbytes + CRC32C_SIZE:
            raise InconsistentCheckpointError(
                f"{where} is {size} bytes; a raw chunk of {list(layout.chunk_shape)} "
                f"{layout.dtype.name} plus its checksum is {layout.chunk_nbytes + CRC32C_SIZE}"
            )
        bound = largest_chunk_file(layout)
        if size > bound:
            raise LimitExceededError(f"{where} is {size} bytes, more than zstd can produce ({bound})")

    def read_chunk(self, entry: ArrayEntry, index: ChunkIndex) -> np.ndarray:
        """One whole chunk, chunk-shaped, its size and checksum checked; one open of its file."""
        path = f"{entry.path}/{chunk_key(index)}"
        try:
            raw = self.storage.read_file(path, largest_chunk_file(entry.layout))
        except FileMissingError:
            self.check_file(entry, index, None)
            raise
        except LimitExceededError:
            self.size(entry, index)  # the precise error: a raw chunk of the wrong size
            raise
        self.check_file(entry, index, len(raw))
        listed = listed_chunk_crc(entry, index)
        return decode_chunk(raw, entry.layout, self.where(entry, index), listed)
