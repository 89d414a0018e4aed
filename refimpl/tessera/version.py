"""The reference implementation's version, importable without importing anything else.

``tessera --version`` and the writer's ``writer`` record read it; keeping it in a module of its
own lets both do so without importing the package's API (and with it torch).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
