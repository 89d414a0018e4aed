"""The Zarr array behind a tensor or opaque-object entry (spec §5-§8).

An :class:`ArrayLayout` is what the manifest says about an array; from it
follow the array's ``zarr.json``, its chunk grid and every chunk key, so that
the reader can check the array's own metadata against the manifest instead of
trusting either one alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InconsistentCheckpointError, LimitExceededError, SchemaViolationError
from .dtypes import DType, dtype_by_name
from .limits import ReaderLimits

__all__ = ["ArrayLayout", "ChunkIndex", "chunk_key"]

ChunkIndex = tuple[int, ...]

CRC32C_SIZE = 4


def _product(ranges: list[range]) -> Iterator[ChunkIndex]:
    """``itertools.product`` of ``ranges`` without its copy of every range into a tuple first
    (issue 15: a declared grid of 2^24 chunks in one dimension cost gigabytes before the first
    index). The last dimension varies fastest; memory is one range object per dimension."""
    if any(len(r) == 0 for r in ranges):
        return
    if len(ranges) <= 1:
        yield from ((i,) for i in ranges[0]) if ranges else iter([()])
        return
    *outer, last = ranges
    for prefix in _product(outer):
        for i in last:
            yield (*prefix, i)


def chunk_key(index: ChunkIndex) -> str:
    """The default Zarr v3 chunk key with ``/``: ``c/1/0``; a 0-d array's only chunk is ``c``."""
    return "/".join(["c", *map(str, index)])


