"""The optional dependency: megatron-core, imported only when the plug-in is used.

``import tessera.megatron`` never imports megatron-core, so that the plug-in's names can be
imported (and its error caught) on a machine without it; the first use imports it through
:func:`dist_checkpointing`, which turns a missing library into one line saying what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import TesseraError

__all__ = ["INSTALL", "MegatronNotInstalledError", "dist_checkpointing", "has_strategy_registry"]

INSTALL = "pip install 'tessera-checkpoint[megatron]'"


class MegatronNotInstalledError(TesseraError, ImportError):
    """``tessera.megatron`` was used where megatron-core cannot be imported."""


def dist_checkpointing() -> ModuleType:
    """``megatron.core.dist_checkpointing``, or :class:`MegatronNotInstalledError`."""
    try:
        return importlib.import_module("megatron.core.dist_checkpointing")
    except ImportError as exc:
        raise MegatronNotInstalledError(
            f"tessera.megatron needs megatron-core, which cannot be imported ({exc}); run: {INSTALL}"
        ) from None


def has_strategy_registry() -> bool:
    """Whether this megatron-core dispatches on ``metadata.json`` through a strategy registry
    (up to 0.16; ``strategies/base.py`` is gone in 0.19, and 0.17 ignores the backend)."""
    dist_checkpointing()
    try:
        base = importlib.import_module("megatron.core.dist_checkpointing.strategies.base")
    except ImportError:
        return False
    return hasattr(base, "register_default_strategy") and _version() < (0, 17)


def _version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("megatron-core")
    except PackageNotFoundError:
        return (0, 0)
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
