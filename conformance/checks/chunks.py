"""Chunk files at the byte level, by the spec's own definitions (spec §6, R5.4, R7.2).

Independent of the reference reader: the size, the CRC-32C, the Zstandard frame
(its header and block structure parsed here, RFC 8878 §3.1) and the fill bytes
in overhanging positions are checked against the spec's text, so that a
writer and the reference reader cannot share a misreading of it. Chunk
contents against the case's data are the readers' check.
"""

from __future__ import annotations

import stat
from pathlib import Path

import crc32c
import numpy as np
from numcodecs import Zstd
from tessera.format import ArrayLayout, ChunkIndex, chunk_key

from .entries import StoredArray
from .findings import Findings

__all__ = ["check_chunks", "zstd_frame"]

_CRC_BYTES = 4
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FCS_SIZES = (0, 2, 4, 8)
_DICTIONARY_ID_SIZES = (0, 1, 2, 4)


def check_chunks(root: Path, array: StoredArray, out: Findings) -> bool:
    """Check each chunk file of ``array`` that exists (the file checks report missing ones).

    ``True`` if every one passes.
    """
    layout = array.layout
    ok = True
    for index in layout.chunk_indices():
        key = chunk_key(index)
        file = root / array.path / key
        where = f"{array.path}/{key}"
        try:
            status = file.lstat()
            if not stat.S_ISREG(status.st_mode):
                continue
            if not _size_fits(status.st_size, layout, where, out):
                ok = False
                continue
            data = file.read_bytes()
        except OSError:
            continue
        ok = _check_chunk(data, layout, index, where, out) and ok
        ok = _check_listed(data, array, index, where, out) and ok
    return ok


def _check_listed(data: bytes, array: StoredArray, index: ChunkIndex, where: str, out: Findings) -> bool:
    """R3.19: the CRC the chunk stores is the one the entry's chunk list gives its index (C order)."""
    if array.chunk_crc32c is None or len(data) < _CRC_BYTES:
        return True
    flat = int(np.ravel_multi_index(index, array.layout.grid_shape)) if index else 0
    listed = array.chunk_crc32c[8 * flat : 8 * flat + 8]
    stored = int.from_bytes(data[-_CRC_BYTES:], "little")
    if listed != format(stored, "08x"):
        out.add("R3.19", f"{where} stores CRC-32C {stored:08x}, but the chunk list gives its index {listed}")
        return False
    return True


