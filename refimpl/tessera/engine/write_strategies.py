"""How one chunk's bytes get from where its data lives to its file: the host write strategies.

:func:`tessera.engine.chunk_writer.write_chunks` chooses one strategy per chunk, once, when it
lists the writing tasks (:func:`choose`), from where the chunk's sources live and what the
storage can do; a writing thread then calls its ``write``. Here, the strategies that hand the
chunk's elements to the codec (:func:`~tessera.format.chunk_codec.encode_chunk`) in host memory;
the codec pads an edge chunk with the fill value and compresses it when its layout says so, so
these three carry compressed chunks too (zstd runs on the CPU). The two that write from device
memory (GPU-direct) are in :mod:`.gpu.device_writes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..format.chunk_codec import encode_chunk
from ..format.layout import ArrayLayout, ChunkIndex
from ..planning.global_plan import Source
from ..state.tensors import as_numpy
from ..storage.base import Storage
from .staging import shared_pool

__all__ = [
    "HOST_ASSEMBLED",
    "HOST_MEMORY",
    "PINNED_STAGED",
    "ChunkFile",
    "Held",
    "HostAssembled",
    "HostMemory",
    "PinnedStaged",
    "WriteStrategy",
]

Held = np.ndarray | torch.Tensor
"""A region of a piece where it lives: a NumPy view of CPU memory, or a tensor on a GPU."""


@dataclass(frozen=True, slots=True)
class ChunkFile:
    """One chunk to write: its file, its place in the array, and the data of its sources."""

    storage: Storage
    path: str
    """The chunk file's path in the checkpoint (``w/c/0/1``)."""
    layout: ArrayLayout
    index: ChunkIndex
    sources: tuple[tuple[Source, Held], ...]
    """Each part of the chunk (a region of the array) with its data, in the order of the plan."""

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """The chunk's region of the array (cut at the array's edge)."""
        return self.layout.chunk_region(self.index)

    @property
    def shape(self) -> list[int]:
        return [b - a for a, b in self.bounds]

    @property
    def nbytes(self) -> int:
        """Bytes of the chunk's data (without edge padding): what the progress bar counts."""
        return math.prod(self.shape) * self.layout.dtype.itemsize

    def place(self, source: Source) -> tuple[slice, ...]:
        """Where ``source`` goes in the chunk's region."""
        return source.region.relative_to(tuple(a for a, _ in self.bounds))


class WriteStrategy(Protocol):
    """Writes one chunk file; called by one writing thread, once, for the chunk it was chosen for."""

    def write(self, chunk: ChunkFile) -> int:
        """Write ``chunk``'s file; the CRC32C stored in its last 4 bytes (for the chunk list)."""
        ...


def _write_encoded(chunk: ChunkFile, data: np.ndarray) -> int:
    """Encode the chunk's elements (its region, in host memory) and write them; the stored CRC32C."""
    stored: list[int] = []
    chunk.storage.write_file(chunk.path, encode_chunk(data, chunk.layout, chunk.index, stored.append))
    return stored[0]


class HostMemory:
    """One source in host memory: encoded straight from it, with no copy where its elements are a
    prefix of the chunk in C order (the codec appends the edge padding and the CRC as buffers
    of their own); else the codec pads it into a chunk-shaped buffer first."""

    def write(self, chunk: ChunkFile) -> int:
        ((_, data),) = chunk.sources
        return _write_encoded(chunk, np.asarray(data))


class HostAssembled:
    """Several sources, all in host memory (the ranks' pieces, some received from peers):
    assembled into one host array of the chunk's region, then encoded."""

    def write(self, chunk: ChunkFile) -> int:
        assembled = np.empty(chunk.shape, dtype=chunk.layout.dtype.numpy_dtype)
        for source, data in chunk.sources:
            assembled[chunk.place(source)] = data
        return _write_encoded(chunk, assembled)


class PinnedStaged:
    """Some source on a GPU, written through the host: copied into a pinned buffer of a small
    shared pool in the writing thread (so device-to-host copies overlap other threads' writes,
    and no host copy of the whole state is ever needed), then encoded from there."""

    def write(self, chunk: ChunkFile) -> int:
        layout, nbytes = chunk.layout, chunk.nbytes
        with shared_pool().buffer(nbytes) as buffer:
            typed = buffer[:nbytes].view(layout.dtype.torch_dtype).reshape(chunk.shape)
            host = as_numpy(typed, layout.dtype)
            for source, data in chunk.sources:
                where = chunk.place(source)
                if isinstance(data, np.ndarray):
                    host[where] = data
                else:
                    typed[where].copy_(data)  # device to pinned host: waits for the copy
            return _write_encoded(chunk, host)


HOST_MEMORY = HostMemory()
HOST_ASSEMBLED = HostAssembled()
PINNED_STAGED = PinnedStaged()
