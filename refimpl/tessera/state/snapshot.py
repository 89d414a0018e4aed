"""Host copies of a state dict, taken while the caller waits, for a save that runs after it returns.

An asynchronous save writes in the background while training goes on and
mutates its tensors in place, so the save must work on a snapshot. Taking it
is the only part of the save the caller waits for; here it is one copy per
tensor into host buffers kept from the previous save (pinned when the tensor
is on a GPU, so that the copies run at full bandwidth and need no allocation
once warm), issued ``non_blocking`` and synchronized once at the end. The
snapshot has the state dict's own structure, so that the ordinary writer saves
it exactly as it would have saved the original: same keys, same manifest.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from ..errors import ShardingError
from ..format.keys import Key
from .dtensor import is_dtensor, sharded_from_dtensor
from .flatten import check_state_dict, is_json
from .sharded import ShardedObject, ShardedTensor
from .stateful import state_of

__all__ = ["HostBuffers"]

Array = torch.Tensor | np.ndarray


class HostBuffers:
    """The host copies of one in-flight save, kept for the next save that stages the same keys.

    A buffer is reused when its key, shape, dtype and pinning match, and dropped
    when a save no longer has its key; reallocating pinned memory would cost more
    than the copy itself. A buffer set must not be staged into again before the
    save that reads it has finished.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[Key, bool], Array] = {}
        """Buffers by key and pinning."""

    def stage(self, state_dict: Mapping[Any, Any]) -> tuple[dict[Any, Any], int]:
        """A snapshot of ``state_dict`` in these buffers, and the bytes copied.

        Tensors (``ShardedTensor`` local data and ``DTensor`` local shards included) and
        NumPy arrays are copied into the buffers; other leaves are deep-copied. When it
        returns, every copy is complete, and the caller may modify its state.
        """
        check_state_dict(state_dict)
        staging = _Staging(self._held)
        with torch.no_grad():
            staged = {k: staging.tree(v, (k,)) for k, v in state_dict.items()}
        staging.synchronize()
        self._held = staging.used
        return staged, staging.nbytes


class _Staging:
    """One staging pass: walks the state dict as :func:`tessera.state.flatten.flatten` does."""

    def __init__(self, previous: dict[tuple[Key, bool], Array]) -> None:
        self.previous = previous
        self.used: dict[tuple[Key, bool], Array] = {}
        self.nbytes = 0
        self.devices: set[torch.device] = set()

    def tree(self, node: Any, key: Key) -> Any:
        node = state_of(node)  # taken now: the object goes on changing while the save runs
        if isinstance(node, Mapping) and not is_json(node):
            children = {k: self.tree(v, (*key, k)) for k, v in node.items()}
            # A mapping that is not a dict is walked even when it holds only JSON; a dict would
            # become one JSON leaf. A read-only view keeps it a non-dict mapping.
            return children if isinstance(node, dict) else MappingProxyType(children)
        if isinstance(node, (list, tuple)) and not is_json(node):
            items = [self.tree(v, (*key, i)) for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return self.leaf(node, key)

    def leaf(self, value: Any, key: Key) -> Any:
        if isinstance(value, ShardedTensor):
            return ShardedTensor(
                self.array(value.local, key),
                value.global_shape,
                value.global_offset,
                value.box_shape,
                value.flat_range,
                value.replica_id,
            )
        if isinstance(value, ShardedObject):
            return ShardedObject(
                self.leaf(value.value, key), value.grid_shape, value.grid_offset, value.replica_id
            )
        if is_dtensor(value):
            return self.dtensor(value, key)
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return self.array(value, key)
        try:
            return copy.deepcopy(value)
        except Exception:
            # deepcopy and pickle share one protocol: what deepcopy cannot copy, the writer cannot
            # pickle either, so it refuses the value (on every rank) without reading it.
            return value

    def dtensor(self, t: Any, key: Key) -> Any:
        """A ``DTensor`` as the ``ShardedTensor`` of its local shard, on the host."""
        try:
            shards = sharded_from_dtensor(t)
        except ShardingError:
            return t  # the writer raises the same error, on every rank, before reading any data
        if not shards:
            # This rank holds none of it: an empty flat range still gives the writer the shape and dtype.
            shape = tuple(int(s) for s in t.shape)
            empty = torch.empty(0, dtype=t.dtype)
            return ShardedTensor(empty, shape, (0,) * len(shape), box_shape=shape, flat_range=(0, 0))
        if len(shards) > 1:
            # Several boxes (a _StridedShard whose split factors match no shard order) make no single
            # ShardedTensor: the DTensor is copied on its own device, and the writer reads that copy.
            from torch.distributed.tensor import DTensor

            local = t.to_local().clone()
            self.nbytes += local.numel() * local.element_size()
            if local.is_cuda:
                self.devices.add(local.device)
            return DTensor.from_local(
                local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        shard = shards[0]
        return ShardedTensor(
            self.array(shard.local, key), shard.global_shape, shard.global_offset, replica_id=shard.replica_id
        )

    def array(self, source: Array, key: Key) -> Array:
        """``source`` copied into this key's buffer (reused when it fits, else a new one)."""
        if isinstance(source, np.ndarray):
            held = self.previous.get((key, False))
            if not (
                isinstance(held, np.ndarray) and held.shape == source.shape and held.dtype == source.dtype
            ):
                held = np.empty(source.shape, source.dtype)
            np.copyto(held, source)
            return self._use((key, False), held, held.nbytes)
        if source.layout != torch.strided or source.is_nested or source.device.type == "meta":
            return source  # the writer refuses these before reading any data
        pinned = source.is_cuda
        buffer = self.previous.get((key, pinned))
        if not (
            isinstance(buffer, torch.Tensor) and buffer.shape == source.shape and buffer.dtype == source.dtype
        ):
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=pinned)
        buffer.copy_(source, non_blocking=pinned)
        if pinned:
            self.devices.add(source.device)
        return self._use((key, pinned), buffer, buffer.numel() * buffer.element_size())

    def _use(self, slot: tuple[Key, bool], buffer: Array, nbytes: int) -> Array:
        self.used[slot] = buffer
        self.nbytes += nbytes
        return buffer

    def synchronize(self) -> None:
        """Wait for the copies issued ``non_blocking``, once per GPU (on the stream they were issued on)."""
        for device in self.devices:
            torch.cuda.current_stream(device).synchronize()
