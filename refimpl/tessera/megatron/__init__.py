"""Megatron-core ``dist_checkpointing`` on Tessera: a sharded save/load strategy, no pickle.

- :func:`save` / :func:`load`: Megatron's entry points with the common state stored in the
  Tessera checkpoint too (no ``common.pt``); every megatron-core from 0.16.
- :class:`TesseraSaveStrategy` / :class:`TesseraLoadStrategy`: the strategy objects, for
  ``dist_checkpointing.save(..., sharded_strategy=...)`` and ``load(..., sharded_strategy=...)``.
- :func:`register`: on megatron-core <= 0.16, make them the backend ``("tessera", 1)``, so that
  ``dist_checkpointing.save(..., sharded_strategy=("tessera", 1))`` records it in
  ``metadata.json`` and a plain ``dist_checkpointing.load`` picks it by itself. An explicit
  call, not an import side effect: importing this package never imports megatron-core, so
  that ``import tessera.megatron`` works (and its error can be caught) without it.

Megatron's checkpoint directory holds ``metadata.json`` (and ``common.pt`` where Megatron's
own ``save`` wrote it) beside ``tessera/``, the Tessera checkpoint. Without megatron-core every
name here raises :class:`MegatronNotInstalledError` on use, saying what to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .requirement import MegatronNotInstalledError, dist_checkpointing, has_strategy_registry

if TYPE_CHECKING:
    from .entry import load, save
    from .strategy import TesseraLoadStrategy, TesseraSaveStrategy, tessera_path

__all__ = [
    "MegatronNotInstalledError",
    "TesseraLoadStrategy",
    "TesseraSaveStrategy",
    "load",
    "register",
    "save",
    "tessera_path",
]

_LAZY = {
    "TesseraLoadStrategy": "strategy",
    "TesseraSaveStrategy": "strategy",
    "tessera_path": "strategy",
    "load": "entry",
    "save": "entry",
}


def register() -> bool:
    """Make the Tessera strategies the defaults of backend ``("tessera", 1)``; ``False`` (and
    nothing done) on megatron-core >= 0.17, which has no registry: pass the objects there."""
    if not has_strategy_registry():
        return False
    from .strategy import (
        BACKEND,
        VERSION,
        TesseraCommonLoadStrategy,
        TesseraLoadStrategy,
        TesseraSaveStrategy,
    )

    base = importlib.import_module(dist_checkpointing().__name__ + ".strategies.base")
    action = base.StrategyAction
    base.register_default_strategy(action.SAVE_SHARDED, BACKEND, VERSION, TesseraSaveStrategy())
    base.register_default_strategy(action.LOAD_SHARDED, BACKEND, VERSION, TesseraLoadStrategy())
    base.register_default_strategy(action.LOAD_COMMON, BACKEND, VERSION, TesseraCommonLoadStrategy())
    return True


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        dist_checkpointing()  # the one-line install message where megatron-core is missing
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(__all__)
