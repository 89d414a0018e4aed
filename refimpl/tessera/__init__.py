"""Tessera: an open, versioned on-disk format for distributed training checkpoints.

Each global tensor is a Zarr v3 array chunked by global offsets, with a CRC32C
on every chunk; the root ``zarr.json`` holds the manifest and is written last,
so its presence is the commit. ``save`` (with :class:`SaveOptions`), ``save_async``,
``load`` and ``open`` are the API;
``spec/tessera-v1.md`` is the format.
"""

from __future__ import annotations

from .api.checkpoint import Checkpoint
from .api.checkpoint import open_checkpoint as open
from .api.load import LoadResult, Strict, load
from .api.run_dir import RunDirectory
from .api.save import save
from .api.save_async import AsyncSave, AsyncSaver, save_async
from .api.verify import VerifyReport, verify
from .errors import (
    CheckpointDeletedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CollectiveError,
    GpuDirectUnavailableError,
    InconsistentCheckpointError,
    InvalidKeyError,
    KeyMismatchError,
    LimitExceededError,
    MissingChunkError,
    SchemaViolationError,
    ShardingError,
    StorageError,
    TensorMismatchError,
    TesseraError,
    TesseraWarning,
    UncommittedCheckpointError,
    UnsafeEncodingError,
    UnsupportedVersionError,
)
from .format.limits import ReaderLimits
from .format.manifest import FORMAT_VERSION, Manifest
from .planning import PlanCache, SaveOptions, Zstd
from .state import ShardedObject, ShardedTensor
from .version import __version__

__all__ = [
    "FORMAT_VERSION",
    "AsyncSave",
    "AsyncSaver",
    "Checkpoint",
    "CheckpointDeletedError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CollectiveError",
    "GpuDirectUnavailableError",
    "InconsistentCheckpointError",
    "InvalidKeyError",
    "KeyMismatchError",
    "LimitExceededError",
    "LoadResult",
    "Manifest",
    "MissingChunkError",
    "PlanCache",
    "ReaderLimits",
    "RunDirectory",
    "SaveOptions",
    "SchemaViolationError",
    "ShardedObject",
    "ShardedTensor",
    "ShardingError",
    "StorageError",
    "Strict",
    "TensorMismatchError",
    "TesseraError",
    "TesseraWarning",
    "UncommittedCheckpointError",
    "UnsafeEncodingError",
    "UnsupportedVersionError",
    "VerifyReport",
    "Zstd",
    "__version__",
    "load",
    "open",
    "save",
    "save_async",
    "verify",
]
