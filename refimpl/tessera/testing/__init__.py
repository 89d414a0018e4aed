"""Tools for testing code that uses Tessera, and storages written for it (layer 8, beside the CLI).

- :mod:`tessera.testing.wrappers`: storages wrapping another one, to record every call
  (:class:`RecordingStorage`) or to inject the faults a medium can produce
  (:class:`FaultyStorage`: a failed write, sync or commit, a rival's commit, a power cut
  that loses what was never synced, a truncated file).
- :mod:`tessera.testing.storage_tests`: :class:`~tessera.testing.storage_tests.StorageTests`,
  the test kit a :class:`~tessera.storage.base.Storage` implementation subclasses to check
  itself against the interface's contract (it needs pytest, which only that module imports;
  ``import tessera`` never imports this package).
"""

from .wrappers import CHUNKS, Call, FaultyStorage, RecordingStorage, StorageWrapper

__all__ = ["CHUNKS", "Call", "FaultyStorage", "RecordingStorage", "StorageWrapper"]
