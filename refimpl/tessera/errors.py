"""Every error a Tessera user can meet, one class per error class of the spec.

The spec (``spec/tessera-v1.md``, section "Errors") names the classes a reader
and a writer must tell apart; each class here carries that name as ``code``, so
a test, a conformance backend in another language, or a user's retry logic
can branch on a stable string rather than on message text. Every message
names the key, the chunk or the file at fault and says what to do.

Each class also derives from the standard-library exception a Python caller
would reach for, so that code written without Tessera in mind still catches
it: a missing checkpoint is a ``FileNotFoundError``, a claimed path a
``FileExistsError``, a storage failure an ``OSError``, a key mismatch a
``KeyError``, a damaged or refused document a ``ValueError`` (as
``json.JSONDecodeError`` and zarr-python's checksum failures are). Each class
says why it has its base. Every error is built from one message, so the
``OSError`` ones keep ``errno``, ``strerror`` and ``filename`` at ``None`` (the
message names the file; ``__cause__`` holds the system's error when there was
one), and every error pickles to the same class and message: errors travel
between ranks and out of background threads.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ChecksumMismatchError",
    "CheckpointDeletedError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "InconsistentCheckpointError",
    "InvalidKeyError",
    "KeyMismatchError",
    "LimitExceededError",
    "MissingChunkError",
    "SchemaViolationError",
    "StorageError",
    "ShardingError",
    "GpuDirectUnavailableError",
    "CollectiveError",
    "ConfigMismatchError",
    "TensorMismatchError",
    "TesseraError",
    "TesseraWarning",
    "UncommittedCheckpointError",
    "UnsafeEncodingError",
    "UnsupportedLocationError",
    "UnsupportedVersionError",
    "ERROR_CLASSES",
]


class TesseraError(Exception):
    """Base of every Tessera error; ``code`` is the spec's name for the class.

    Catch this for "anything Tessera refused"; catch the standard-library base of a
    subclass (``FileNotFoundError``, ``ValueError``...) where Tessera is one source of many."""

    code: ClassVar[str] = "error"


class CheckpointNotFoundError(TesseraError, FileNotFoundError):
    """The path holds no checkpoint at all (no directory, or an empty one).

    A ``FileNotFoundError``: what the caller named is not there, as with ``open()``."""

    code = "not_found"


class CheckpointDeletedError(CheckpointNotFoundError):
    """The checkpoint was deleted while being read (its root ``zarr.json`` is gone, and so is a
    file the read needed): not damage, but a checkpoint that no longer exists (retention, or
    another process, removed it). A ``FileNotFoundError`` through its base."""


class UncommittedCheckpointError(TesseraError, FileNotFoundError):
    """The checkpoint was claimed but its root manifest was never published (R-COMMIT).

    A ``FileNotFoundError``: the root ``zarr.json`` is the commit (spec §9); without it no
    checkpoint exists there yet, only the leftovers of a save that never finished, which a
    caller falling back to an earlier checkpoint must treat as it treats a missing one."""

    code = "uncommitted"


class UnsupportedVersionError(TesseraError, ValueError):
    """Unknown MAJOR format version, or a must-understand field this reader lacks.

    A ``ValueError``: the document is well formed but holds a version this reader refuses."""

    code = "unsupported_version"


class SchemaViolationError(TesseraError, ValueError):
    """A JSON document is malformed or does not satisfy its schema.

    A ``ValueError``, as ``json.JSONDecodeError`` is: the bytes read are not a valid document."""

    code = "schema_violation"


class InconsistentCheckpointError(TesseraError, ValueError):
    """Two documents of one checkpoint disagree (manifest against an array's
    ``zarr.json``), or a chunk decodes to the wrong size.

    A ``ValueError``: the stored data is damaged, not the storage failing (no retry helps)."""

    code = "inconsistent"


class LimitExceededError(TesseraError, ValueError):
    """A size in the metadata exceeds a reader limit; refused before any allocation.

    A ``ValueError``: a declared size outside the accepted range. Not a ``MemoryError``,
    which means an allocation failed; this one is refused before anything is allocated."""

    code = "limit_exceeded"


class ChecksumMismatchError(TesseraError, ValueError):
    """A chunk's stored CRC32C does not match its bytes.

    A ``ValueError``, as zarr-python's checksum failure is: damaged data, not a failing storage."""

    code = "checksum_mismatch"


