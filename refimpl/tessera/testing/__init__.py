"""Tools for testing code that uses Tessera, and storages written for it (layer 8, beside the CLI).

- :mod:`tessera.testing.wrappers`: :class:`StorageWrapper` (forwards every call to the storage
  it wraps) and :class:`RecordingStorage` (records every call).
- :mod:`tessera.testing.faults`: :class:`FaultyStorage`, injecting the faults a medium can
  produce (a failed write, sync or commit, a rival's commit, a power cut that loses what was
  never synced, a truncated file).
- :mod:`tessera.testing.storage_tests`: :class:`~tessera.testing.storage_tests.StorageTests`,
  the test kit a :class:`~tessera.storage.base.Storage` implementation subclasses to check
  itself against the interface's contract (it needs pytest, which only that module imports;
  ``import tessera`` never imports this package).
"""

from .faults import CHUNKS, FaultyStorage
from .wrappers import Call, RecordingStorage, StorageWrapper

__all__ = ["CHUNKS", "Call", "FaultyStorage", "RecordingStorage", "StorageWrapper"]
