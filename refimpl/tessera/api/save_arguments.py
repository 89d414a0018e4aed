"""The keywords ``save`` took before :class:`~tessera.SaveOptions`, kept one release as aliases.

``tessera.save``, ``tessera.save_async``, ``AsyncSaver.save`` and ``RunDirectory.save`` /
``save_async`` all call :func:`save_options` first, with the keywords they did not name: each
alias warns (``DeprecationWarning`` naming its replacement) and still works; an alias given
together with ``options=`` is a ``TypeError``, since the two would say one thing twice; an unknown
keyword is the ``TypeError`` Python gives. To be removed in the release after next (CHANGELOG.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal, TypedDict

from ..planning.options import SaveOptions, Zstd

__all__ = ["DeprecatedSaveKeywords", "save_options"]


class DeprecatedSaveKeywords(TypedDict, total=False):
    """The old keywords, typed, so that a type checker still checks calls that use them."""

    compression: Literal["zstd"] | None
    zstd_level: int
    chunk_bytes: int
    chunk_shapes: Mapping[str, Sequence[int]] | None
    threads: int | None
    pickle_keys: Collection[str]
    gpu_direct: bool


_REPLACEMENTS = {
    "compression": "options=tessera.SaveOptions(compression=tessera.Zstd(level))",
    "zstd_level": "options=tessera.SaveOptions(compression=tessera.Zstd(level))",
    "chunk_bytes": "options=tessera.SaveOptions(chunk_bytes=...)",
    "chunk_shapes": "options=tessera.SaveOptions(chunk_shapes=...)",
    "threads": "options=tessera.SaveOptions(threads=...)",
    "pickle_keys": "options=tessera.SaveOptions(pickle_keys=...)",
    "gpu_direct": (
        "a location with device I/O: tessera.engine.gpu.direct_io.gpu_direct_storage(path) "
        "in place of the path"
    ),
}

_HINTS = {
    "asynchronous": " (removed: call tessera.save_async or RunDirectory.save_async for the handle)",
    "process_group": " (an AsyncSaver's process group is fixed when it is made)",
}


def save_options(
    options: SaveOptions | None, deprecated: Mapping[str, Any], caller: str, stacklevel: int = 3
) -> tuple[SaveOptions, bool]:
    """The options of a save call, and whether the deprecated ``gpu_direct=True`` asked for device I/O.

    ``deprecated`` holds the keywords the caller ``caller`` did not name; each warns at
    ``stacklevel`` (3: the code that called ``caller``). Raises ``TypeError`` for a keyword that
    was never an option, for ``options`` that is not a ``SaveOptions``, and for an alias given
    with ``options``; ``TypeError`` or ``ValueError`` for an alias's wrong value.
    """
    unknown = sorted(set(deprecated) - set(_REPLACEMENTS))
    if unknown:
        hint = _HINTS.get(unknown[0], "")
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}{hint}")
    if options is not None and not isinstance(options, SaveOptions):
        raise TypeError(f"{caller}(options=...) takes a tessera.SaveOptions, got {type(options).__name__}")
    for name in deprecated:
        warnings.warn(
            f"{caller}({name}=...) is deprecated and will be removed; pass {_REPLACEMENTS[name]}",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
    gpu_direct = deprecated.get("gpu_direct", False)
    if not isinstance(gpu_direct, bool):
        raise TypeError(f"{caller}(gpu_direct=...) takes a bool, got {gpu_direct!r}")
    fields = {k: v for k, v in deprecated.items() if k != "gpu_direct"}
    if not fields:
        return options if options is not None else SaveOptions(), gpu_direct
    if options is not None:
        both = sorted(fields)
        raise TypeError(
            f"{caller}() got {', '.join(both)} both as a keyword and in options=; "
            "give each setting once, in tessera.SaveOptions"
        )
    compression = fields.pop("compression", None)
    level = fields.pop("zstd_level", 3)
    if compression not in (None, "zstd"):
        raise ValueError(f"{caller}(compression=...) takes None or 'zstd', got {compression!r}")
    if fields.get("chunk_shapes", {}) is None:
        del fields["chunk_shapes"]
    # As before the options object, ``zstd_level`` means something only with compression="zstd".
    return SaveOptions(compression=Zstd(level) if compression == "zstd" else None, **fields), gpu_direct