class MissingChunkError(TesseraError, ValueError):
    """A chunk that a committed array must have is absent (never read as fill value).

    A ``ValueError``, not a ``FileNotFoundError``: the checkpoint exists and is committed but
    damaged; ``except FileNotFoundError`` (no checkpoint there, start afresh) must not pass
    over it."""

    code = "missing_chunk"


class TensorMismatchError(TesseraError, ValueError):
    """A stored tensor's shape or dtype differs from the tensor it is loaded into.

    A ``ValueError``: the destination given has the right type but the wrong shape or dtype."""

    code = "tensor_mismatch"


class ShardingError(TesseraError, ValueError):
    """The ranks' shards do not form valid global tensors: overlap, gap, or disagreeing shape or dtype.

    A ``ValueError``: the shards passed in describe no valid layout."""

    code = "bad_sharding"


class CollectiveError(TesseraError, RuntimeError):
    """Another rank failed or vanished during a multi-rank save; nothing was committed.

    A ``RuntimeError``, as ``torch.distributed``'s own failures are (``DistError``)."""

    code = "collective_failed"


class UnsafeEncodingError(TesseraError, TypeError):
    """A value needs pickle and the caller did not opt in (on save or on load).

    A ``TypeError``, as ``json.dumps`` raises for an object it cannot encode: the value's type
    has no safe encoding, and pickle needs the caller's consent."""

    code = "unsafe_encoding"


class InvalidKeyError(TesseraError, ValueError):
    """A state-dict key or a stored path breaks the key rules (escape, ``..``, reserved names),
    or a special file (FIFO, device, socket, symlink) stands where a file should be.

    A ``ValueError``: the key or path has a value the rules forbid. Not a ``KeyError``, which
    says a key is absent."""

    code = "bad_key"


class KeyMismatchError(TesseraError, KeyError):
    """Strict load: keys requested and keys stored differ (see :class:`tessera.Strict`), or a
    handle was asked for a key it does not hold.

    A ``KeyError``, as a dict's missing key is. ``KeyError`` quotes its message when printed
    (it expects a key); this one prints its message as written."""

    code = "key_mismatch"

    def __str__(self) -> str:
        return BaseException.__str__(self)


class ConfigMismatchError(TesseraError, ValueError):
    """A run checkpoint's saved configuration differs from the current run's in a key that must
    match (``num_layers``...), or the checkpoint has no saved configuration to check (R10.13).

    A ``ValueError``: the checkpoint is sound but belongs to a run configured differently."""

    code = "config_mismatch"


class CheckpointExistsError(TesseraError, FileExistsError):
    """A writer could not claim the path: another save claimed or committed it.

    A ``FileExistsError``, as ``open(path, "x")`` raises: the path is taken."""

    code = "already_exists"


class StorageError(TesseraError, OSError):
    """The storage failed (disk full, permission denied, I/O error) on a named file.

    An ``OSError``, the system's own class for failed I/O; built from one message, so
    ``errno`` is ``None`` (the system's error, if any, is ``__cause__``)."""

    code = "io_error"


class UnsupportedLocationError(StorageError, ValueError):
    """A location names a storage this installation has no implementation for (a URL scheme
    nobody registered), or looks like a URL but is not one; refused before anything is written,
    so that a URL never silently becomes a local directory.

    A ``ValueError`` too (as ``urllib.request.Request`` refuses an unknown URL type): the
    argument is at fault, not a storage; still a ``StorageError`` for code that treats every
    storage problem alike."""


class GpuDirectUnavailableError(StorageError):
    """GPU-direct I/O was asked for where it cannot run (no KvikIO, no CUDA device).

    An ``OSError`` through :class:`StorageError`: the storage asked for cannot be opened here."""


class TesseraWarning(UserWarning):
    """Something went wrong that does not undo the operation: a save that committed but could
    not move ``latest`` or apply retention, a run directory entry skipped (a symlinked step)."""


ERROR_CLASSES: dict[str, type[TesseraError]] = {
    cls.code: cls
    for cls in (
        CheckpointNotFoundError,
        UncommittedCheckpointError,
        UnsupportedVersionError,
        SchemaViolationError,
        InconsistentCheckpointError,
        LimitExceededError,
        ChecksumMismatchError,
        MissingChunkError,
        TensorMismatchError,
        UnsafeEncodingError,
        InvalidKeyError,
        KeyMismatchError,
        CheckpointExistsError,
        StorageError,
        ShardingError,
        CollectiveError,
        ConfigMismatchError,
    )
}
"""Every error class by its spec code, for the CLI and conformance backends."""
