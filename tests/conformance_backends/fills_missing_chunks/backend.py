"""Broken on purpose: a reader that reads a missing chunk as the fill value (spec R5.7).

Stock Zarr readers do exactly this; a Tessera reader must refuse with ``missing_chunk``. The suite
must fail it on every read case that expects ``missing_chunk``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar
from unittest import mock

import numpy as np
from tessera.engine.chunk_reads import ChunkFiles
from tessera.engine.read_strategies import ChunkRead
from tessera.engine.read_targets import ReadTarget
from tessera.format.layout import ChunkIndex, chunk_key
from tessera.format.manifest import ObjectEntry, TensorEntry

from conformance.backends.reference.backend import Answer, ReferenceBackend, Request, serve

_READ_CHUNK = ChunkFiles.read_chunk


class FillsMissingChunks(ReferenceBackend):
    folder: ClassVar[Path] = Path(__file__).resolve().parent

    def read(self, request: Request) -> Answer:
        # Every chunk read whole (not in place: no chunk is ever a run of its destination), through
        # read_chunk, which no longer minds a missing file.
        with (
            mock.patch.object(ChunkRead, "of", staticmethod(_never_in_place)),
            mock.patch.object(ChunkFiles, "read_chunk", _read_or_fill),
        ):
            return super().read(request)


def _never_in_place(targets: Sequence[ReadTarget]) -> ChunkRead:
    return ChunkRead(targets, None)


def _read_or_fill(self: ChunkFiles, entry: TensorEntry | ObjectEntry, index: ChunkIndex) -> np.ndarray:
    layout = entry.layout
    if self.storage.size(f"{entry.path}/{chunk_key(index)}") is not None:
        return _READ_CHUNK(self, entry, index)
    fill = layout.dtype.fill_bytes() * math.prod(layout.chunk_shape)
    return np.frombuffer(fill, layout.dtype.numpy_dtype).reshape(layout.chunk_shape)


if __name__ == "__main__":
    serve(FillsMissingChunks())
