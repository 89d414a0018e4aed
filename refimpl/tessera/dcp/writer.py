"""``TesseraStorageWriter``: ``dcp.save`` and ``dcp.async_save`` commit a standard Tessera checkpoint.

DCP plans (every rank's ``SavePlan``, merged and deduplicated at the
coordinator), then calls ``write_data`` on every rank and ``finish`` on the
coordinator. Here ``write_data`` does the whole Tessera save: it turns the
rank's planned tensor chunks into ``tessera.ShardedTensor`` s (global shape and
offset from the write items, one owner each since DCP deduplicated them), adds
the rank's non-tensor values (each taken as it is, never pickled), and runs
:func:`tessera.save` on every rank together, which regularizes the shards into
chunks with one writer each, writes them with their CRCs and commits at the
coordinator (rank 0 of the process group). **The commit happens in
``write_data``**, once every rank's chunks are durable; ``finish`` only
confirms it. A failure on any rank fails ``write_data`` on every rank and
leaves nothing committed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..api.save import save
from ..errors import CollectiveError, ShardingError, UnsafeEncodingError
from ..format.keys import Key
from ..format.manifest import Manifest
from ..planning.options import SaveOptions
from ..state.sharded import ShardedTensor
from ..storage.resolve import Location
from .keys import nest

__all__ = ["TesseraStorageWriter"]


class TesseraStorageWriter(StorageWriter):
    """A DCP storage writer whose checkpoint is the one :func:`tessera.save` writes.

    ``location`` is a new directory (a path or URL) or a :class:`~tessera.storage.base.Storage`;
    ``dcp.save(checkpoint_id=...)`` replaces it. ``process_group`` must be the one given to
    ``dcp.save`` (DCP does not pass it on); the default is the world, or one process when
    ``torch.distributed`` is not initialized or DCP runs with ``no_dist``/``use_collectives=False``
    in a world of one. ``options`` (:class:`~tessera.SaveOptions`) and ``metadata`` are
    :func:`tessera.save`'s; ``options.pickle_keys`` is the opt-in for values that are neither
    JSON nor bytes, which otherwise fail naming their key.
    """

    def __init__(
        self,
        location: Location,
        *,
        process_group: dist.ProcessGroup | None = None,
        options: SaveOptions | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.location: Location = location
        self.process_group = process_group
        self.options = options
        self.metadata = metadata
        self.manifest: Manifest | None = None
        """The committed manifest, once ``write_data`` returned."""
        self._collective = True
        self._values: list[WriteItem] = []

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.location = checkpoint_id
        self.manifest = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # DCP passes rank and use_collectives only to a parameter named ``kwargs``.
        self._collective = bool(kwargs.get("use_collectives", True))
        rank = kwargs.get("rank")
        if _world_size(self.process_group) > 1 and (
            not self._collective or (rank is not None and rank != dist.get_rank(self.process_group))
        ):
            raise CollectiveError(
                f"{self.location}: a Tessera checkpoint is committed by all ranks together; "
                "dcp.save with no_dist or use_collectives=False works only in a world of one process"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # Every value this rank holds, before DCP's deduplication gives each to one rank:
        # tessera.save checks that the ranks agree on them, as it does for any replicated value.
        self._values = [item for item in plan.items if item.type == WriteItemType.BYTE_IO]
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def storage_meta(self) -> StorageMeta | None:
        location = self.location
        return StorageMeta(checkpoint_id=location) if isinstance(location, (str, os.PathLike)) else None

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        mappings: Mapping[str, Key] = getattr(planner, "mappings", None) or {}
        leaves: list[tuple[Key, Any]] = []
        results: list[WriteResult] = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                continue
            tensor = planner.resolve_data(item)
            if not isinstance(tensor, torch.Tensor) or item.tensor_data is None:
                raise ShardingError(
                    f"{item.index.fqn}: the planner resolved a tensor's shard to a {type(tensor).__name__}"
                )
            if tensor.numel() == 0 and math.prod(item.tensor_data.size) > 0:
                continue  # an empty shard (uneven sharding) holds nothing to write
            leaves.append((_path(item.index, mappings), _shard(tensor.detach(), item)))
            results.append(WriteResult(item.index, tensor.numel() * tensor.element_size(), None))
        for item in self._values:
            leaves.append((_path(item.index, mappings), _value(planner, item.index)))
            results.append(WriteResult(item.index, 0, None))
        group = self.process_group if self._collective else None
        self.manifest = save(
            nest(leaves), self.location, options=self.options, metadata=self.metadata, process_group=group
        )
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self.manifest is None:
            raise CollectiveError(f"{self.location}: DCP finished a save that Tessera did not commit")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _shard(tensor: torch.Tensor, item: WriteItem) -> torch.Tensor | ShardedTensor:
    """A planned chunk as Tessera takes it: the tensor itself where the chunk is all of it (as
    ``tessera.save`` is given a plain tensor), else its box in the global tensor."""
    assert item.tensor_data is not None
    shape, offset = tuple(item.tensor_data.size), tuple(item.tensor_data.chunk.offsets)
    if tuple(tensor.shape) == shape and not any(offset):
        return tensor
    return ShardedTensor(tensor, shape, offset)


def _path(index: MetadataIndex, mappings: Mapping[str, Key]) -> Key:
    """The item's path in the user's nested state dict (DCP's flattening mappings)."""
    return tuple(mappings.get(index.fqn, (index.fqn,)))


def _value(planner: SavePlanner, index: MetadataIndex) -> Any:
    """A non-tensor value as the user gave it: ``resolve_data`` would ``torch.save`` it."""
    lookup = getattr(planner, "lookup_object", None)
    if lookup is None:  # its resolve_data is all there is, and DCP's convention is a pickle
        raise UnsafeEncodingError(
            f"{index.fqn}: TesseraStorageWriter takes non-tensor values through the planner's "
            "lookup_object; use tessera.dcp.TesseraSavePlanner (or DCP's DefaultSavePlanner)"
        )
    return lookup(index)


def _world_size(group: dist.ProcessGroup | None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)
