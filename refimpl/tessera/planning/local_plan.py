"""A rank's local plan: what it holds of each key, as metadata, plus where the bytes are.

The metadata (:class:`LeafSpec`) is what the rank sends to the coordinator:
key, kind, data type, global shape, and the boxes or flat ranges it holds.
It is small and picklable. The bytes stay on the rank as :class:`Piece`
views (on whatever device they live) until the global plan says which ones
this rank writes or sends. Every check that needs only this rank's state
(bad keys, unsupported values, pickling) fails here, before any collective.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from ..errors import TensorMismatchError, UnsafeEncodingError
from ..format.dtypes import DType, dtype_by_name, dtype_of_numpy, dtype_of_torch
from ..format.keys import Key, key_to_path
from ..state.boxes import Box, held_boxes
from ..state.dtensor import is_dtensor, sharded_from_dtensor
from ..state.flatten import Flattened, is_json
from ..state.sharded import Piece, ShardedObject, ShardedTensor
from ..state.tensors import as_numpy
from .options import SaveOptions

__all__ = ["Cell", "Extent", "LeafSpec", "LocalPlan", "make_local_plan", "piece_data"]


class Extent(NamedTuple):
    """A shard of a global tensor: a box, or a flat range of it, and its replica id."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    flat_range: tuple[int, int] | None
    replica_id: int

    def boxes(self) -> list[tuple[Box, int]]:
        return held_boxes(self.offset, self.shape, self.flat_range)


class Cell(NamedTuple):
    """The grid cell of a sharded object: the grid's key, its shape, the cell and whether main."""

    grid_path: str
    grid_shape: tuple[int, ...]
    offset: tuple[int, ...]
    main: bool


@dataclass(frozen=True, slots=True)
class LeafSpec:
    """What one rank says about one key."""

    key: Key
    kind: Literal["tensor", "object", "value"]
    dtype: str = ""
    shape: tuple[int, ...] = ()
    """The global shape."""
    tag: str = ""
    """Tensors: the origin (``torch``/``numpy``); objects and values: the encoding."""
    value: Any = None
    sharded: bool = False
    """``False``: a plain value, held whole by every rank that has it (replicas)."""
    extents: tuple[Extent, ...] = ()
    """Sharded tensors: what this rank holds."""
    cell: Cell | None = None

    @property
    def path(self) -> str:
        return key_to_path(self.key)


@dataclass(frozen=True, slots=True)
class LocalPlan:
    arrays: tuple[LeafSpec, ...]
    """Tensor and object leaves; ``pieces[i]`` holds the bytes of ``arrays[i]``."""
    values: tuple[LeafSpec, ...]
    """JSON leaves, stored in the manifest."""
    order: tuple[str, ...]
    """Every leaf's path in state-dict order."""
    lists: tuple[Key, ...]
    tuples: tuple[Key, ...]
    """The keys of ``lists`` that were tuples."""
    pieces: tuple[tuple[Piece, ...], ...]
    unused_pickle_keys: frozenset[str]

    def layout_digest(self, options: SaveOptions, world_size: int) -> bytes:
        """Identifies the arrays' layout (not their bytes, not the JSON values): a plan cache key."""
        chunk_shapes = sorted(options.chunk_shapes.items())
        key = (self.arrays, options.chunk_bytes, options.compression, chunk_shapes, world_size)
        return hashlib.blake2b(pickle.dumps(key), digest_size=16).digest()


_UINT8 = dtype_by_name("uint8")


def make_local_plan(flat: Flattened, options: SaveOptions) -> LocalPlan:
    """Describe every leaf of this rank's flattened state dict; raises on what cannot be stored."""
    arrays: list[LeafSpec] = []
    values: list[LeafSpec] = []
    pieces: list[tuple[Piece, ...]] = []
    order: list[str] = []
    pickle_keys = set(options.pickle_keys)
    for key, value in flat.leaves:
        for spec, held in _plan_leaf(key, value, pickle_keys):
            order.append(spec.path)
            if spec.kind == "value":
                values.append(spec)
            else:
                arrays.append(spec)
                pieces.append(held)
    used = {p for p in order if p in pickle_keys}
    return LocalPlan(
        tuple(arrays),
        tuple(values),
        tuple(order),
        tuple(flat.lists),
        tuple(flat.tuples),
        tuple(pieces),
        frozenset(pickle_keys - used),
    )


