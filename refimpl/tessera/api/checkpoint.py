"""``tessera.open``: a lazy, validated handle on a committed checkpoint (spec §11).

Opening reads one document, the root ``zarr.json``: its version is checked first, then its
schema, then every entry against the reader limits, all before any array is touched. Reads
then fetch only the chunks that overlap the requested region, open each chunk file once, and
check each chunk's size and CRC32C. The handle is what users call (keys, entries, reads); the
reading itself is the engine's (:mod:`tessera.engine.read_engine`).
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..engine.allocation import allocate, check_allocation
from ..engine.gpu.direct_io import storage_with_device_io
from ..engine.read_engine import ReadEngine, ReadRequestSpec, key_path
from ..engine.read_targets import ReadRequest
from ..engine.regions import Region, bounds_of
from ..engine.root import read_manifest
from ..errors import UnsafeEncodingError
from ..format.keys import Key, PathTree
from ..format.limits import DEFAULT_LIMITS, ReaderLimits
from ..format.manifest import Entry, Manifest, ObjectEntry, TensorEntry, ValueEntry
from ..state.tensors import as_numpy
from ..storage.base import Storage
from ..storage.resolve import Location, storage_for

__all__ = ["Checkpoint", "Region", "engine_of", "open_checkpoint", "storage_of"]


def storage_of(location: Location, gpu_direct: bool | None) -> Storage:
    """The storage for ``location``; ``gpu_direct`` is the deprecated keyword of ``open`` and
    ``load`` (removed in the next release), warned about wherever given, the warning pointing
    at their caller."""
    if gpu_direct is None:
        return storage_for(location)
    warnings.warn(
        "the gpu_direct= keyword is deprecated and will be removed in the next release; pass "
        "tessera.gpu_direct_storage(path) as the location instead",
        DeprecationWarning,
        stacklevel=3,
    )
    return storage_with_device_io(location, gpu_direct)


def open_checkpoint(
    path: Location,
    *,
    limits: ReaderLimits = DEFAULT_LIMITS,
    threads: int | None = None,
    gpu_direct: bool | None = None,
) -> Checkpoint:
    """Open the committed checkpoint at ``path`` (a path, a URL or a :class:`~tessera.storage.Storage`);
    raises before any array is read if it is not one.

    Pass ``tessera.gpu_direct_storage(path)`` to read the chunks of GPU tensors straight from
    their files into device memory through cuFile (KvikIO), checksummed on the GPU.
    ``threads`` is the number of I/O threads of each read (default: suited to the host, more
    for GPU-direct storage). ``gpu_direct=True`` is a deprecated alias of the former.
    """
    storage = storage_of(path, gpu_direct)
    return Checkpoint(storage, read_manifest(storage, limits), limits=limits, threads=threads)


class Checkpoint:
    """A committed checkpoint: its manifest in memory, its arrays read on demand.

    Use it as a context manager (or call :meth:`close`) to release what it holds once done."""

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest,
        *,
        limits: ReaderLimits = DEFAULT_LIMITS,
        threads: int | None = None,
    ) -> None:
        self._engine = ReadEngine(storage, manifest, limits=limits, threads=threads)
        self._subtrees: PathTree | None = None
        self._closed = False

    @property
    def storage(self) -> Storage:
        """Where the checkpoint lives."""
        return self._engine.storage

    @property
    def manifest(self) -> Manifest:
        """The validated manifest of the root ``zarr.json``."""
        return self._engine.manifest

    # -- what is stored ---------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.metadata

    def keys(self) -> list[str]:
        """Every stored key as a path (``optimizer/state/~0/exp_avg``), in state-dict order."""
        return list(self._engine.by_path)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, tuple)) and key_path(key) in self._engine.by_path

    def __iter__(self) -> Iterator[str]:
        return iter(self._engine.by_path)

    def __len__(self) -> int:
        return len(self._engine.by_path)

    def entry(self, key: str | Key) -> Entry:
        """The manifest's entry of ``key``; raises :class:`~tessera.KeyMismatchError` if not stored."""
        return self._engine.entry(key)

    def subtree(self, prefix: str | Key) -> list[Entry]:
        """The entries stored at ``prefix`` or below it, in state-dict order."""
        if self._subtrees is None:  # built once: a load asks for one subtree per template key
            tree = PathTree()
            for index, path in enumerate(self._engine.by_path):
                tree.add(path, index)
            self._subtrees = tree
        node = self._subtrees.find(key_path(prefix))
        if node is None:
            return []
        entries = self.manifest.entries
        return [entries[i] for i in node.items]

    # -- reading ----------------------------------------------------------------------------

    def read(
        self, key: str | Key, region: Region = None, *, progress: bool = False
    ) -> torch.Tensor | np.ndarray:
        """A tensor (or NumPy array, if one was saved), whole or the ``region`` of it; with
        ``progress``, a bar on stderr while it reads."""
        engine = self._open_engine()
        entry = engine.array_entry(key)
        bounds, dropped = bounds_of(region, entry.layout.shape, entry.path)
        nbytes = math.prod(b - a for a, b in bounds) * entry.layout.dtype.itemsize
        check_allocation(self.storage.location, engine.limits, [(entry, nbytes)])
        out = allocate(entry, [b - a for a, b in bounds])
        engine.fill([ReadRequest(entry, bounds, out, None)], [entry], progress=progress)
        for dim in reversed(dropped):
            out = out.squeeze(dim)
        if isinstance(entry, TensorEntry) and entry.origin == "numpy":
            return as_numpy(out, entry.layout.dtype)
        return out

    def read_into(
        self, key: str | Key, out: torch.Tensor, region: Region = None, *, progress: bool = False
    ) -> None:
        """Read into an existing tensor (any device, any strides) of matching shape and dtype."""
        self.read_many([(key, out, region)], progress=progress)

    def read_many(self, requests: Sequence[ReadRequestSpec], *, progress: bool = False) -> None:
        """Fill each ``(key, out, region)`` request; the chunks of all of them are read in one
        parallel pass, so that many small tensors load as fast as one large one."""
        engine = self._open_engine()
        checked = engine.requests(requests)
        engine.fill(checked, [r.entry for r in checked], progress=progress)

    def value(self, key: str | Key, *, allow_pickle: bool = False, progress: bool = False) -> Any:
        """Any stored value: a tensor, an array, bytes, a JSON value, or an unpickled object."""
        return self.values([key], allow_pickle=allow_pickle, progress=progress)[0]

    def values(
        self, keys: Sequence[str | Key], *, allow_pickle: bool = False, progress: bool = False
    ) -> list[Any]:
        """The values of several keys, their arrays read in one parallel pass."""
        entries = [self.entry(k) for k in keys]
        pickled = [e.path for e in entries if isinstance(e, ObjectEntry) and e.encoding == "pickle"]
        if pickled and not allow_pickle:
            raise UnsafeEncodingError(
                f"{pickled[0]} is pickled; unpickling can run arbitrary code. "
                "Pass allow_pickle=True only for checkpoints you trust"
            )
        engine = self._open_engine()
        arrays_of = [e for e in entries if not isinstance(e, ValueEntry)]
        check_allocation(self.storage.location, engine.limits, [(e, e.layout.nbytes) for e in arrays_of])
        arrays = {e.path: allocate(e, list(e.layout.shape)) for e in arrays_of}
        self.read_many([(path, out, None) for path, out in arrays.items()], progress=progress)
        return [_decode(e, arrays.get(e.path)) for e in entries]

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release what the handle holds (its CUDA streams, once their copies landed, and the
        record of checked arrays); reads on a closed handle raise ``ValueError``."""
        if not self._closed:
            self._closed = True
            self._engine.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open_engine(self) -> ReadEngine:
        if self._closed:
            raise ValueError(f"the handle on {self.storage.location} is closed; open the checkpoint again")
        return self._engine

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return (
            f"<tessera.Checkpoint {self.storage.location} "
            f"format {self.manifest.format_version}, {len(self)} keys{closed}>"
        )


def engine_of(checkpoint: Checkpoint) -> ReadEngine:
    """The read engine behind ``checkpoint``, for the API's own passes (``load``, which may read
    together with other ranks); raises ``ValueError`` if the handle is closed."""
    return checkpoint._open_engine()  # noqa: SLF001 - the API layer's access to its own handle


def _decode(entry: Entry, array: torch.Tensor | None) -> Any:
    """The value of ``entry`` from its array as read (``None`` for a JSON value)."""
    if isinstance(entry, ValueEntry):
        return entry.decoded()
    assert array is not None
    if isinstance(entry, TensorEntry):
        return as_numpy(array, entry.layout.dtype) if entry.origin == "numpy" else array
    raw = array.numpy().tobytes()
    return raw if entry.encoding == "bytes" else pickle.loads(raw)  # noqa: S301 - opted in