@dataclass(frozen=True, slots=True)
class ArrayLayout:
    """Data type, shape, chunk shape and codecs of one stored array."""

    dtype: DType
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    zstd_level: int | None = None
    """``None``: no compressor; else the ``zstd`` codec at this level sits before ``crc32c``."""

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Chunks along each dimension; edge chunks overhang the array end (Zarr's regular grid)."""
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunk_shape, strict=True))

    @property
    def chunk_count(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements, not counting chunk padding or codecs."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def chunk_nbytes(self) -> int:
        """Decoded bytes of one chunk (edge chunks too are stored whole)."""
        return math.prod(self.chunk_shape) * self.dtype.itemsize

    @property
    def codecs(self) -> list[dict[str, Any]]:
        """The codec chain: ``bytes``, optional ``zstd``, then ``crc32c`` always last."""
        chain: list[dict[str, Any]] = [self.dtype.bytes_codec]
        if self.zstd_level is not None:
            chain.append({"name": "zstd", "configuration": {"level": self.zstd_level, "checksum": False}})
        chain.append({"name": "crc32c"})
        return chain

    def chunk_indices(self) -> Iterator[ChunkIndex]:
        """Every chunk of the grid, in C order, made one at a time."""
        return _product([range(n) for n in self.grid_shape])

    def chunks_overlapping(self, bounds: tuple[tuple[int, int], ...]) -> Iterator[ChunkIndex]:
        """The chunks holding any element of the region ``bounds`` (``[start, stop)`` per dimension),
        in C order, made one at a time."""
        return _product(
            [
                range(a // c, -(-b // c)) if b > a else range(0)
                for (a, b), c in zip(bounds, self.chunk_shape, strict=True)
            ]
        )

    def chunk_region(self, index: ChunkIndex) -> tuple[tuple[int, int], ...]:
        """The half-open global ranges ``[start, stop)`` of the array that a chunk holds."""
        return tuple(
            (i * c, min((i + 1) * c, s)) for i, c, s in zip(index, self.chunk_shape, self.shape, strict=True)
        )

    def zarr_json(self) -> dict[str, Any]:
        """The array's ``zarr.json``, exactly as the writer stores it and the reader expects it."""
        return {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(self.shape),
            "data_type": self.dtype.name,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": list(self.chunk_shape)},
            },
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": self.dtype.fill_value,
            "codecs": self.codecs,
            "attributes": {},
        }

    def manifest_fields(self) -> dict[str, Any]:
        """The fields an entry of the manifest carries for its array."""
        return {
            "dtype": self.dtype.name,
            "shape": list(self.shape),
            "chunk_shape": list(self.chunk_shape),
            "codecs": self.codecs,
            "chunk_count": self.chunk_count,
        }

    def check_limits(self, limits: ReaderLimits, where: str) -> None:
        """Refuse a layout beyond the reader limits (spec R11.6), before anything is allocated."""
        layout = self
        if len(layout.shape) > limits.max_rank:
            raise LimitExceededError(f"{where}: rank {len(layout.shape)} exceeds {limits.max_rank}")
        if layout.chunk_nbytes > limits.max_chunk_bytes:
            raise LimitExceededError(
                f"{where}: a chunk of {list(layout.chunk_shape)} is {layout.chunk_nbytes} bytes, "
                f"over the limit of {limits.max_chunk_bytes}"
            )
        if math.prod(layout.grid_shape) > limits.max_chunks_per_array:
            raise LimitExceededError(
                f"{where}: {layout.chunk_count} chunks exceed the limit of {limits.max_chunks_per_array}"
            )
        if layout.nbytes > limits.max_array_bytes:
            raise LimitExceededError(
                f"{where}: {layout.nbytes} bytes exceed the limit of {limits.max_array_bytes}"
            )

    @classmethod
    def from_manifest(cls, doc: dict[str, Any], where: str, limits: ReaderLimits) -> ArrayLayout:
        """Parse and check an entry's array fields (already schema-valid) against the limits."""
        dtype = dtype_by_name(doc["dtype"])
        shape = tuple(doc["shape"])
        chunk_shape = tuple(doc["chunk_shape"])
        if len(shape) != len(chunk_shape):
            raise SchemaViolationError(
                f"{where}: shape {list(shape)} and chunk_shape {list(chunk_shape)} differ in rank"
            )
        layout = cls(dtype, shape, chunk_shape, _parse_codecs(doc["codecs"], dtype, where))
        layout.check_limits(limits, where)
        if doc["chunk_count"] != layout.chunk_count:
            raise InconsistentCheckpointError(
                f"{where}: manifest says {doc['chunk_count']} chunks, "
                f"but shape {list(shape)} in chunks of {list(chunk_shape)} makes {layout.chunk_count}"
            )
        return layout

    def check_zarr_json(self, doc: object, where: str) -> None:
        """Refuse an array ``zarr.json`` that differs from what the manifest implies."""
        if not isinstance(doc, dict) or not isinstance(doc.get("attributes", {}), dict):
            raise SchemaViolationError(f"{where}: zarr.json is not a JSON object with object attributes")
        # Equivalent spellings other Zarr writers use are accepted; the writer
        # always stores the explicit forms of zarr_json().
        got = dict(doc)
        got.pop("attributes", None)
        if got.get("chunk_key_encoding") == {"name": "default"}:
            got["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/"}}
        if got.get("dimension_names", ()) is None:
            del got["dimension_names"]
        if got.get("storage_transformers", ()) == []:
            del got["storage_transformers"]
        want = self.zarr_json()
        del want["attributes"]
        # Compared as JSON text: Python's == lets false stand for 0 and 1.0 for 1.
        if dumps_sorted(got) != dumps_sorted(want):
            diffs = sorted(
                k
                for k in set(got) | set(want)
                if dumps_sorted({k: got.get(k)}) != dumps_sorted({k: want.get(k)})
            )
            raise InconsistentCheckpointError(
                f"{where}: zarr.json disagrees with the manifest on {', '.join(diffs)}"
            )


def dumps_sorted(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, allow_nan=False)


def _parse_codecs(codecs: list[dict[str, Any]], dtype: DType, where: str) -> int | None:
    """The zstd level of a valid Tessera codec chain; anything else is refused."""
    if not codecs or codecs[0] != dtype.bytes_codec:
        raise SchemaViolationError(
            f"{where}: first codec must be {dtype.bytes_codec} for {dtype.name}, got {codecs[:1]}"
        )
    if codecs[-1] != {"name": "crc32c"}:
        raise SchemaViolationError(f"{where}: the last codec must be crc32c, got {codecs[-1]}")
    middle = codecs[1:-1]
    if not middle:
        return None
    if len(middle) == 1 and middle[0].get("name") == "zstd":
        config = middle[0].get("configuration", {})
        level = config.get("level")
        if isinstance(level, int) and not isinstance(level, bool) and config.get("checksum") is False:
            return level
    raise SchemaViolationError(
        f"{where}: codecs between bytes and crc32c must be nothing or one zstd, got {middle}"
    )
