"""A rank's chunk writes after planning: every document and chunk it owns, made durable.

This is the data side of ``tessera.save``; :mod:`tessera.api.save` holds the protocol around it
(plan, claim, commit) and :mod:`tessera.distributed.piece_exchange` hands it the chunks' data
(the pieces of shared chunks already moved between ranks). What makes it fast:

- every chunk and ``zarr.json`` is a task on one thread pool, so a few huge
  tensors (many chunks each) and many small ones keep the disk equally busy;
- each chunk's way to its file is a strategy chosen once, when the tasks are listed
  (:func:`choose`): straight from host memory, assembled on the host, staged through
  pinned host buffers (:mod:`.write_strategies`), or, where the storage has device I/O,
  from device memory (:mod:`.gpu.device_writes`); each checksums the bytes as they go;
- files are not fsynced one by one: the storage starts each file's writeback
  as soon as it is written and fsyncs them all at the end (``Storage.sync``).

Each chunk's CRC32C is recorded as it is written: :func:`write_chunks` returns them
for the coordinator's chunk lists (spec R3.19), in the order of the rank plan.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from ..format.layout import ArrayLayout, chunk_key
from ..format.strict_json import dumps
from ..planning.global_plan import ChunkWrite, RankPlan, Source
from ..storage.base import Storage
from ..util.parallel import run_all
from ..util.progress import Progress
from .gpu.device_writes import choose_on_device, device_checksums
from .write_strategies import HOST_ASSEMBLED, HOST_MEMORY, PINNED_STAGED, ChunkFile, Held, WriteStrategy

__all__ = ["Held", "SourceData", "choose", "write_chunks"]

GROUP_JSON = dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})

SourceData = Callable[[Source], Held]
"""The data of a part of a chunk (a region of one rank's piece), where it lives: what
:func:`~tessera.distributed.piece_exchange.exchange_pieces` returns. GPU tensors must be
readable from any stream (the caller's work on them finished)."""


def write_chunks(
    plan: RankPlan, data_of: SourceData, storage: Storage, threads: int | None, progress: bool
) -> bytes:
    """Write this rank's group and array documents and chunks (``plan``), durably; the chunks of
    GPU tensors from device memory where ``storage`` has device I/O (GPU-direct).

    Returns the CRC32C of every chunk written (the value stored in its last 4 bytes), as
    little-endian ``uint32`` in the order of ``plan.arrays`` and their ``chunks``: 4 bytes per
    chunk for the coordinator's chunk lists (:mod:`tessera.planning.chunk_crcs` reads them)."""
    device_io = storage.device_io is not None
    checksums = device_checksums(plan.arrays, data_of) if device_io else {}
    crcs = np.zeros(sum(len(a.chunks) for a in plan.arrays), dtype="<u4")
    tasks: list[Callable[[], None]] = [
        _write_json(storage, f"{g}/zarr.json", GROUP_JSON) for g in plan.groups
    ]
    with Progress(plan.nbytes, "saving", progress) as bar:
        position = 0
        for array in plan.arrays:
            if array.write_metadata:
                tasks.append(_write_json(storage, f"{array.path}/zarr.json", dumps(array.layout.zarr_json())))
            for chunk in array.chunks:
                sources = tuple((s, data_of(s)) for s in chunk.sources)
                path = f"{array.path}/{chunk_key(chunk.index)}"
                target = ChunkFile(storage, path, array.layout, chunk.index, sources)
                strategy = choose(array.layout, chunk, [d for _, d in sources], device_io, checksums)
                tasks.append(
                    partial(_write_chunk, strategy, target, partial(crcs.__setitem__, position), bar)
                )
                position += 1
        run_all(tasks, threads or storage.concurrency)
    storage.sync()
    return crcs.tobytes()


def choose(
    layout: ArrayLayout,
    chunk: ChunkWrite,
    sources: list[Held],
    device_io: bool,
    checksums: dict[ChunkWrite, int],
) -> WriteStrategy:
    """How the chunk gets to its file, from where its ``sources`` live: one host array is
    encoded from its memory; host arrays only are assembled on the host; GPU data goes from
    device memory where the storage has ``device_io`` and the chunk is not compressed (zstd runs
    on the CPU), else through pinned host buffers. ``checksums``: :func:`device_checksums`."""
    if len(sources) == 1 and isinstance(sources[0], np.ndarray):
        return HOST_MEMORY
    if not any(isinstance(data, torch.Tensor) for data in sources):
        return HOST_ASSEMBLED
    if device_io and layout.zstd_level is None:
        return choose_on_device(layout, chunk, sources, checksums)
    return PINNED_STAGED


def _write_json(storage: Storage, path: str, data: bytes) -> Callable[[], None]:
    return lambda: storage.write_file(path, [data])


def _write_chunk(
    strategy: WriteStrategy, chunk: ChunkFile, record: Callable[[int], None], bar: Progress
) -> None:
    record(strategy.write(chunk))
    bar.advance(chunk.nbytes)
