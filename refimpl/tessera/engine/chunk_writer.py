"""A rank's part of a save after planning: move shared pieces, write chunks, make them durable.

This is the data side of ``tessera.save``; ``writer.py`` holds the protocol
around it (plan, claim, commit). What makes it fast:

- every chunk and ``zarr.json`` is a task on one thread pool, so a few huge
  tensors (many chunks each) and many small ones keep the disk equally busy;
- a chunk whose elements lie contiguously in a CPU tensor is written straight
  from the tensor's memory; its checksum is computed block by block as it is
  written (:func:`~tessera.format.chunk_codec.encode_chunk`);
- a chunk of a GPU tensor is copied into a pinned host buffer from a small
  pool, in the writing thread, so device-to-host copies overlap the writes and
  never need a host copy of the whole state;
- or, with ``gpu_direct``, it goes from device memory to its file through
  cuFile (:mod:`.gpu.direct_io`), its checksum computed on the GPU
  (:mod:`.gpu.crc32c`): straight from the tensor where the chunk is a
  contiguous run of it (the checksums of all such chunks in one batch before
  the writes start), else assembled in a chunk-sized device buffer first;
  compressed chunks still take the host path (zstd runs on the CPU);
- files are not fsynced one by one: the storage starts each file's writeback
  as soon as it is written and fsyncs them all at the end (``Storage.sync``).

Each chunk's CRC32C is recorded as it is written: :func:`write_rank` returns them
for the coordinator's chunk lists (spec R3.19), in the order of the rank plan.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable
from functools import partial

import crc32c
import numpy as np
import torch

from ..distributed.collective import Collective
from ..format.chunk_codec import edge_padding, encode_chunk, prefix_elements
from ..format.dtypes import DType, dtype_by_name
from ..format.layout import ArrayLayout, chunk_key
from ..format.strict_json import dumps
from ..planning.global_plan import ArrayTask, ChunkWrite, RankPlan, Source
from ..planning.local_plan import LocalPlan, piece_data
from ..state.tensors import as_numpy, as_torch
from ..storage.base import Storage
from ..util.parallel import run_all
from ..util.progress import Progress
from .gpu.crc32c import device_crc32c, device_crc32c_many
from .gpu.streams import thread_stream
from .staging import StagingPool, shared_pool

__all__ = ["write_rank"]

GROUP_JSON = dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})

Held = np.ndarray | torch.Tensor
"""A region of a piece where it lives: a NumPy view of CPU memory, or a tensor on a GPU."""


def write_rank(
    plan: RankPlan,
    local: LocalPlan,
    storage: Storage,
    collective: Collective,
    threads: int | None,
    progress: bool,
) -> bytes:
    """Move shared pieces to their owners, then write this rank's documents and chunks, durably;
    where ``storage`` has device I/O (GPU-direct), chunks of GPU tensors through it.

    Returns the CRC32C of every chunk written (the value stored in its last 4 bytes), as
    little-endian ``uint32`` in the order of ``plan.arrays`` and their ``chunks``: 4 bytes per
    chunk for the coordinator's chunk lists (:mod:`.chunk_crcs` reads them)."""
    gpu_direct = storage.device_io is not None
    dtypes = {s: a.layout.dtype for a in plan.arrays for c in a.chunks for s in c.sources}
    incoming = [(t, dtypes[t.source]) for t in plan.receives]
    moving_in = {t.source for t in plan.receives}
    used = {(s.leaf, s.piece) for s in [*dtypes, *(t.source for t in plan.sends)] if s not in moving_in}
    dtype_of = {leaf: dtype_by_name(local.arrays[leaf].dtype) for leaf, _ in used}
    pieces = {(leaf, piece): piece_data(local.pieces[leaf][piece], dtype_of[leaf]) for leaf, piece in used}

    for device in {p.device for p in pieces.values() if isinstance(p, torch.Tensor)}:
        # The I/O threads read GPU memory on streams of their own: what the caller queued on its
        # stream (the optimizer step that produced the tensors) must have finished.
        torch.cuda.current_stream(device).synchronize()

    def held(source: Source) -> Held:
        """The source region in this rank's own memory (a view, on the piece's device)."""
        box = local.pieces[source.leaf][source.piece].box
        return pieces[source.leaf, source.piece][source.region.relative_to(box.offset)]

    received_bytes = collective.exchange(
        [(t.peer, t.tag, _on_host(held(t.source), dtype_of[t.source.leaf])) for t in plan.sends],
        [(t.peer, t.tag, t.source.region.volume * dtype.itemsize) for t, dtype in incoming],
        "moving shared chunks' pieces to their owners",
    )
    received: dict[Source, Held] = {
        t.source: raw.view(dtype.numpy_dtype).reshape(t.source.region.shape)
        for (t, dtype), raw in zip(incoming, received_bytes, strict=True)
    }

    def data_of(source: Source) -> Held:
        return received[source] if source in received else held(source)

    checksums = _device_checksums(plan.arrays, data_of) if gpu_direct else {}
    staging = shared_pool()
    crcs = np.zeros(sum(len(a.chunks) for a in plan.arrays), dtype="<u4")
    tasks: list[Callable[[], None]] = [
        _write_json(storage, f"{g}/zarr.json", GROUP_JSON) for g in plan.groups
    ]
    with Progress(plan.nbytes, "saving", progress and collective.rank == 0) as bar:
        position = 0
        for array in plan.arrays:
            if array.write_metadata:
                tasks.append(_write_json(storage, f"{array.path}/zarr.json", dumps(array.layout.zarr_json())))
            for chunk in array.chunks:
                record = partial(crcs.__setitem__, position)
                tasks.append(
                    _write_chunk(
                        storage, array, chunk, data_of, staging, bar, gpu_direct, checksums.get(chunk), record
                    )
                )
                position += 1
        run_all(tasks, threads)
    storage.sync()
    return crcs.tobytes()


