"""Every error a Tessera user can meet, one class per error class of the spec.

The spec (``spec/tessera-v1.md``, section "Errors") names the classes a reader
and a writer must tell apart; each class here carries that name as ``code``, so
a test, a conformance backend in another language, or a user's retry logic
can branch on a stable string rather than on message text. Every message
names the key, the chunk or the file at fault and says what to do.
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
    """Base of every Tessera error; ``code`` is the spec's name for the class."""

    code: ClassVar[str] = "error"


class CheckpointNotFoundError(TesseraError):
    """The path holds no checkpoint at all (no directory, or an empty one)."""

    code = "not_found"


class CheckpointDeletedError(CheckpointNotFoundError):
    """The checkpoint was deleted while being read (its root ``zarr.json`` is gone, and so is a
    file the read needed): not damage, but a checkpoint that no longer exists (retention, or
    another process, removed it)."""


class UncommittedCheckpointError(TesseraError):
    """The checkpoint was claimed but its root manifest was never published (R-COMMIT)."""

    code = "uncommitted"


class UnsupportedVersionError(TesseraError):
    """Unknown MAJOR format version, or a must-understand field this reader lacks."""

    code = "unsupported_version"


class SchemaViolationError(TesseraError):
    """A JSON document is malformed or does not satisfy its schema."""

    code = "schema_violation"


class InconsistentCheckpointError(TesseraError):
    """Two documents of one checkpoint disagree (manifest against an array's
    ``zarr.json``), or a chunk decodes to the wrong size."""

    code = "inconsistent"


class LimitExceededError(TesseraError):
    """A size in the metadata exceeds a reader limit; refused before any allocation."""

    code = "limit_exceeded"


class ChecksumMismatchError(TesseraError):
    """A chunk's stored CRC32C does not match its bytes."""

    code = "checksum_mismatch"


class MissingChunkError(TesseraError):
    """A chunk that a committed array must have is absent (never read as fill value)."""

    code = "missing_chunk"


class TensorMismatchError(TesseraError):
    """A stored tensor's shape or dtype differs from the tensor it is loaded into."""

    code = "tensor_mismatch"


class ShardingError(TesseraError):
    """The ranks' shards do not form valid global tensors: overlap, gap, or disagreeing shape or dtype."""

    code = "bad_sharding"


class CollectiveError(TesseraError):
    """Another rank failed or vanished during a multi-rank save; nothing was committed."""

    code = "collective_failed"


class UnsafeEncodingError(TesseraError):
    """A value needs pickle and the caller did not opt in (on save or on load)."""

    code = "unsafe_encoding"


class InvalidKeyError(TesseraError):
    """A state-dict key or a stored path breaks the key rules (escape, ``..``, reserved names)."""

    code = "bad_key"


class KeyMismatchError(TesseraError):
    """Strict load: keys requested and keys stored differ (see :class:`tessera.Strict`)."""

    code = "key_mismatch"


class CheckpointExistsError(TesseraError):
    """A writer could not claim the path: another save claimed or committed it."""

    code = "already_exists"


class StorageError(TesseraError):
    """The storage failed (disk full, permission denied, I/O error) on a named file."""

    code = "io_error"


class UnsupportedLocationError(StorageError):
    """A location names a storage this installation has no implementation for (a URL scheme
    nobody registered), or looks like a URL but is not one; refused before anything is written,
    so that a URL never silently becomes a local directory."""


class GpuDirectUnavailableError(StorageError):
    """GPU-direct I/O was asked for where it cannot run (no KvikIO, no CUDA device)."""


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
    )
}
"""Every error class by its spec code, for the CLI and conformance backends."""
