"""Chunk bytes as the spec defines them (§6): elements, optional zstd, then CRC32C.

Encoding avoids copies where the format allows: a chunk whose elements lie
contiguously in the tensor is written straight from the tensor's memory, with
the edge padding (fill value) and the checksum as separate buffers; only a
chunk that cuts across rows is gathered into a chunk-shaped buffer first. The
checksum is computed block by block as the bytes are written, not in a pass
of its own.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator

import crc32c
import numpy as np
from numcodecs import Zstd

from ..errors import ChecksumMismatchError, InconsistentCheckpointError
from .layout import CRC32C_SIZE, ArrayLayout, ChunkIndex

__all__ = ["encode_chunk", "decode_chunk", "edge_padding", "prefix_elements", "check_crc"]

Region = tuple[tuple[int, int], ...]

_CHECKSUM_BLOCK = 4 * 2**20
"""Bytes checksummed and written at a time: small enough to stay in the CPU cache in between."""


def prefix_elements(layout: ArrayLayout, index: ChunkIndex) -> int | None:
    """Elements of the chunk's data if they form a prefix of the chunk in C order, else ``None``.

    That holds when at most one dimension is cut short by the array's edge, and
    every dimension before it has chunk extent 1: then the chunk's bytes are
    its data followed by padding, and the data can be written or read in place.
    """
    region = layout.chunk_region(index)
    extents = [stop - start for start, stop in region]
    short = [d for d, (e, c) in enumerate(zip(extents, layout.chunk_shape, strict=True)) if e < c]
    if len(short) > 1:
        return None
    if short and any(c != 1 for c in layout.chunk_shape[: short[0]]):
        return None
    return math.prod(extents)


def edge_padding(layout: ArrayLayout, valid: int) -> bytes:
    """The fill bytes after a chunk's first ``valid`` elements (its data, a prefix of the chunk;
    see :func:`prefix_elements`): empty for a chunk inside the array."""
    return layout.dtype.fill_bytes() * (math.prod(layout.chunk_shape) - valid)


def _bytes_of(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array; ml_dtypes types lack the buffer protocol, uint8 has it."""
    return array.reshape(-1).view(np.uint8).data


def encode_chunk(
    data: np.ndarray,
    layout: ArrayLayout,
    index: ChunkIndex,
    record: Callable[[int], None] | None = None,
) -> Iterator[memoryview | bytes]:
    """The stored chunk ``index``, given its part of the array: buffers to write one after another.

    Lazy, so that the checksum costs no pass of its own over memory: each block's
    CRC32C is computed just before the block is handed to the write, while it is
    still in the CPU cache; the checksum itself comes last, given to ``record`` first
    (the writer's chunk list, spec R3.19).
    """
    region = layout.chunk_region(index)
    valid = prefix_elements(layout, index)
    if valid is not None and data.flags.c_contiguous:
        payload: list[memoryview | bytes] = [_bytes_of(data)]
        padding = edge_padding(layout, valid)
        if padding:
            payload.append(padding)
    else:
        fill = np.frombuffer(layout.dtype.fill_bytes(), layout.dtype.numpy_dtype)[0]
        full = np.full(layout.chunk_shape, fill, dtype=layout.dtype.numpy_dtype)
        full[tuple(slice(0, stop - start) for start, stop in region)] = data
        payload = [_bytes_of(full)]
    if layout.zstd_level is not None:
        whole = payload[0] if len(payload) == 1 else b"".join(payload)
        payload = [Zstd(level=layout.zstd_level).encode(whole)]
    checksum = 0
    for piece in payload:
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), _CHECKSUM_BLOCK):
            block = view[start : start + _CHECKSUM_BLOCK]
            checksum = crc32c.crc32c(block, checksum)
            yield block
    if record is not None:
        record(checksum)
    yield struct.pack("<I", checksum)


def check_crc(checksum: int, stored: bytes, where: str, listed: int | None = None) -> None:
    """Raise :class:`ChecksumMismatchError` unless ``checksum``, the CRC32C of a chunk's bytes
    (computed whole, or block by block as they were read), equals its 4 ``stored`` bytes (R6.6),
    and these equal ``listed``, the CRC the manifest's chunk list gives the chunk's index (R3.19;
    ``None`` for a 1.0 manifest, which has no chunk list).

    Every chunk a reader trusts passes here, so a reader that must not check (the
    conformance suite's broken backends) replaces this one function.
    """
    (expected,) = struct.unpack("<I", stored)
    if checksum != expected:
        raise ChecksumMismatchError(
            f"{where}: CRC32C is {checksum:08x} but the chunk stores {expected:08x}; "
            "the chunk is corrupt (re-save or restore it from a copy)"
        )
    if listed is not None and expected != listed:
        raise ChecksumMismatchError(
            f"{where}: the chunk is intact (CRC32C {expected:08x}) but the manifest lists "
            f"{listed:08x} for this index: the file holds other data than was saved here (a valid "
            "chunk moved or copied from another place); restore the checkpoint from a copy"
        )


_ZSTD_MAGIC = 0xFD2FB528
_FCS_FIELD_SIZE = (0, 2, 4, 8)
_DID_FIELD_SIZE = (0, 1, 2, 4)


def zstd_content_size(frame: memoryview) -> int | None:
    """The content size a zstd frame header declares (RFC 8878 §3.1.1.1), or ``None`` if absent."""
    if len(frame) < 5 or struct.unpack_from("<I", frame)[0] != _ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    single_segment = bool(descriptor & 0x20)
    fcs_size = _FCS_FIELD_SIZE[descriptor >> 6] or (1 if single_segment else 0)
    offset = 5 + (0 if single_segment else 1) + _DID_FIELD_SIZE[descriptor & 0x03]
    if fcs_size == 0 or len(frame) < offset + fcs_size:
        return None
    value = int.from_bytes(frame[offset : offset + fcs_size], "little")
    return value + 256 if fcs_size == 2 else value


def decode_chunk(
    raw: bytes | memoryview, layout: ArrayLayout, where: str, listed: int | None = None
) -> np.ndarray:
    """A chunk's elements, chunk-shaped, after checking its checksum (against ``listed`` too,
    the manifest's CRC for its index, :func:`check_crc`) and its size."""
    if len(raw) < CRC32C_SIZE:
        raise InconsistentCheckpointError(f"{where}: {len(raw)} bytes cannot hold a checksum")
    body = memoryview(raw)[:-CRC32C_SIZE]
    check_crc(crc32c.crc32c(body), bytes(raw[-CRC32C_SIZE:]), where, listed)
    if layout.zstd_level is not None:
        declared = zstd_content_size(body)
        if declared != layout.chunk_nbytes:
            raise InconsistentCheckpointError(
                f"{where}: the zstd frame declares {declared} bytes of content; "
                f"the chunk is {layout.chunk_nbytes} (spec R6.3)"
            )
        try:
            # Decoding into a buffer of exactly the chunk's size bounds memory: no zstd bomb.
            body = memoryview(Zstd().decode(body, out=bytearray(layout.chunk_nbytes)))
        except Exception as exc:  # numcodecs raises RuntimeError or ValueError by version
            raise InconsistentCheckpointError(f"{where}: zstd cannot decode the chunk: {exc}") from None
    if len(body) != layout.chunk_nbytes:
        raise InconsistentCheckpointError(
            f"{where}: decodes to {len(body)} bytes; a chunk of {list(layout.chunk_shape)} "
            f"{layout.dtype.name} is {layout.chunk_nbytes}"
        )
    return np.frombuffer(body, dtype=layout.dtype.numpy_dtype).reshape(layout.chunk_shape)
