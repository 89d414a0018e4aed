"""The global plan: from every rank's local plan to one writer per chunk (spec R16.3, R16.4).

The coordinator makes it from the ranks' metadata alone. For each array it
checks that the ranks agree and that the main copies tile the tensor, picks
the chunk grid, and gives every chunk exactly one owner: a rank that holds the
whole chunk if any does (replicas are spread so that the least-loaded holder
writes), else the rank that holds most of it, which then receives the other
pieces from their holders. The result says, for each rank, which chunks and
``zarr.json`` documents it writes and which pieces it sends and receives.
A plan depends on the layout only, so it can be reused by later saves.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidKeyError, ShardingError, TensorMismatchError
from ..format.dtypes import dtype_by_name
from ..format.keys import Key, parent_paths
from ..format.layout import ArrayLayout, ChunkIndex
from ..format.manifest import ObjectEntry, TensorEntry
from ..state.boxes import Box, corners
from .chunk_grid import chunk_shape_for
from .coverage import MainClaim, check_coverage
from .local_plan import Cell, LeafSpec
from .options import SaveOptions

__all__ = ["ArrayTask", "ChunkWrite", "GlobalPlan", "RankPlan", "Source", "Transfer", "make_global_plan"]


@dataclass(frozen=True, slots=True)
class Source:
    """A region of a chunk and the piece that holds it: ``pieces[leaf][piece]`` of ``rank``."""

    rank: int
    leaf: int
    piece: int
    region: Box


@dataclass(frozen=True, slots=True)
class ChunkWrite:
    index: ChunkIndex
    sources: tuple[Source, ...]
    """Regions that tile the chunk's part of the array; one, unless pieces were moved here."""


@dataclass(frozen=True, slots=True)
class ArrayTask:
    path: str
    layout: ArrayLayout
    write_metadata: bool
    """This rank writes the array's ``zarr.json`` (exactly one rank does)."""
    chunks: tuple[ChunkWrite, ...]


@dataclass(frozen=True, slots=True)
class Transfer:
    """A piece region moved between two ranks; ``tag`` orders and matches the pair's messages."""

    peer: int
    source: Source
    tag: int


