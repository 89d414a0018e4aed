"""Public names a package resolves on first use (PEP 562), so importing it stays cheap.

``import tessera`` must not import torch or NumPy (``tessera --version`` would take seconds),
yet ``tessera.save`` must be there when asked for. A package lists each public name with the
module that defines it and the name there, and takes ``__getattr__`` and ``__dir__`` from
:func:`lazy_exports`; it also imports the same names under ``TYPE_CHECKING``, so that type
checkers and IDEs see the real objects (and the architecture test sees the imports).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose public name ``n`` is the attribute
    ``exports[n][1]`` of the module ``exports[n][0]`` (relative to ``package``).

    The first access imports that module and stores the value in the package's namespace, so
    later accesses are plain attribute lookups. A subpackage or module of ``package`` is
    imported on first access too (``tessera.engine`` after a bare ``import tessera``, as when
    the package imported everything up front); any other name is an ``AttributeError``.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            module, attribute = exports[name]
            value = getattr(importlib.import_module(module, package), attribute)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