def _largest(layout: ArrayLayout) -> int:
    """The largest chunk file a writer can make (R6.5; R6.8 for zstd, which never grows data more)."""
    n = layout.chunk_nbytes
    return (n if layout.zstd_level is None else n + n // 128 + 1028) + _CRC_BYTES


def _size_fits(size: int, layout: ArrayLayout, where: str, out: Findings) -> bool:
    """R6.5, R6.8: checked before the file is read, so that a huge one is never loaded."""
    n = layout.chunk_nbytes
    if layout.zstd_level is None and size != n + _CRC_BYTES:
        out.add(
            "R6.5",
            f"{where} is {size} bytes; a chunk of {list(layout.chunk_shape)} {layout.dtype.name} "
            f"without zstd is exactly {n + _CRC_BYTES} ({n} + 4 for the CRC)",
        )
        return False
    if size < _CRC_BYTES:
        out.add("R6.5", f"{where} is {size} bytes, too short to hold its 4-byte CRC-32C")
        return False
    if size > _largest(layout):
        out.add("R6.8", f"{where} is {size} bytes, more than zstd makes of {n} bytes plus the CRC")
        return False
    return True


def _check_chunk(data: bytes, layout: ArrayLayout, index: ChunkIndex, where: str, out: Findings) -> bool:
    n = layout.chunk_nbytes
    body, stored = data[:-_CRC_BYTES], int.from_bytes(data[-_CRC_BYTES:], "little")
    computed = crc32c.crc32c(body)
    if computed != stored:
        out.add(
            "R6.4",
            f"{where}: the CRC-32C of its first {len(body)} bytes is {computed:08x}, "
            f"but its last 4 bytes hold {stored:08x} (little-endian)",
        )
        return False
    if layout.zstd_level is not None:
        decoded = _decompress(body, n, where, out)
        if decoded is None:
            return False
        body = decoded
    return _check_elements(body, layout, index, where, out)


def zstd_frame(z: bytes) -> tuple[int | None, int | None] | None:
    """``(declared content size, size of the first frame)`` of a Zstandard frame, ``None`` if it is not one.

    Walks the block headers (RFC 8878 §3.1.1.2) to find where the frame ends; either size is ``None``
    if absent or truncated.
    """
    if len(z) < 5 or z[:4] != _ZSTD_MAGIC or z[4] & 0x08:  # magic, reserved bit
        return None
    descriptor = z[4]
    single_segment = bool(descriptor & 0x20)
    fcs_size = _FCS_SIZES[descriptor >> 6] or (1 if single_segment else 0)
    position = 5 + (0 if single_segment else 1) + _DICTIONARY_ID_SIZES[descriptor & 0x03]
    content: int | None = None
    if fcs_size and position + fcs_size <= len(z):
        content = int.from_bytes(z[position : position + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    position += fcs_size
    while True:
        if position + 3 > len(z):
            return content, None
        header = int.from_bytes(z[position : position + 3], "little")
        block_type, block_size = (header >> 1) & 0x3, header >> 3
        if block_type == 3:  # reserved
            return content, None
        position += 3 + (1 if block_type == 1 else block_size)  # an RLE block stores one byte
        if header & 0x1:  # the last block
            break
    position += 4 if descriptor & 0x04 else 0  # content checksum
    return content, position if position <= len(z) else None


def _decompress(z: bytes, n: int, where: str, out: Findings) -> bytes | None:
    """R6.3: one frame declaring ``n`` bytes of content, which it decodes to."""
    frame = zstd_frame(z)
    if frame is None:
        out.add("R6.3", f"{where} does not start with a Zstandard frame (magic {z[:4].hex(' ')})")
        return None
    content, size = frame
    sound = True
    if content != n:
        sound = False
        declared = "no content size" if content is None else f"a content size of {content}"
        out.add("R6.3", f"{where}: its zstd frame declares {declared}; the chunk's elements are {n} bytes")
    if size is None:
        sound = False
        out.add("R6.3", f"{where}: its zstd frame is truncated or malformed")
    elif size != len(z):
        sound = False
        out.add(
            "R6.3", f"{where} holds {len(z) - size} bytes after its first zstd frame; it is exactly one frame"
        )
    if not sound:
        return None
    try:
        decoded = bytes(Zstd().decode(z, out=bytearray(n)))
    except Exception as exc:  # numcodecs raises RuntimeError or ValueError by version
        out.add("R6.3", f"{where}: zstd cannot decode it: {exc}")
        return None
    if len(decoded) != n:
        out.add("R6.3", f"{where} decodes to {len(decoded)} bytes; the chunk's elements are {n}")
        return None
    return decoded


def _check_elements(body: bytes, layout: ArrayLayout, index: ChunkIndex, where: str, out: Findings) -> bool:
    """R5.4: overhanging positions hold exactly the fill bytes; R7.2: booleans are 00 or 01."""
    itemsize = layout.dtype.itemsize
    cells = np.frombuffer(body, np.uint8).reshape(*layout.chunk_shape, itemsize)
    valid = [stop - start for start, stop in layout.chunk_region(index)]
    ok = True
    if any(v < c for v, c in zip(valid, layout.chunk_shape, strict=True)):
        overhang = np.zeros(layout.chunk_shape, bool)
        for d, v in enumerate(valid):
            overhang[(slice(None),) * d + (slice(v, None),)] = True
        fill = np.frombuffer(layout.dtype.fill_bytes(), np.uint8)
        wrong = overhang & np.any(cells != fill, axis=-1)
        if wrong.any():
            ok = False
            first = tuple(int(i) for i in np.argwhere(wrong)[0])
            out.add(
                "R5.4",
                f"{where}: {int(wrong.sum())} of its {int(overhang.sum())} overhanging elements hold "
                f"bytes other than the fill {fill.tobytes().hex(' ')}; the first, at chunk position "
                f"{list(first)}, holds {cells[first].tobytes().hex(' ')}",
            )
    if layout.dtype.name == "bool":
        inside = cells[tuple(slice(0, v) for v in valid)][..., 0]
        bad = inside > 1
        if bad.any():
            ok = False
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            out.add(
                "R7.2",
                f"{where}: {int(bad.sum())} booleans are neither 00 nor 01; the first, at chunk "
                f"position {list(first)}, is {int(inside[first]):02x}",
            )
    return ok