@dataclass(frozen=True, slots=True)
class RankPlan:
    arrays: tuple[ArrayTask, ...]
    groups: tuple[str, ...]
    sends: tuple[Transfer, ...]
    receives: tuple[Transfer, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of array data this rank writes."""
        return sum(
            s.region.volume * a.layout.dtype.itemsize
            for a in self.arrays
            for c in a.chunks
            for s in c.sources
        )


@dataclass(frozen=True, slots=True)
class GlobalPlan:
    entries: dict[str, TensorEntry | ObjectEntry]
    """Every array by path."""
    cells: tuple[tuple[Cell, int], ...]
    """Grid cells of sharded objects stored as arrays, with the rank that holds each."""
    ranks: tuple[RankPlan, ...]
    loads: tuple[int, ...]
    """Bytes each rank writes: how well the plan balances."""


def make_global_plan(local: Sequence[Sequence[LeafSpec]], options: SaveOptions) -> GlobalPlan:
    """Check the ranks' array leaves against each other and assign every chunk one owner."""
    with _collector_paused():
        return _make_global_plan(local, options)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Planning a large layout allocates about a million small objects (pieces, sources, chunk
    writes), none of them in a reference cycle; meanwhile the cyclic garbage collector would walk
    the growing heap again and again (a third of the time at 1,024 ranks). It waits instead."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_global_plan(local: Sequence[Sequence[LeafSpec]], options: SaveOptions) -> GlobalPlan:
    world = len(local)
    holders_by_path: dict[str, list[tuple[int, int, LeafSpec]]] = {}
    paths: dict[Key, tuple[str, tuple[type, ...]]] = {}
    boxes: dict[_Shard, list[Box]] = {}
    for rank, specs in enumerate(local):
        for leaf, spec in enumerate(specs):
            holders_by_path.setdefault(_path(spec, paths), []).append((rank, leaf, spec))
    loads = [0] * world
    tasks: list[list[ArrayTask]] = [[] for _ in range(world)]
    moves: list[tuple[int, int, Source]] = []
    entries: dict[str, TensorEntry | ObjectEntry] = {}
    cells: list[tuple[Cell, int]] = []
    for path, holders in holders_by_path.items():
        entry, pieces, mains = _array(path, holders, options, boxes)
        entries[path] = entry
        cells.extend((spec.cell, rank) for rank, _, spec in holders if spec.cell is not None)
        per_rank = _assign_chunks(path, entry, pieces, mains, loads, moves)
        metadata_rank = min(per_rank, key=lambda r: (r != holders[0][0], r)) if per_rank else holders[0][0]
        for rank in sorted(set(per_rank) | {metadata_rank}):
            tasks[rank].append(
                ArrayTask(path, entry.layout, rank == metadata_rank, tuple(per_rank.get(rank, ())))
            )
    unknown = sorted(set(options.chunk_shapes) - set(entries))
    if unknown:
        raise InvalidKeyError(f"chunk_shapes names {unknown}, which the state dict holds no array at")
    groups = tuple(sorted({g for path in entries for g in parent_paths(path)}))
    sends: list[list[Transfer]] = [[] for _ in range(world)]
    receives: list[list[Transfer]] = [[] for _ in range(world)]
    for tag, (src, dst, source) in enumerate(moves):
        sends[src].append(Transfer(dst, source, tag))
        receives[dst].append(Transfer(src, source, tag))
    ranks = tuple(
        RankPlan(tuple(tasks[r]), groups if r == 0 else (), tuple(sends[r]), tuple(receives[r]))
        for r in range(world)
    )
    return GlobalPlan(entries, tuple(cells), ranks, tuple(loads))


def _path(spec: LeafSpec, known: dict[Key, tuple[str, tuple[type, ...]]]) -> str:
    """``spec.path``, encoded once per key: every rank that holds a key sends it again.

    The components' types are part of the match, since ``1``, ``1.0`` and ``True`` are equal
    as dict keys but not as path segments (the last two are refused)."""
    types = tuple(map(type, spec.key))
    hit = known.get(spec.key)
    if hit is not None and hit[1] == types:
        return hit[0]
    path = spec.path
    known.setdefault(spec.key, (path, types))
    return path


_Held = tuple[int, int, int, Box]
"""``(rank, leaf, piece index, box)`` of one piece."""


_Shard = tuple[tuple[int, ...], tuple[int, ...], "tuple[int, int] | None"]
"""``(offset, box shape, flat range)`` of an extent."""


def _array(
    path: str,
    holders: list[tuple[int, int, LeafSpec]],
    options: SaveOptions,
    boxes_of: dict[_Shard, list[Box]],
) -> tuple[TensorEntry | ObjectEntry, list[_Held], list[_Held]]:
    """The array's entry, every piece that holds part of it, and the main copies among them.

    ``boxes_of`` remembers each extent's boxes across arrays: a rank holds the same flat range
    of every optimizer state of a parameter, and the same box of every DP replica."""
    first_rank, _, first = holders[0]
    theirs = (first.kind, first.dtype, first.shape, first.tag, first.sharded)
    for rank, _, spec in holders[1:]:
        if (spec.kind, spec.dtype, spec.shape, spec.tag, spec.sharded) != theirs:
            raise ShardingError(
                f"{path}: ranks disagree: rank {first_rank} holds {_describe(first)}, "
                f"rank {rank} {_describe(spec)}"
            )
    dtype = dtype_by_name(first.dtype)
    pieces: list[_Held] = []
    mains: list[_Held] = []
    shards: list[Box] = []
    if first.sharded:
        claims: list[MainClaim] = []
        for rank, leaf, spec in holders:
            index = 0
            for extent in spec.extents:
                main = extent.replica_id == 0
                shard = (extent.offset, extent.shape, extent.flat_range)
                if main:
                    claims.append((*shard, rank))
                boxes = boxes_of.get(shard)
                if boxes is None:
                    boxes = boxes_of[shard] = [box for box, _ in extent.boxes()]
                for box in boxes:
                    held = (rank, leaf, index, box)
                    pieces.append(held)
                    if main:
                        mains.append(held)
                    index += 1
        shards = check_coverage(path, first.shape, claims)
    else:
        box = Box((0,) * len(first.shape), first.shape)
        if box.volume:
            # Copies of a sharded object's cell may differ (per-rank RNG states): only the main
            # copy is stored (R16.5). Plain tensors are replicas: any holder may write them.
            # A cell with no main copy at all is refused with the grid check (contents.py).
            writers = [h for h in holders if h[2].cell is None or h[2].cell.main] or holders
            pieces = [(rank, leaf, 0, box) for rank, leaf, _ in writers]
            mains = pieces[:1]
    sizes = (
        [c[2][1] - c[2][0] if c[2] is not None else math.prod(c[1]) for c in claims] if first.sharded else []
    )
    chunk_shape = _chunk_shape_asked(path, first.shape, options) or chunk_shape_for(
        first.shape,
        dtype.itemsize,
        shards,
        [m[3] for m in mains],
        int(np.median([n for n in sizes if n])) if any(sizes) else 0,
        options.chunk_bytes,
    )
    zstd_level = options.compression.level if options.compression is not None else None
    layout = ArrayLayout(dtype, first.shape, chunk_shape, zstd_level)
    entry: TensorEntry | ObjectEntry
    if first.kind == "tensor":
        entry = TensorEntry(first.key, layout, "numpy" if first.tag == "numpy" else "torch")
    else:
        entry = ObjectEntry(first.key, layout, "pickle" if first.tag == "pickle" else "bytes")
    return entry, pieces, mains


def _chunk_shape_asked(path: str, shape: tuple[int, ...], options: SaveOptions) -> tuple[int, ...] | None:
    """The caller's chunk shape for ``path`` (``SaveOptions.chunk_shapes``), checked, or ``None``."""
    asked = options.chunk_shapes.get(path)
    if asked is None:
        return None
    asked = tuple(asked)
    if len(asked) != len(shape) or not all(type(c) is int and c >= 1 for c in asked):
        raise TensorMismatchError(
            f"{path}: chunk shape {list(asked)} must have one integer >= 1 "
            f"per dimension of shape {list(shape)}"
        )
    return asked


def _describe(spec: LeafSpec) -> str:
    kind = f"a sharded {spec.kind}" if spec.sharded else f"a {spec.kind}"
    return f"{kind} of {spec.dtype} {list(spec.shape)} ({spec.tag})"


def _assign_chunks(
    path: str,
    entry: TensorEntry | ObjectEntry,
    pieces: list[_Held],
    mains: list[_Held],
    loads: list[int],
    moves: list[tuple[int, int, Source]],
) -> dict[int, list[ChunkWrite]]:
    """Give each chunk of the array one owner; record the pieces that must move to it.

    Which boxes hold each chunk whole, and which parts of the main copies make up the
    others, is found for a block of chunks at a time with NumPy; only the choice of owners
    (which depends on the loads so far) runs chunk by chunk. ``mains`` are items of
    ``pieces`` (the same objects, as ``_array`` makes them)."""
    layout = entry.layout
    itemsize = layout.dtype.itemsize
    holders_of: dict[tuple[tuple[int, ...], tuple[int, ...]], list[_Held]] = {}
    for held in pieces:
        holders_of.setdefault((held[3].offset, held[3].shape), []).append(held)
    replicas: dict[int, list[_Held]] = {}
    main_ids = {id(m) for m in mains}
    for held in pieces:
        if id(held) not in main_ids:
            replicas.setdefault(held[0], []).append(held)
    groups = list(holders_of.values())
    starts, stops = corners(list(holders_of))
    main_starts, main_stops = corners([(m[3].offset, m[3].shape) for m in mains])
    per_rank: dict[int, list[ChunkWrite]] = {}
    sources: tuple[Source, ...]
    indices = layout.chunk_indices()
    for lows, highs in _chunk_blocks(layout, max(len(groups), len(mains))):
        whole = _all(starts[None] <= lows[:, None]) & _all(stops[None] >= highs[:, None])
        held_whole = whole.any(axis=1)
        parts_of = _main_parts(lows, highs, ~held_whole, mains, main_starts, main_stops)
        rows = zip(indices, lows.tolist(), (highs - lows).tolist(), held_whole.tolist(), strict=False)
        for i, (index, lo, extent, is_held) in enumerate(rows):
            region = Box(tuple(lo), tuple(extent))
            if is_held:
                candidates = [held for u in np.flatnonzero(whole[i]) for held in groups[u]]
                rank, leaf, piece, _ = min(candidates, key=lambda h: (loads[h[0]], h[0]))
                owner, sources = rank, (Source(rank, leaf, piece, region),)
            else:
                owner, sources = _gather_sources(path, region, *parts_of[i], replicas, loads)
                moves.extend((s.rank, owner, s) for s in sources if s.rank != owner)
            loads[owner] += region.volume * itemsize
            per_rank.setdefault(owner, []).append(ChunkWrite(index, sources))
    return per_rank


_BLOCK_ELEMENTS = 2**20
"""Chunks are compared with the boxes a block at a time, about this many pairs per block."""


def _chunk_blocks(layout: ArrayLayout, boxes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Start and stop corners of every chunk in C order (as ``chunk_indices``), in blocks."""
    grid = layout.grid_shape
    count = math.prod(grid)
    size = max(1, _BLOCK_ELEMENTS // max(1, boxes * len(grid)))
    chunk = np.array(layout.chunk_shape, np.int64)
    shape = np.array(layout.shape, np.int64)
    for first in range(0, count, size):
        flat = np.arange(first, min(first + size, count), dtype=np.int64)
        columns = np.unravel_index(flat, grid) if grid else ()
        lows = np.array(columns, np.int64).T.reshape(len(flat), len(grid)) * chunk
        yield lows, np.minimum(lows + chunk, shape)


def _all(compared: np.ndarray) -> np.ndarray:
    """Over the last axis (the dimensions); true for 0-d arrays, like ``np.all`` of nothing."""
    return np.all(compared, axis=-1)


def _main_parts(
    lows: np.ndarray,
    highs: np.ndarray,
    wanted: np.ndarray,
    mains: list[_Held],
    main_starts: np.ndarray,
    main_stops: np.ndarray,
) -> dict[int, tuple[list[Source], list[int]]]:
    """For each wanted chunk of a block (by its row): the parts of the main copies that overlap it,
    in the order of ``mains``, and their volumes."""
    rows = np.flatnonzero(wanted)
    if not len(rows):
        return {}
    lo, hi = lows[rows], highs[rows]
    chunk, main = np.nonzero(_all(main_starts[None] < hi[:, None]) & _all(main_stops[None] > lo[:, None]))
    common_starts = np.maximum(main_starts[main], lo[chunk])
    common_shapes = np.minimum(main_stops[main], hi[chunk]) - common_starts
    volumes = np.prod(common_shapes, axis=1)
    parts: dict[int, tuple[list[Source], list[int]]] = {row: ([], []) for row in rows.tolist()}
    for row, i, start, shape, volume in zip(
        rows[chunk].tolist(),
        main.tolist(),
        common_starts.tolist(),
        common_shapes.tolist(),
        volumes.tolist(),
        strict=True,
    ):
        rank, leaf, piece, _ = mains[i]
        sources, sizes = parts[row]
        sources.append(Source(rank, leaf, piece, Box(tuple(start), tuple(shape))))
        sizes.append(volume)
    return parts


def _gather_sources(
    path: str,
    region: Box,
    parts: list[Source],
    volumes: list[int],
    replicas: dict[int, list[_Held]],
    loads: list[int],
) -> tuple[int, tuple[Source, ...]]:
    """A chunk no rank holds whole: its owner holds most of it; the main copies (``parts``)
    supply the rest, unless the owner holds a replica of a part itself (``replicas``: each
    rank's pieces that are not main copies, in order; a rank's main copy never holds another
    rank's part, since the main copies are disjoint)."""
    if sum(volumes) != region.volume:
        raise ShardingError(f"{path}: internal error: the main copies do not tile chunk region {region}")
    held: dict[int, int] = {}
    for part, volume in zip(parts, volumes, strict=True):
        held[part.rank] = held.get(part.rank, 0) + volume
    owner = max(held, key=lambda r: (held[r], -loads[r], -r))
    mine = replicas.get(owner)
    if not mine:
        return owner, tuple(parts)
    sources = []
    for part in parts:
        local = next((p for p in mine if p[3].contains(part.region)), None) if part.rank != owner else None
        sources.append(part if local is None else Source(owner, local[1], local[2], part.region))
    return owner, tuple(sources)
