"""Tessera: an open, versioned on-disk format for distributed training checkpoints.

Each global tensor is a Zarr v3 array chunked by global offsets, with a CRC32C
on every chunk; the root ``zarr.json`` holds the manifest and is written last,
so its presence is the commit. ``save``, ``load`` and ``open`` are the API;
``spec/tessera-v1.md`` is the format.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .async_save import AsyncSave, AsyncSaver
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
from .loading import LoadResult, Strict, load
from .planning import PlanCache
from .reader import Checkpoint
from .reader import open_checkpoint as open
from .run_dir import RunDirectory
from .sharding import ShardedObject, ShardedTensor
from .verify import VerifyReport, verify
from .writer import save

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
    "__version__",
    "load",
    "open",
    "save",
    "verify",
]