def _plan_leaf(key: Key, value: Any, pickle_keys: set[str]) -> list[tuple[LeafSpec, tuple[Piece, ...]]]:
    if isinstance(value, ShardedObject):
        grid_path = key_to_path(key)
        cell = Cell(grid_path, value.grid_shape, value.grid_offset, value.replica_id == 0)
        return [
            (_with_cell(spec, cell), held)
            for spec, held in _plan_leaf((*key, *value.grid_offset), value.value, pickle_keys)
        ]
    if isinstance(value, ShardedTensor):
        return [_sharded(key, [value])]
    if is_dtensor(value):
        return [_sharded(key, sharded_from_dtensor(value), tuple(value.shape), value.dtype)]
    path = key_to_path(key)
    if path in pickle_keys:
        blob = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        return [_whole(key, "object", _UINT8, blob, "pickle")]
    if isinstance(value, torch.Tensor):
        _check_dense(path, value)
        return [_whole(key, "tensor", dtype_of_torch(value.dtype, path), value, "torch")]
    if isinstance(value, (np.ndarray, np.generic)):
        array = _little_endian(np.asarray(value))
        return [_whole(key, "tensor", dtype_of_numpy(array.dtype, path), array, "numpy")]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [_whole(key, "object", _UINT8, np.frombuffer(bytes(value), np.uint8), "bytes")]
    if is_json(value):
        return [(LeafSpec(key, "value", value=value, tag="json"), ())]
    if isinstance(value, float):
        spelling = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        return [(LeafSpec(key, "value", value=spelling, tag="float"), ())]
    raise UnsafeEncodingError(
        f"{path}: a {type(value).__module__}.{type(value).__qualname__} is neither a tensor, "
        f"an array, bytes nor JSON; pass pickle_keys=[{path!r}] to store it pickled "
        "(readers must then opt in to unpickle it)"
    )


def _with_cell(spec: LeafSpec, cell: Cell) -> LeafSpec:
    return LeafSpec(
        spec.key, spec.kind, spec.dtype, spec.shape, spec.tag, spec.value, spec.sharded, spec.extents, cell
    )


def _whole(
    key: Key, kind: Literal["tensor", "object"], dtype: DType, data: torch.Tensor | np.ndarray, tag: str
) -> tuple[LeafSpec, tuple[Piece, ...]]:
    shape = tuple(int(s) for s in data.shape)
    box = Box((0,) * len(shape), shape)
    return LeafSpec(key, kind, dtype.name, shape, tag), ((Piece(box, data),) if box.volume else ())


def _sharded(
    key: Key, shards: list[ShardedTensor], shape: tuple[int, ...] | None = None, dtype: Any = None
) -> tuple[LeafSpec, tuple[Piece, ...]]:
    """A sharded tensor leaf; a DTensor passes its global shape and dtype (it may hold no shard)."""
    path = key_to_path(key)
    shape = shards[0].global_shape if shards else shape
    dtype = shards[0].dtype if shards else dtype
    assert shape is not None
    for shard in shards:
        if isinstance(shard.local, torch.Tensor):
            _check_dense(path, shard.local)
    origin = "numpy" if isinstance(dtype, np.dtype) else "torch"
    stored = dtype_of_numpy(dtype, path) if isinstance(dtype, np.dtype) else dtype_of_torch(dtype, path)
    extents = tuple(Extent(s.global_offset, s.box.shape, s.flat_range, s.replica_id) for s in shards)
    held = tuple(piece for shard in shards for piece in shard.pieces())
    return LeafSpec(key, "tensor", stored.name, tuple(shape), origin, sharded=True, extents=extents), held


def _check_dense(path: str, tensor: torch.Tensor) -> None:
    if tensor.layout != torch.strided or tensor.is_nested or tensor.device.type == "meta":
        raise TensorMismatchError(
            f"{path}: {tensor.layout} / {tensor.device} tensors have no data to save; "
            "convert to a dense tensor first"
        )


def _little_endian(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array


def piece_data(piece: Piece, dtype: DType) -> np.ndarray | torch.Tensor:
    """The piece's elements, box-shaped, where they live: a NumPy view of CPU memory (C-contiguous,
    of the stored data type; copied only if the tensor is not contiguous), or a tensor on its GPU,
    copied to the host one chunk at a time by the writer rather than all at once here."""
    data = piece.data
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(piece.box.shape)
    data = data.detach()
    if data.is_conj():
        data = data.resolve_conj()
    if data.is_neg():
        data = data.resolve_neg()
    if data.device.type != "cpu":
        return data.reshape(piece.box.shape)
    return as_numpy(data.contiguous(), dtype).reshape(piece.box.shape)
