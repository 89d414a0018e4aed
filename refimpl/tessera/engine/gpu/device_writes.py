"""The GPU-direct write strategies: a chunk of GPU data from device memory to its file.

Chosen by :func:`tessera.engine.chunk_writer.choose` for an uncompressed chunk with a source on
a GPU where the storage has device I/O (``gpu_direct_storage``): the chunk goes to its file
through cuFile (:mod:`.direct_io`), its checksum computed on the GPU (:mod:`.crc32c`), either
straight from the tensor where its data is one contiguous run of it (:class:`DeviceContiguous`;
the checksums of all such chunks computed in one batch before the writes start,
:func:`device_checksums`), or assembled in a chunk-sized device buffer first
(:class:`DeviceAssembled`). The files are the same as the host strategies write.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import crc32c
import numpy as np
import torch

from ...format.chunk_codec import edge_padding, prefix_elements
from ...format.layout import ArrayLayout, ChunkIndex
from ...planning.global_plan import ArrayTask, ChunkWrite, Source
from ...state.tensors import as_torch
from ..write_strategies import ChunkFile, Held
from .crc32c import device_crc32c
from .crc_batch import CrcBatch
from .streams import thread_stream

__all__ = ["DeviceAssembled", "DeviceContiguous", "choose_on_device", "device_body", "device_checksums"]


def device_body(
    layout: ArrayLayout, index: ChunkIndex, sources: list[Held]
) -> tuple[torch.Tensor, int] | None:
    """The chunk's data as bytes of the memory of the one GPU tensor it comes from, and its
    number of elements, if they are one contiguous run there and a prefix of the chunk (then it
    is written from there, its edge padding after it); ``None`` when it must be assembled first."""
    data = sources[0]
    valid = prefix_elements(layout, index)
    if len(sources) == 1 and isinstance(data, torch.Tensor) and data.is_contiguous() and valid is not None:
        return data.reshape(-1).view(torch.uint8), valid
    return None


def device_checksums(arrays: Iterable[ArrayTask], data_of: Callable[[Source], Held]) -> dict[ChunkWrite, int]:
    """The CRC32C of the data of every chunk written straight from a GPU tensor's memory (not
    yet of its edge padding), computed before the writes start, in one batch per device
    (:class:`~.crc_batch.CrcBatch`, the batcher reads use too). The caller's stream must have
    been synchronized: the batch runs on this thread's own stream."""
    batch = CrcBatch()
    checksums: dict[ChunkWrite, int] = {}
    for array in arrays:
        if array.layout.zstd_level is not None:
            continue
        for chunk in array.chunks:
            found = device_body(array.layout, chunk.index, [data_of(s) for s in chunk.sources])
            if found is not None:
                batch.add(found[0], partial(checksums.__setitem__, chunk))
    batch.run()
    return checksums


def choose_on_device(
    layout: ArrayLayout, chunk: ChunkWrite, sources: list[Held], checksums: dict[ChunkWrite, int]
) -> DeviceContiguous | DeviceAssembled:
    """The strategy for an uncompressed chunk with GPU data, where the storage has device I/O."""
    found = device_body(layout, chunk.index, sources)
    if found is None:
        return DEVICE_ASSEMBLED
    body, valid = found
    return DeviceContiguous(body, edge_padding(layout, valid), checksums.get(chunk))


def _device_of(chunk: ChunkFile) -> torch.device:
    return next(data.device for _, data in chunk.sources if isinstance(data, torch.Tensor))


def _write_from_device(chunk: ChunkFile, body: torch.Tensor, padding: bytes, body_crc: int | None) -> int:
    """Write ``body`` (device memory), then ``padding`` and the CRC32C, computed on the device
    (here, unless ``body_crc`` already is the CRC32C of ``body``); the CRC32C stored."""
    if body_crc is None:
        body_crc = device_crc32c(body)
    checksum = crc32c.crc32c(padding, body_crc)
    chunk.storage.write_file(chunk.path, [body, padding, struct.pack("<I", checksum)])
    return checksum


@dataclass(frozen=True, slots=True)
class DeviceContiguous:
    """The chunk's data is one contiguous run of one GPU tensor, a prefix of the chunk: written
    from the tensor's memory, its edge padding after it."""

    body: torch.Tensor
    """The chunk's data: the bytes of the tensor's memory (:func:`device_body`)."""
    padding: bytes
    """The edge padding after it (fill values; empty for a chunk inside the array)."""
    body_crc: int | None
    """The CRC32C of ``body``, from :func:`device_checksums`; ``None``: computed here."""

    def write(self, chunk: ChunkFile) -> int:
        with torch.cuda.stream(thread_stream(_device_of(chunk))):
            return _write_from_device(chunk, self.body, self.padding, self.body_crc)


class DeviceAssembled:
    """GPU data that is not one contiguous prefix of the chunk (several sources, a cut across
    rows, a non-contiguous tensor): assembled in a chunk-sized device buffer filled with the
    fill value (pieces received from other ranks copied in from the host), then written."""

    def write(self, chunk: ChunkFile) -> int:
        layout = chunk.layout
        device = _device_of(chunk)
        with torch.cuda.stream(thread_stream(device)):
            body = torch.empty(layout.chunk_nbytes, dtype=torch.uint8, device=device)
            fill = torch.frombuffer(bytearray(layout.dtype.fill_bytes()), dtype=torch.uint8).to(device)
            body.view(-1, layout.dtype.itemsize)[:] = fill
            typed = body.view(layout.dtype.torch_dtype).reshape(layout.chunk_shape)
            for source, part in chunk.sources:
                if isinstance(part, np.ndarray):  # a piece received from another rank
                    part = as_torch(np.ascontiguousarray(part), layout.dtype)
                typed[chunk.place(source)].copy_(part)
            return _write_from_device(chunk, body, b"", None)


DEVICE_ASSEMBLED = DeviceAssembled()
