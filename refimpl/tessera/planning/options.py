"""What the caller decides about how a save stores its state: ``tessera.SaveOptions``.

One frozen object for the settings that travel together from save to save of a run (a training
loop makes it once): chunk size and shapes, compression, which keys may be pickled, how many
threads write. It checks its fields when it is made, so a wrong argument is a ``TypeError`` or
``ValueError`` at the line that made it, never a format error from deep inside a save. What
changes per call (metadata, the process group, the plan cache, progress) stays a parameter of
``save``; where the files go is the location (a path, a URL or a ``Storage``: GPU-direct I/O is a
property of the storage, not an option).

``pickle_keys`` lives here, not in ``save``'s signature: like ``chunk_shapes`` it names paths of
the state dict and says how their values are stored (pickled instead of refused), it is the same
at every save of a run, and keeping it in the options object makes the opt-in to pickling one
visible value that can be reviewed and reused.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_CHUNK_BYTES", "SaveOptions", "Zstd"]

DEFAULT_CHUNK_BYTES = 64 * 2**20

ZSTD_MIN_LEVEL = -(2**17)
"""zstd's lowest level (``ZSTD_minCLevel``); the library clamps levels outside
[``ZSTD_MIN_LEVEL``, ``ZSTD_MAX_LEVEL``] silently, so the manifest would record a level that was
not used: such a level is refused instead."""
ZSTD_MAX_LEVEL = 22


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Zstd:
    """Compress every chunk with zstd (spec §6) at ``level``: negative levels are faster,
    higher ones smaller; 3 is zstd's own default."""

    level: int = 3

    def __post_init__(self) -> None:
        if not _is_int(self.level):
            raise TypeError(f"Zstd(level=...) takes an int, got {type(self.level).__name__} {self.level!r}")
        if not ZSTD_MIN_LEVEL <= self.level <= ZSTD_MAX_LEVEL:
            raise ValueError(
                f"Zstd(level={self.level}): zstd levels run from {ZSTD_MIN_LEVEL} to {ZSTD_MAX_LEVEL}"
            )


@dataclass(frozen=True, slots=True)
class SaveOptions:
    """How ``tessera.save`` stores a state dict; every field checked when the object is made.

    ``SaveOptions()`` is the default: chunks of about 64 MiB, no compression, nothing pickled,
    two writing threads per core (4 to 16).
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Target size of a chunk: large enough for full-speed I/O, small enough for partial reads."""
    compression: Zstd | None = None
    """``Zstd(level)`` compresses every array's chunks; ``None`` stores raw bytes."""
    threads: int | None = None
    """Threads writing this rank's files; ``None``: the storage's ``concurrency`` where it has
    one (an object store: many requests in flight), else two per core, from 4 to 16."""
    chunk_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict, hash=False)
    """Chunk shapes fixed by the caller, by path (as ``tessera inspect`` prints them), in place
    of the writer's choice: for tools that must reproduce a grid (conformance vectors, converters
    keeping another format's layout). Kept as a copy, each shape a tuple."""
    pickle_keys: Collection[str] = frozenset()
    """Paths whose values may be pickled; any other value that is not a tensor, bytes or JSON is
    refused (a checkpoint that unpickles runs code when it is loaded). Kept as a frozenset."""

    def __post_init__(self) -> None:
        if not _is_int(self.chunk_bytes):
            raise TypeError(f"SaveOptions(chunk_bytes=...) takes an int, got {self.chunk_bytes!r}")
        if self.chunk_bytes < 1:
            raise ValueError(f"SaveOptions(chunk_bytes={self.chunk_bytes}): a chunk holds at least 1 byte")
        if self.compression is not None and not isinstance(self.compression, Zstd):
            raise TypeError(
                "SaveOptions(compression=...) takes tessera.Zstd(level=...) or None, "
                f"got {self.compression!r}"
            )
        if self.threads is not None and not _is_int(self.threads):
            raise TypeError(f"SaveOptions(threads=...) takes an int or None, got {self.threads!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"SaveOptions(threads={self.threads}): at least 1 thread writes")
        object.__setattr__(self, "chunk_shapes", _chunk_shapes(self.chunk_shapes))
        object.__setattr__(self, "pickle_keys", _pickle_keys(self.pickle_keys))


def _chunk_shapes(given: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(given, Mapping):
        raise TypeError(f"SaveOptions(chunk_shapes=...) takes a mapping of path to shape, got {given!r}")
    shapes: dict[str, tuple[int, ...]] = {}
    for path, shape in given.items():
        if not isinstance(path, str):
            raise TypeError(f"SaveOptions(chunk_shapes=...): a path is a str, got {path!r}")
        if not isinstance(shape, Sequence) or isinstance(shape, str) or not all(_is_int(n) for n in shape):
            raise TypeError(
                f"SaveOptions(chunk_shapes=...): the shape of {path!r} is a sequence of ints, got {shape!r}"
            )
        if any(n < 1 for n in shape):
            raise ValueError(
                f"SaveOptions(chunk_shapes=...): the shape of {path!r} must be >= 1 in every "
                f"dimension, got {list(shape)}"
            )
        shapes[path] = tuple(shape)
    return shapes


def _pickle_keys(given: Any) -> frozenset[str]:
    if isinstance(given, str | bytes) or not isinstance(given, Collection):
        raise TypeError(
            f"SaveOptions(pickle_keys=...) takes a collection of paths, e.g. [{given!r}], not {given!r}"
        )
    keys = frozenset(given)
    wrong = [k for k in keys if not isinstance(k, str)]
    if wrong:
        raise TypeError(f"SaveOptions(pickle_keys=...): a path is a str, got {wrong[0]!r}")
    return keys
