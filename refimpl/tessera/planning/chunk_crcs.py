"""The coordinator's chunk lists (spec R3.19), from the CRCs the ranks report with their data.

A chunk's CRC is known only once the chunk is written, so the manifest's chunk
lists are the last thing the coordinator fills in before it publishes the root:
every rank returns the CRCs of the chunks it wrote, 4 bytes each in the order of
its rank plan (:func:`~tessera.engine.chunk_writer.write_chunks`), and the coordinator, who
holds every rank's plan, puts each at its chunk's index. Each chunk has exactly
one owner in the plan (R16.8): a replicated array or a chunk assembled from
pieces moved between ranks is reported once, by the rank that wrote it. The work
is one pass over the plan's chunks; the gather carries 4 bytes per chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import CollectiveError
from ..format.chunk_list import CRC_HEX_DIGITS, encode_chunk_list, grid_strides
from ..format.manifest import Manifest, ObjectEntry, TensorEntry
from .global_plan import RankPlan

__all__ = ["chunk_lists", "only_hex_digits_differ", "with_chunk_lists"]


def chunk_lists(ranks: Sequence[RankPlan], reported: Sequence[bytes | None]) -> dict[str, np.ndarray]:
    """The CRC of every chunk of every array, by array path, in C order of the chunk index;
    ``reported[r]`` is what rank ``r``'s :func:`~tessera.engine.chunk_writer.write_chunks` returned.
    Raises :class:`CollectiveError` unless every chunk is reported exactly once."""
    flats: dict[str, list[int]] = {}
    crcs: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    strides: dict[str, tuple[int, ...]] = {}
    for rank, (plan, data) in enumerate(zip(ranks, reported, strict=True)):
        values = np.frombuffer(data or b"", dtype="<u4").tolist()
        planned = sum(len(a.chunks) for a in plan.arrays)
        if len(values) != planned:
            raise CollectiveError(
                f"rank {rank} reported {len(values)} chunk CRCs for a plan of {planned} chunks; "
                "the checkpoint was not committed"
            )
        position = 0
        for array in plan.arrays:
            path = array.path
            if path not in strides:
                strides[path], counts[path] = grid_strides(array.layout), array.layout.chunk_count
                flats[path], crcs[path] = [], []
            step = strides[path]
            flats[path].extend(sum(i * s for i, s in zip(c.index, step, strict=True)) for c in array.chunks)
            crcs[path].extend(values[position : position + len(array.chunks)])
            position += len(array.chunks)
    lists: dict[str, np.ndarray] = {}
    for path, count in counts.items():
        at = np.array(flats[path], dtype=np.int64)
        seen = np.zeros(count, dtype=bool)
        seen[at] = True
        if len(at) != count or not seen.all():
            raise CollectiveError(
                f"{path}: the ranks reported {len(at)} chunk CRCs for {count} chunks, not one for "
                "each; the checkpoint was not committed"
            )
        lists[path] = np.zeros(count, dtype=np.uint32)
        lists[path][at] = crcs[path]
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


def only_hex_digits_differ(checked: bytes, final: bytes) -> bool:
    """Whether ``final`` has the length of ``checked`` and differs from it only in bytes that are
    lowercase hex digits in both: then the root published differs from the one checked before the
    claim (zeros in its chunk lists) only in the digits of its chunk lists and digest, so a reader
    accepts it as it accepted that one (the digest, computed over ``final``, aside). A linear,
    vectorized comparison, cheaper than parsing the document again (R16.17)."""
    if len(checked) != len(final):
        return False
    a, b = np.frombuffer(checked, np.uint8), np.frombuffer(final, np.uint8)
    differ = a != b
    return bool(np.all(_is_hex_digit(a[differ]) & _is_hex_digit(b[differ])))


def _is_hex_digit(codes: np.ndarray) -> np.ndarray:
    return ((codes >= ord("0")) & (codes <= ord("9"))) | ((codes >= ord("a")) & (codes <= ord("f")))
