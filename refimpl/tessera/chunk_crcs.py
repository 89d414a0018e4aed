"""The coordinator's chunk lists (spec R3.19), from the CRCs the ranks report with their data.

A chunk's CRC is known only once the chunk is written, so the manifest's chunk
lists are the last thing the coordinator fills in before it publishes the root:
every rank returns the CRCs of the chunks it wrote, 4 bytes each in the order of
its rank plan (:func:`~tessera.chunk_writer.write_rank`), and the coordinator, who
holds every rank's plan, puts each at its chunk's index. Each chunk has exactly
one owner in the plan (R16.8): a replicated array or a chunk assembled from
pieces moved between ranks is reported once, by the rank that wrote it. The work
is one pass over the plan's chunks; the gather carries 4 bytes per chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import CollectiveError
from .format.chunk_list import CRC_HEX_DIGITS, encode_chunk_list, flat_chunk_index
from .format.manifest import Manifest, ObjectEntry, TensorEntry
from .planning.global_plan import RankPlan

__all__ = ["chunk_lists", "with_chunk_lists"]


def chunk_lists(ranks: Sequence[RankPlan], reported: Sequence[bytes | None]) -> dict[str, np.ndarray]:
    """The CRC of every chunk of every array, by array path, in C order of the chunk index;
    ``reported[r]`` is what rank ``r``'s :func:`~tessera.chunk_writer.write_rank` returned."""
    lists: dict[str, np.ndarray] = {}
    filled: dict[str, int] = {}
    for rank, (plan, crcs) in enumerate(zip(ranks, reported, strict=True)):
        values = np.frombuffer(crcs or b"", dtype="<u4")
        if len(values) != sum(len(a.chunks) for a in plan.arrays):
            raise CollectiveError(
                f"rank {rank} reported {len(values)} chunk CRCs for a plan of "
                f"{sum(len(a.chunks) for a in plan.arrays)} chunks; the checkpoint was not committed"
            )
        position = 0
        for array in plan.arrays:
            layout = array.layout
            crcs_of = lists.get(array.path)
            if crcs_of is None:
                crcs_of = lists[array.path] = np.zeros(layout.chunk_count, dtype=np.uint32)
            flat = [flat_chunk_index(layout, chunk.index) for chunk in array.chunks]
            crcs_of[flat] = values[position : position + len(flat)]
            filled[array.path] = filled.get(array.path, 0) + len(flat)
            position += len(flat)
    for path, crcs_of in lists.items():
        if filled[path] != len(crcs_of):
            raise CollectiveError(
                f"{path}: the ranks wrote {filled[path]} chunks of {len(crcs_of)}; not committed"
            )
    return lists


def with_chunk_lists(manifest: Manifest, lists: Mapping[str, np.ndarray]) -> Manifest:
    """``manifest`` with each array entry's chunk list from ``lists``; an array that ``lists``
    lacks gets zeros of the list's full length (the stand-in the writer checks before the claim)."""

    def listed(entry: TensorEntry | ObjectEntry) -> str:
        crcs = lists.get(entry.path)
        if crcs is None:
            return "0" * (CRC_HEX_DIGITS * entry.layout.chunk_count)
        return encode_chunk_list(crcs)

    entries = tuple(
        dataclasses.replace(e, chunk_crc32c=listed(e)) if isinstance(e, (TensorEntry, ObjectEntry)) else e
        for e in manifest.entries
    )
    return dataclasses.replace(manifest, entries=entries)
