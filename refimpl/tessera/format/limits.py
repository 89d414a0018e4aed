"""Reader limits (spec §11): checked against the metadata before any allocation or I/O.

Stock Zarr libraries open an array of 10^18 chunks without a word; a Tessera
reader refuses such metadata up front, naming the limit, so that a hostile or
corrupt checkpoint costs neither memory nor a long stall.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

__all__ = ["DEFAULT_LIMITS", "ReaderLimits", "physical_memory"]


def physical_memory() -> int:
    """Bytes of physical memory of this machine (``sysconf``), or 2^50 where it cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**50


@dataclass(frozen=True, slots=True)
class ReaderLimits:
    """Bounds a reader enforces; raise them deliberately for unusually large checkpoints."""

    max_json_bytes: int = 256 * 2**20
    """Largest JSON document read (the root manifest of a 1,024-rank 70B model is far below)."""
    max_json_depth: int = 64
    """Deepest nesting of objects and arrays in any JSON document."""
    max_json_containers: int = 2**22
    """Most objects and arrays in any JSON document, counted before it is parsed: 32 MiB of
    ``{}`` would otherwise cost 1.5 GiB of dicts. A manifest entry holds about ten."""
    max_key_depth: int = 128
    """Most components of a stored key (state dicts nest a dozen deep at most)."""
    max_rank: int = 32
    """Most dimensions an array may have."""
    max_chunk_bytes: int = 2**31
    """Largest decoded chunk; the writer's default chunk is 64 MiB."""
    max_chunks_per_array: int = 2**24
    max_array_bytes: int = 2**50
    """Largest tensor (1 PiB): refuses shapes whose element count overflows any real tensor."""
    max_load_bytes: int = field(default_factory=physical_memory)
    """Most bytes a load into new tensors (``tessera.load`` without a template,
    ``Checkpoint.read``/``values``) allocates in all, checked before allocating: by default
    the machine's physical memory, so that a manifest's declared shapes are refused with
    ``limit_exceeded`` instead of failing in the allocator. Raise it to load more (with
    swap), or load into a template, which allocates nothing."""

    def __post_init__(self) -> None:
        """A limit given wrongly would silently refuse every checkpoint, or none: refuse it here."""
        for limit in fields(self):
            value = getattr(self, limit.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ReaderLimits.{limit.name} must be an int, got {value!r}")
            least = 0 if limit.name == "max_rank" else 1  # rank 0: scalars only
            if value < least:
                raise ValueError(f"ReaderLimits.{limit.name} must be at least {least}, got {value}")


DEFAULT_LIMITS = ReaderLimits()