def _device_body(layout: ArrayLayout, chunk: ChunkWrite, sources: list[Held]) -> torch.Tensor | None:
    """The chunk's data as bytes of the memory of the one GPU tensor it comes from, if they are
    one contiguous run there (then it is written from there, its edge padding after it);
    ``None`` when the chunk must be assembled first."""
    data = sources[0]
    if (
        len(sources) == 1
        and isinstance(data, torch.Tensor)
        and data.is_contiguous()
        and prefix_elements(layout, chunk.index) is not None
    ):
        return data.reshape(-1).view(torch.uint8)
    return None


def _device_checksums(
    arrays: Iterable[ArrayTask], data_of: Callable[[Source], Held]
) -> dict[ChunkWrite, int]:
    """The CRC32C of the data of every chunk written straight from a GPU tensor's memory (not
    yet of its edge padding), computed before the writes start in one batch per device. One
    launch and wait per chunk in the writing threads cost each write about 120 µs, and the
    threads contended for the GIL around them."""
    bodies: dict[torch.device, list[tuple[ChunkWrite, torch.Tensor]]] = {}
    for array in arrays:
        if array.layout.zstd_level is not None:
            continue
        for chunk in array.chunks:
            body = _device_body(array.layout, chunk, [data_of(s) for s in chunk.sources])
            if body is not None:
                bodies.setdefault(body.device, []).append((chunk, body))
    checksums: dict[ChunkWrite, int] = {}
    for listed in bodies.values():
        crcs = device_crc32c_many([body for _, body in listed])
        checksums.update(zip([chunk for chunk, _ in listed], crcs, strict=True))
    return checksums


def _on_host(region: Held, dtype: DType) -> np.ndarray:
    """A region to send through the collective, which takes host arrays."""
    if isinstance(region, np.ndarray):
        return region
    return as_numpy(region.contiguous().cpu(), dtype)


def _write_json(storage: Storage, path: str, data: bytes) -> Callable[[], None]:
    return lambda: storage.write_file(path, [data])


