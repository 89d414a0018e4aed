"""How one chunk gets from its file into the destinations that need it: five strategies, small
objects each with one way of reading, chosen for each chunk among those of the read pass.

- :class:`HostInPlace`: the chunk's bytes form one contiguous run of a host destination (the
  common case: a whole chunk into a C-contiguous tensor): read straight into it, block by block,
  each block's CRC32C computed right after the block arrived, while it is still in the CPU cache.
  The size of the open file is checked before any byte is read.
- :class:`StagedInPlace`: the same run in GPU memory: each block through a small pool of pinned
  host buffers (:mod:`.staging`), copied asynchronously on a CUDA stream of the handle's own.
- :class:`DirectInPlace`: the same run in GPU memory, read straight into it by the storage's
  device I/O (GPU-direct); its CRC is left to the pass's :class:`~.gpu.crc_batch.CrcBatch`.
- :class:`DirectWhole`: a raw chunk that is not such a run, for GPU destinations on one device:
  read whole into GPU memory, checksummed there, each destination's part copied on the device.
- :class:`WholeChunk`: any other chunk (compressed, cut by the region, shared by several
  requests, or landing in a strided destination): read whole, checked and decoded on the host,
  and each destination's part copied from it.

:class:`ReadStrategies` holds the strategies of one pass in order of preference, the GPU-direct
ones only where the storage has device I/O; each chunk takes the first that applies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import crc32c
import torch

from ..format.chunk_codec import check_crc, prefix_elements
from ..format.layout import CRC32C_SIZE, ChunkIndex, chunk_key
from ..format.manifest import listed_chunk_crc
from ..storage.base import ReadNext
from .array_checks import ArrayEntry
from .chunk_reads import ChunkFiles
from .gpu.crc32c import crc32c_combine, device_crc32c
from .gpu.crc_batch import CrcBatch
from .gpu.streams import thread_stream
from .read_targets import ReadTarget
from .regions import within

__all__ = [
    "BLOCK_BYTES",
    "ChunkRead",
    "DirectInPlace",
    "DirectWhole",
    "HostInPlace",
    "ReadStrategies",
    "ReadStrategy",
    "StagedInPlace",
    "WholeChunk",
]

BLOCK_BYTES = 8 * 2**20
"""Bytes read and checksummed at a time: large enough for one request to keep the disk busy,
small enough to still sit in the CPU cache when the checksum runs over it."""


def read_tail(read: ReadNext, padding: int, checksum: int) -> tuple[int, bytes]:
    """Read the last ``padding`` bytes of a chunk's data (its edge padding) and then its stored
    CRC: the CRC32C continued from ``checksum`` over the padding, and the stored CRC."""
    scratch = memoryview(bytearray(min(padding, BLOCK_BYTES)))
    for start in range(0, padding, BLOCK_BYTES):
        block = scratch[: min(BLOCK_BYTES, padding - start)]
        read(block)
        checksum = crc32c.crc32c(block, checksum)
    stored = bytearray(CRC32C_SIZE)
    read(memoryview(stored))
    return checksum, bytes(stored)


@dataclass(frozen=True, slots=True)
class ChunkRead:
    """One chunk of a pass and every target that needs it (read once, copied into each)."""

    targets: Sequence[ReadTarget]
    run: torch.Tensor | None
    """Where the chunk is raw, whole inside its one target's region, and its data one contiguous
    run of that destination (the chunk's bytes are that run, then edge padding): the run."""

    @staticmethod
    def of(targets: Sequence[ReadTarget]) -> ChunkRead:
        run = None
        if len(targets) == 1:
            target = targets[0]
            layout = target.entry.layout
            inner, _ = target.overlap()
            part = target.part()
            if (
                inner == layout.chunk_region(target.index)
                and layout.zstd_level is None
                and prefix_elements(layout, target.index) is not None
                and part.is_contiguous()
            ):
                run = part
        return ChunkRead(targets, run)

    @property
    def entry(self) -> ArrayEntry:
        return self.targets[0].entry

    @property
    def index(self) -> ChunkIndex:
        return self.targets[0].index

    @property
    def path(self) -> str:
        return f"{self.entry.path}/{chunk_key(self.index)}"

    def direct(self) -> bool:
        """Whether the chunk can go straight from its file to GPU memory (given device I/O): an
        uncompressed chunk, and every destination a plain tensor on one GPU."""
        devices = {t.dst.device for t in self.targets}
        return (
            self.entry.layout.zstd_level is None
            and len(devices) == 1
            and next(iter(devices)).type == "cuda"
            and not any(t.dst.is_conj() or t.dst.is_neg() for t in self.targets)
        )


class ReadStrategy(ABC):
    """One way of reading a chunk into its targets."""

    def __init__(self, files: ChunkFiles) -> None:
        self.files = files

    @abstractmethod
    def applies(self, chunk: ChunkRead) -> bool:
        """Whether this strategy can read ``chunk``."""

    @abstractmethod
    def task(self, chunk: ChunkRead) -> Callable[[], None]:
        """The task that reads ``chunk`` into its targets (run on an I/O thread)."""


class HostInPlace(ReadStrategy):
    """Stream a raw chunk into its run of host memory, each block checksummed as it arrives."""

    def applies(self, chunk: ChunkRead) -> bool:
        return chunk.run is not None and chunk.targets[0].copies is None

    def task(self, chunk: ChunkRead) -> Callable[[], None]:
        assert chunk.run is not None
        flat = chunk.run.reshape(-1).view(torch.uint8)
        entry, index = chunk.entry, chunk.index
        padding = entry.layout.chunk_nbytes - flat.numel()

        def fill(size: int | None, read: ReadNext) -> None:
            self.files.check_file(entry, index, size)
            checksum = 0
            memory = flat.numpy().data
            for start in range(0, flat.numel(), BLOCK_BYTES):
                block = memory[start : start + BLOCK_BYTES]
                read(block)
                checksum = crc32c.crc32c(block, checksum)
            check_crc(
                *read_tail(read, padding, checksum),
                self.files.where(entry, index),
                listed_chunk_crc(entry, index),
            )

        return partial(self.files.storage.read_into, chunk.path, 0, fill)


class StagedInPlace(ReadStrategy):
    """Stream a raw chunk into its run of device memory: each block into a staging buffer,
    checksummed there, then copied on asynchronously. The edge padding after the data goes
    through one small scratch buffer, then the CRC."""

    def applies(self, chunk: ChunkRead) -> bool:
        run = chunk.run
        return (
            run is not None
            and chunk.targets[0].copies is not None
            and run.device.type != "cpu"
            and not (run.is_conj() or run.is_neg())
        )

    def task(self, chunk: ChunkRead) -> Callable[[], None]:
        assert chunk.run is not None
        copies = chunk.targets[0].copies
        assert copies is not None
        part = chunk.run
        flat = part.reshape(-1).view(torch.uint8)
        nbytes = flat.numel()
        entry, index = chunk.entry, chunk.index
        padding = entry.layout.chunk_nbytes - nbytes

        def fill(size: int | None, read: ReadNext) -> None:
            self.files.check_file(entry, index, size)
            checksum = 0
            stream = copies.stream(part.device)
            for start in range(0, nbytes, BLOCK_BYTES):
                length = min(BLOCK_BYTES, nbytes - start)
                with copies.pool.buffer(length, stream) as host:
                    block = host.numpy().data
                    read(block)
                    checksum = crc32c.crc32c(block, checksum)
                    copies.send(flat[start : start + length], host, stream)
            check_crc(
                *read_tail(read, padding, checksum),
                self.files.where(entry, index),
                listed_chunk_crc(entry, index),
            )

        return partial(self.files.storage.read_into, chunk.path, 0, fill)


def _check_device_crc(
    padding_crc: int, padding: int, stored: bytes, where: str, listed: int | None, crc: int
) -> None:
    """Check a chunk whose data's CRC ``crc`` came from the GPU batch, its padding's from the host."""
    if padding:
        crc = crc32c_combine(crc, padding_crc, padding)
    check_crc(crc, stored, where, listed)


class DirectInPlace(ReadStrategy):
    """Read a raw chunk's data straight into its run of GPU memory and, while it lands, the edge
    padding after it and the CRC through host memory; the data is left to the pass's
    :class:`CrcBatch`, checked on the GPU with the pass's other chunks before the pass returns."""

    def __init__(self, files: ChunkFiles, batch: CrcBatch) -> None:
        super().__init__(files)
        self.batch = batch

    def applies(self, chunk: ChunkRead) -> bool:
        return chunk.run is not None and chunk.direct()

    def task(self, chunk: ChunkRead) -> Callable[[], None]:
        assert chunk.run is not None
        flat = chunk.run.reshape(-1).view(torch.uint8)
        entry, index = chunk.entry, chunk.index
        padding = entry.layout.chunk_nbytes - flat.numel()

        def fill(size: int | None, read: ReadNext) -> None:
            self.files.check_file(entry, index, size)
            read(flat)
            padding_crc, stored = read_tail(read, padding, 0)
            where = self.files.where(entry, index)
            listed = listed_chunk_crc(entry, index)
            self.batch.add(flat, partial(_check_device_crc, padding_crc, padding, stored, where, listed))

        return partial(self.files.storage.read_into, chunk.path, 0, fill)


class DirectWhole(ReadStrategy):
    """Read a raw chunk whole into GPU memory, checksum it there, then copy each target's part
    out of it on the device."""

    def applies(self, chunk: ChunkRead) -> bool:
        return chunk.direct()

    def task(self, chunk: ChunkRead) -> Callable[[], None]:
        return partial(self._read, chunk)

    def _read(self, chunk: ChunkRead) -> None:
        entry, index, targets = chunk.entry, chunk.index, chunk.targets
        layout = entry.layout
        stream = thread_stream(targets[0].dst.device)
        with torch.cuda.stream(stream):
            scratch = torch.empty(layout.chunk_nbytes, dtype=torch.uint8, device=stream.device)
            stored: list[bytes] = []  # the CRC, read beside the data

            def fill(size: int | None, read: ReadNext) -> None:
                self.files.check_file(entry, index, size)
                read(scratch)
                stored.append(read_tail(read, 0, 0)[1])

            self.files.storage.read_into(chunk.path, 0, fill)
            where = self.files.where(entry, index)
            check_crc(device_crc32c(scratch), stored[0], where, listed_chunk_crc(entry, index))
            decoded = scratch.view(layout.dtype.torch_dtype).reshape(layout.chunk_shape)
            region = layout.chunk_region(index)
            for target in targets:
                inner, _ = target.overlap()
                target.part().copy_(decoded[within(inner, region)])
        stream.synchronize()  # the destinations are complete when the read returns


class WholeChunk(ReadStrategy):
    """Read the chunk whole on the host (checked and decoded), then copy each target's part out."""

    def applies(self, chunk: ChunkRead) -> bool:
        return True

    def task(self, chunk: ChunkRead) -> Callable[[], None]:
        targets = chunk.targets

        def gathered() -> None:
            decoded = self.files.read_chunk(targets[0].entry, targets[0].index)
            for target in targets:
                target.fill_from(decoded)

        return gathered


class ReadStrategies:
    """The strategies of one read pass, in order of preference, chosen once for the pass: the
    GPU-direct ones only where the storage has device I/O (``batch`` then collects the CRCs
    that :class:`DirectInPlace` leaves to the GPU; the pass runs it when its reads are done)."""

    def __init__(self, files: ChunkFiles, batch: CrcBatch | None) -> None:
        staged: list[ReadStrategy] = [HostInPlace(files), StagedInPlace(files)]
        if batch is None:
            self._order = [*staged, WholeChunk(files)]
        else:
            self._order = [DirectInPlace(files, batch), *staged, DirectWhole(files), WholeChunk(files)]

    def task(self, targets: Sequence[ReadTarget]) -> Callable[[], None]:
        """The task that reads the chunk of ``targets`` (one chunk, every target that needs it)."""
        chunk = ChunkRead.of(targets)
        return next(s for s in self._order if s.applies(chunk)).task(chunk)
