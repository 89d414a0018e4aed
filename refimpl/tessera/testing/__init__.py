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
- :mod:`tessera.testing.fault_proxy`: :class:`~tessera.testing.fault_proxy.FaultProxy`, a
  fault-injecting HTTP reverse proxy to put in front of an object store (503s, lost responses,
  resets, delays, truncated bodies); imported by name only, so this package does not load the
  HTTP server modules for users who never need them.
- :mod:`tessera.testing.moto`: :func:`~tessera.testing.moto.running_moto_server`, a real
  S3-compatible server (``moto_server``) on 127.0.0.1 for the length of a ``with`` block.
"""

from .faults import CHUNKS, FaultyStorage
from .wrappers import Call, RecordingStorage, StorageWrapper

__all__ = ["CHUNKS", "Call", "FaultyStorage", "RecordingStorage", "StorageWrapper"]