def _write_chunk(
    storage: Storage,
    array: ArrayTask,
    chunk: ChunkWrite,
    data_of: Callable[[Source], Held],
    staging: StagingPool,
    bar: Progress,
    gpu_direct: bool,
    body_crc: int | None,
    record: Callable[[int], None],
) -> Callable[[], None]:
    """The task that writes one chunk; GPU data goes through ``staging``, or with ``gpu_direct``
    straight from device memory (unless the chunk is compressed: zstd runs on the CPU).
    ``body_crc`` is the CRC32C of its data where :func:`_device_checksums` computed it;
    ``record`` is given the CRC32C the chunk file stores."""
    layout = array.layout
    path = f"{array.path}/{chunk_key(chunk.index)}"

    def write(data: np.ndarray) -> None:
        storage.write_file(path, encode_chunk(data, layout, chunk.index, record))
        bar.advance(data.nbytes)

    def task() -> None:
        bounds = layout.chunk_region(chunk.index)
        sources = [(s, data_of(s)) for s in chunk.sources]
        if len(sources) == 1 and isinstance(sources[0][1], np.ndarray):
            write(sources[0][1])
            return
        shape = [b - a for a, b in bounds]
        nbytes = math.prod(shape) * layout.dtype.itemsize
        on_gpu = any(isinstance(data, torch.Tensor) for _, data in sources)
        if on_gpu and gpu_direct and layout.zstd_level is None:
            record(_write_from_device(storage, path, layout, chunk, sources, body_crc))
            bar.advance(nbytes)
            return
        if not on_gpu:
            assembled = np.empty(shape, dtype=layout.dtype.numpy_dtype)
            for source, data in sources:
                assembled[source.region.relative_to(tuple(a for a, _ in bounds))] = data
            write(assembled)
            return
        with staging.buffer(nbytes) as buffer:
            typed = buffer[:nbytes].view(layout.dtype.torch_dtype).reshape(shape)
            host = as_numpy(typed, layout.dtype)
            for source, data in sources:
                where = source.region.relative_to(tuple(a for a, _ in bounds))
                if isinstance(data, np.ndarray):
                    host[where] = data
                else:
                    typed[where].copy_(data)  # device to pinned host: waits for the copy
            write(host)

    return task


def _write_from_device(
    storage: Storage,
    path: str,
    layout: ArrayLayout,
    chunk: ChunkWrite,
    sources: list[tuple[Source, Held]],
    body_crc: int | None,
) -> int:
    """Write a chunk of GPU data from device memory, its CRC32C computed on the device (here,
    unless ``body_crc`` already is the CRC32C of its data); returns the CRC32C it stored."""
    device = next(data.device for _, data in sources if isinstance(data, torch.Tensor))
    with torch.cuda.stream(thread_stream(device)):
        body = _device_body(layout, chunk, [data for _, data in sources])
        padding = b""
        if body is not None:
            valid = prefix_elements(layout, chunk.index)
            assert valid is not None
            padding = edge_padding(layout, valid)
        else:
            bounds = layout.chunk_region(chunk.index)
            body = torch.empty(layout.chunk_nbytes, dtype=torch.uint8, device=device)
            fill = torch.frombuffer(bytearray(layout.dtype.fill_bytes()), dtype=torch.uint8).to(device)
            body.view(-1, layout.dtype.itemsize)[:] = fill
            typed = body.view(layout.dtype.torch_dtype).reshape(layout.chunk_shape)
            for source, part in sources:
                where = source.region.relative_to(tuple(a for a, _ in bounds))
                if isinstance(part, np.ndarray):  # a piece received from another rank
                    part = as_torch(np.ascontiguousarray(part), layout.dtype)
                typed[where].copy_(part)
        if body_crc is None:
            body_crc = device_crc32c(body)
        checksum = crc32c.crc32c(padding, body_crc)
        storage.write_file(path, [body, padding, struct.pack("<I", checksum)])
    return checksum
