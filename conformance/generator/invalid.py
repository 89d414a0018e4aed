"""Invalid chunks: a flipped bit, a missing file, a wrong size, a bad zstd frame, a bool byte of 2.

Each vector damages one chunk of ``w`` (float32 [4, 6] in chunks [2, 3]: 24
bytes a chunk) in the base checkpoint. The read of everything must fail with
the error class of the first failing check of R11.1 step 6; a read of other
entries, or of a box of ``w`` that avoids the chunk, must still succeed
(R14.1, R14.2): a reader touches only the chunks it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tessera
from numcodecs import Zstd

from .bases import GOOD_KEYS, save_base
from .damage import chunk_body, flip_byte, write_chunk, zstd_frame
from .data import tensor
from .vector import VectorWriter

__all__ = ["build"]

_CHUNK_BYTES = 2 * 3 * 4
"""Decoded size of one chunk of ``w``."""


@dataclass(frozen=True, slots=True)
class _ChunkFault:
    name: str
    title: str
    rules: tuple[str, ...]
    error: str
    chunk: str
    """The damaged chunk of ``w``: ``i/j``."""
    damage: Callable[[Path], object]
    zstd: bool = False
    """Damage the checkpoint saved with zstd (level 3)."""


def build(out: Path) -> None:
    """Write every vector of this module under ``out/invalid``."""
    for fault in _FAULTS:
        _chunk_vector(out, fault)
    _bool_byte(out)


def _decoded(path: Path) -> bytes:
    """The decoded bytes E of a good zstd chunk."""
    return bytes(Zstd().decode(chunk_body(path)))


def _refill(frame: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace a zstd chunk by ``frame(E)`` with a correct CRC."""
    return lambda path: write_chunk(path, frame(_decoded(path)))


_N = _CHUNK_BYTES
_FAULTS = (
    _ChunkFault("checksum-data", "one flipped bit in the data of a chunk", ("R6.6", "R6.4"),
                "checksum_mismatch", "0/0", lambda p: flip_byte(p, 5)),
    _ChunkFault("checksum-crc", "one flipped bit in the CRC of a chunk", ("R6.6", "R6.4"),
                "checksum_mismatch", "1/1", lambda p: flip_byte(p, -1)),
    _ChunkFault("missing-chunk", "a chunk file is missing", ("R5.7",), "missing_chunk", "1/1", Path.unlink),
    _ChunkFault("chunk-short", "a raw chunk one byte short (its CRC matches the shorter data)",
                ("R6.7", "R6.5"), "inconsistent", "0/1", lambda p: write_chunk(p, chunk_body(p)[:-1])),
    _ChunkFault("chunk-long", "a raw chunk one byte too long (its CRC matches the longer data)",
                ("R6.7", "R6.5"), "inconsistent", "1/0", lambda p: write_chunk(p, chunk_body(p) + b"\x00")),
    _ChunkFault("chunk-tiny", "a chunk file of 3 bytes, too short for a CRC", ("R6.7",), "inconsistent",
                "1/0", lambda p: p.write_bytes(b"\x00\x00\x80")),
    _ChunkFault("zstd-checksum", "zstd: one flipped bit in the CRC of a chunk", ("R6.6", "R6.4"),
                "checksum_mismatch", "0/0", lambda p: flip_byte(p, -1), zstd=True),
    _ChunkFault("zstd-no-content-size", "zstd: a frame that declares no content size", ("R6.3",),
                "inconsistent", "0/1", _refill(lambda e: zstd_frame(e, None)), zstd=True),
    _ChunkFault("zstd-wrong-content-size", f"zstd: a frame that declares {_N - 4} bytes of content, not {_N}",
                ("R6.3",), "inconsistent", "1/0", _refill(lambda e: zstd_frame(e[:-4], _N - 4)), zstd=True),
    _ChunkFault("zstd-yields-more", f"zstd: a frame that declares {_N} bytes but holds {_N + 4}",
                ("R6.8", "R6.7"), "inconsistent", "1/1", _refill(lambda e: zstd_frame(e + bytes(4), _N)),
                zstd=True),
    _ChunkFault("zstd-corrupt-block", "zstd: a frame whose compressed block is garbage", ("R6.7",),
                "inconsistent", "0/0", _refill(lambda e: zstd_frame(b"\xff" * len(e), _N, block_type=2)),
                zstd=True),
    _ChunkFault("zstd-not-zstd", "zstd: a chunk that is not a zstd frame at all", ("R6.7", "R6.3"),
                "inconsistent", "0/1", lambda p: write_chunk(p, bytes(range(40, 40 + _N))), zstd=True),
    _ChunkFault("zstd-chunk-tiny", "zstd: a chunk file of 3 bytes, too short for a CRC", ("R6.7",),
                "inconsistent", "1/0", lambda p: p.write_bytes(b"\x28\xb5\x2f"), zstd=True),
    _ChunkFault("zstd-oversized", f"zstd: a chunk file of over {_N + _N // 128 + 1028} bytes, more than "
                f"zstd makes of {_N}", ("R6.8",), "limit_exceeded", "1/1",
                _refill(lambda e: zstd_frame(e, _N) + bytes(1100)), zstd=True),
)  # fmt: skip


def _avoiding(chunk: str) -> list[tuple[int, int]]:
    """A box of ``w`` (rows of the other chunk row, all columns) that does not touch ``chunk``."""
    return [(2, 4), (0, 6)] if chunk.startswith("0/") else [(0, 2), (0, 6)]


def _chunk_vector(out: Path, fault: _ChunkFault) -> None:
    v = VectorWriter(out, "invalid", fault.name)
    save_base(v, zstd=fault.zstd)
    fault.damage(v.checkpoint / "w" / "c" / fault.chunk)
    avoiding = [(("w",), _avoiding(fault.chunk))]
    probes = [
        v.read(error=fault.error),
        v.read("subset", GOOD_KEYS, rules=["R14.1"]),
        v.read("region-avoiding-fault", avoiding, rules=["R14.2"], features=["regions"]),
        v.verify(fault.error),
    ]
    v.finish(f"{fault.title} (w/c/{fault.chunk})", fault.rules, probes)


def _bool_byte(out: Path) -> None:
    v = VectorWriter(out, "invalid", "bool-byte")
    v.save({"mask": tensor("bool", (6,), 140)}, options=tessera.SaveOptions(chunk_shapes={"mask": [3]}))
    path = v.checkpoint / "mask" / "c" / "1"
    body = bytearray(chunk_body(path))
    body[1] = 0x02
    write_chunk(path, bytes(body))
    v.finish(
        "a bool element stored as the byte 02 (its CRC matches): readers MAY refuse it",
        ["R7.2"],
        [v.read(error="inconsistent", level="MAY"), v.verify("inconsistent", level="MAY")],
    )
