"""Tessera: an open, versioned on-disk format for distributed training checkpoints.

Each global tensor is a Zarr v3 array chunked by global offsets, with a CRC32C
on every chunk; the root ``zarr.json`` holds the manifest and is written last,
so its presence is the commit. ``save`` (with :class:`SaveOptions`), ``save_async``,
``load`` and ``open`` are the API; :class:`Checkpointer` is a training run's
API on top of them; ``spec/tessera-v1.md`` is the format.

``import tessera`` imports neither torch nor NumPy: each public name below is
imported on first use (PEP 562), so ``tessera --version`` and a program that
only catches Tessera's errors start at once. The errors and ``__version__``
are imported eagerly (they import nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    CheckpointDeletedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CollectiveError,
    ConfigMismatchError,
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
    UnsupportedLocationError,
    UnsupportedVersionError,
)
from .util.lazy import lazy_exports
from .version import __version__

if TYPE_CHECKING:
    from .api.checkpoint import Checkpoint
    from .api.checkpoint import open_checkpoint as open
    from .api.checkpointer import Checkpointer, LoadMode, Resumed
    from .api.load import LoadResult, Strict, load
    from .api.run_dir import RunDirectory
    from .api.save import save
    from .api.save_async import AsyncSave, AsyncSaver, save_async
    from .api.verify import VerifyReport, verify
    from .distributed.preemption import Preemption
    from .engine.gpu.direct_io import gpu_direct_storage
    from .format.limits import ReaderLimits
    from .format.manifest import FORMAT_VERSION, Manifest
    from .planning import PlanCache, SaveOptions, Zstd
    from .state import RNGState, ShardedObject, ShardedTensor
    from .state.model_optimizer import ModelAndOptimizer
    from .state.stateful import Stateful

_LAZY = {
    "AsyncSave": (".api.save_async", "AsyncSave"),
    "AsyncSaver": (".api.save_async", "AsyncSaver"),
    "Checkpoint": (".api.checkpoint", "Checkpoint"),
    "Checkpointer": (".api.checkpointer", "Checkpointer"),
    "FORMAT_VERSION": (".format.manifest", "FORMAT_VERSION"),
    "LoadMode": (".api.checkpointer", "LoadMode"),
    "LoadResult": (".api.load", "LoadResult"),
    "Manifest": (".format.manifest", "Manifest"),
    "ModelAndOptimizer": (".state.model_optimizer", "ModelAndOptimizer"),
    "PlanCache": (".planning", "PlanCache"),
    "Preemption": (".distributed.preemption", "Preemption"),
    "ReaderLimits": (".format.limits", "ReaderLimits"),
    "Resumed": (".api.checkpointer", "Resumed"),
    "RNGState": (".state", "RNGState"),
    "RunDirectory": (".api.run_dir", "RunDirectory"),
    "SaveOptions": (".planning", "SaveOptions"),
    "ShardedObject": (".state", "ShardedObject"),
    "ShardedTensor": (".state", "ShardedTensor"),
    "Stateful": (".state.stateful", "Stateful"),
    "Strict": (".api.load", "Strict"),
    "VerifyReport": (".api.verify", "VerifyReport"),
    "Zstd": (".planning", "Zstd"),
    "gpu_direct_storage": (".engine.gpu.direct_io", "gpu_direct_storage"),
    "load": (".api.load", "load"),
    "open": (".api.checkpoint", "open_checkpoint"),
    "save": (".api.save", "save"),
    "save_async": (".api.save_async", "save_async"),
    "verify": (".api.verify", "verify"),
}
"""Each public name imported on first use: the module that defines it, and its name there."""

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "FORMAT_VERSION",
    "AsyncSave",
    "AsyncSaver",
    "Checkpoint",
    "CheckpointDeletedError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "ChecksumMismatchError",
    "CollectiveError",
    "ConfigMismatchError",
    "GpuDirectUnavailableError",
    "InconsistentCheckpointError",
    "InvalidKeyError",
    "KeyMismatchError",
    "LimitExceededError",
    "LoadMode",
    "LoadResult",
    "Manifest",
    "MissingChunkError",
    "ModelAndOptimizer",
    "PlanCache",
    "Preemption",
    "RNGState",
    "ReaderLimits",
    "Resumed",
    "RunDirectory",
    "SaveOptions",
    "SchemaViolationError",
    "ShardedObject",
    "ShardedTensor",
    "ShardingError",
    "Stateful",
    "StorageError",
    "Strict",
    "TensorMismatchError",
    "TesseraError",
    "TesseraWarning",
    "UncommittedCheckpointError",
    "UnsafeEncodingError",
    "UnsupportedLocationError",
    "UnsupportedVersionError",
    "VerifyReport",
    "Zstd",
    "__version__",
    "gpu_direct_storage",
    "load",
    "open",
    "save",
    "save_async",
    "verify",
]
