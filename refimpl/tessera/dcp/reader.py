"""``TesseraStorageReader``: ``dcp.load`` reads Tessera checkpoints, resharding as DCP plans.

``read_metadata`` describes the committed manifest to DCP: each array as a
``TensorStorageMetadata`` whose chunks are the array's chunk grid, so that DCP
plans one read per stored chunk that a rank's shard overlaps; each JSON or
bytes value as ``BytesStorageMetadata`` under the keys DCP's flattening gives
it (``optim.param_groups.0.lr``). ``read_data`` fills every tensor read item
from a region read (only the chunks it overlaps are fetched, each CRC checked),
all of a rank's items in one parallel pass.

Non-tensor values: with :class:`~tessera.dcp.TesseraLoadPlanner` the stored
JSON value is handed over as it is (``load_value``). DCP's default planner
accepts only ``torch.save`` bytes, which it unpickles (``load_bytes``); for it
the reader pickles the JSON value in memory, so that what is unpickled is bytes
this process made from JSON, never bytes read from the checkpoint. A pickled
entry (saved with ``pickle_keys``) is refused: load it with
``tessera.load(..., allow_pickle=True)``.
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..api.checkpoint import Checkpoint, open_checkpoint
from ..errors import InvalidKeyError, KeyMismatchError, UnsafeEncodingError
from ..format.keys import Key
from ..format.layout import ArrayLayout
from ..format.manifest import Entry, Manifest, ObjectEntry, ValueEntry
from ..storage.resolve import Location
from .keys import dcp_key, json_leaves, value_at

__all__ = ["TesseraStorageReader"]


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a DCP key's data is: an array's entry, or a value's entry and the path inside it."""

    entry: Entry
    inner: Key | None
    """``None`` for an array."""


class TesseraStorageReader(StorageReader):
    """A DCP storage reader of any committed Tessera checkpoint (``tessera.save`` or ``dcp.save``).

    ``location`` is a path, a URL or a :class:`~tessera.storage.base.Storage`;
    ``dcp.load(checkpoint_id=...)`` replaces it. Every rank opens the checkpoint itself.
    """

    def __init__(self, location: Location) -> None:
        super().__init__()
        self.location: Location = location
        self._checkpoint: Checkpoint | None = None
        self._sources: dict[str, _Source] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.location = checkpoint_id
        self._close()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self._open()
        described: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        for name, source in self._sources.items():
            entry = source.entry
            if source.inner is None and not isinstance(entry, ValueEntry):
                described[name] = _tensor_metadata(entry.layout)
            else:
                described[name] = BytesStorageMetadata()
        location = self.location
        meta = StorageMeta(checkpoint_id=location) if isinstance(location, (str, os.PathLike)) else None
        return Metadata(state_dict_metadata=described, storage_meta=meta)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._open()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        checkpoint = self._open()
        tensors = [item for item in plan.items if item.type != LoadItemType.BYTE_IO]
        self._read_tensors(checkpoint, tensors, planner)
        values = [item for item in plan.items if item.type == LoadItemType.BYTE_IO]
        paths = list(dict.fromkeys(self._source(item).entry.path for item in values))
        stored = dict(zip(paths, checkpoint.values(paths), strict=True)) if paths else {}
        for item in values:
            source = self._source(item)
            _hand_over(planner, item, value_at(stored[source.entry.path], source.inner or ()))
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_tensors(self, checkpoint: Checkpoint, items: list[ReadItem], planner: LoadPlanner) -> None:
        """Fill every item's target in one parallel pass; a target of another dtype gets a copy."""
        requests: list[tuple[str, torch.Tensor, Any]] = []
        targets: list[tuple[ReadItem, torch.Tensor, torch.Tensor]] = []
        for item in items:
            source = self._source(item)
            target = planner.resolve_tensor(item).detach()
            entry = source.entry
            if isinstance(entry, ValueEntry):
                raise KeyMismatchError(f"{item.storage_index.fqn}: stored as a value, not a tensor")
            dtype = entry.layout.dtype.torch_dtype
            into = target if target.dtype == dtype else torch.empty(tuple(item.lengths), dtype=dtype)
            start = [
                a + b for a, b in zip(item.storage_index.offset or (), item.storage_offsets, strict=True)
            ]
            region = tuple(slice(a, a + n) for a, n in zip(start, item.lengths, strict=True))
            requests.append((entry.path, into, region))
            targets.append((item, target, into))
        checkpoint.read_many(requests)
        for item, target, into in targets:
            if into is not target:
                target.copy_(into)
            planner.commit_tensor(item, target)

    def _source(self, item: ReadItem) -> _Source:
        source = self._sources.get(item.storage_index.fqn)
        if source is None:
            raise KeyMismatchError(f"{item.storage_index.fqn}: not stored in {self.location}")
        return source

    def _open(self) -> Checkpoint:
        if self._checkpoint is None:
            self._checkpoint = open_checkpoint(self.location)
            self._sources = _sources(self._checkpoint.manifest)
        return self._checkpoint

    def _close(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.close()
        self._checkpoint, self._sources = None, {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _sources(manifest: Manifest) -> dict[str, _Source]:
    """Every DCP key of the manifest's entries; two entries that flatten alike are refused."""
    sources: dict[str, _Source] = {}
    for entry in manifest.entries:
        if isinstance(entry, ValueEntry):
            named = [(name, _Source(entry, inner)) for name, inner in json_leaves(entry.key, entry.decoded())]
        elif isinstance(entry, ObjectEntry) and entry.encoding == "pickle":
            raise UnsafeEncodingError(
                f"{entry.path} is pickled; DCP through Tessera never unpickles. "
                "Load it with tessera.load(..., allow_pickle=True) if you trust the checkpoint"
            )
        else:
            named = [(dcp_key(entry.key), _Source(entry, None if entry.kind == "tensor" else ()))]
        for name, source in named:
            if name in sources:
                raise InvalidKeyError(
                    f"{name}: the stored keys {sources[name].entry.path} and {source.entry.path} "
                    "have the same DCP key"
                )
            sources[name] = source
    return sources


def _tensor_metadata(layout: ArrayLayout) -> TensorStorageMetadata:
    """An array with its chunk grid as DCP's chunks (edge chunks cut at the array's end)."""
    grids = [
        range(0, size, chunk) if size else range(1)
        for size, chunk in zip(layout.shape, layout.chunk_shape, strict=True)
    ]
    chunks = [
        ChunkStorageMetadata(
            torch.Size(offset),
            torch.Size(
                min(c, s - o) for o, c, s in zip(offset, layout.chunk_shape, layout.shape, strict=True)
            ),
        )
        for offset in itertools.product(*grids)
    ]
    return TensorStorageMetadata(
        TensorProperties(dtype=layout.dtype.torch_dtype), torch.Size(layout.shape), chunks
    )


def _hand_over(planner: LoadPlanner, item: ReadItem, value: Any) -> None:
    load_value = getattr(planner, "load_value", None)
    if load_value is not None:
        load_value(item, value)
        return
    made = io.BytesIO()
    torch.save(value, made)  # bytes made here from the JSON value, for a planner that unpickles
    made.seek(0)
    planner.load_bytes(item, made)
