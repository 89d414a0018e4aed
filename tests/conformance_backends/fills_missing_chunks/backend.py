"""Broken on purpose: a reader that reads a missing chunk as the fill value (spec R5.7).

Stock Zarr readers do exactly this; a Tessera reader must refuse with ``missing_chunk``. The suite
must fail it on every read case that expects ``missing_chunk``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar
from unittest import mock

import numpy as np
from tessera import Checkpoint
from tessera.api.checkpoint import ReadTarget
from tessera.format.layout import ChunkIndex, chunk_key
from tessera.format.manifest import ObjectEntry, TensorEntry

from conformance.backends.reference.backend import Answer, ReferenceBackend, Request, serve

_READ_CHUNK = Checkpoint.read_chunk


class FillsMissingChunks(ReferenceBackend):
    folder: ClassVar[Path] = Path(__file__).resolve().parent

    def read(self, request: Request) -> Answer:
        # Every chunk through read_chunk (not the in-place path), which no longer minds a missing file.
        with (
            mock.patch.object(Checkpoint, "_chunk_task", _through_read_chunk),
            mock.patch.object(Checkpoint, "read_chunk", _read_or_fill),
        ):
            return super().read(request)


def _through_read_chunk(self: Checkpoint, target: ReadTarget, checksums: object) -> object:
    return self._shared_chunk_task([target])


def _read_or_fill(self: Checkpoint, entry: TensorEntry | ObjectEntry, index: ChunkIndex) -> np.ndarray:
    layout = entry.layout
    if self.storage.size(f"{entry.path}/{chunk_key(index)}") is not None:
        return _READ_CHUNK(self, entry, index)
    fill = layout.dtype.fill_bytes() * math.prod(layout.chunk_shape)
    return np.frombuffer(fill, layout.dtype.numpy_dtype).reshape(layout.chunk_shape)


if __name__ == "__main__":
    serve(FillsMissingChunks())
