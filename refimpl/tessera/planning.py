"""Save planning: from keyed leaves to manifest entries and the chunks to write (spec §5, §8).

The plan is data only, made and checked before a byte is written: every key
is encoded (bad keys fail here, not halfway through a save), every value gets
its encoding (pickle only where the caller named the key), every array its
chunk grid. The writer then executes it; the distributed writer will gather
the per-rank plans into one global plan of the same shape.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InvalidKeyError, LimitExceededError, TensorMismatchError, UnsafeEncodingError
from .flatten import Flattened, is_json
from .format.dtypes import DTYPES, DType, dtype_of_numpy, dtype_of_torch
from .format.keys import Key, key_to_path, parent_paths
from .format.layout import ArrayLayout
from .format.limits import DEFAULT_LIMITS
from .format.manifest import Entry, ObjectEntry, TensorEntry, ValueEntry
from .tensors import as_numpy

__all__ = ["ArrayWrite", "SaveOptions", "SavePlan", "choose_chunk_shape", "plan_save"]

DEFAULT_CHUNK_BYTES = 64 * 2**20
_UINT8 = next(d for d in DTYPES if d.name == "uint8")


@dataclass(frozen=True, slots=True)
class SaveOptions:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Target size of a chunk: large enough for full-speed I/O, small enough for partial reads."""
    zstd_level: int | None = None
    """Compress every array with zstd at this level; ``None`` stores raw bytes."""
    pickle_keys: Collection[str] = ()
    """Keys (paths, as ``inspect`` prints them) whose values may be pickled."""


@dataclass(frozen=True, slots=True)
class ArrayWrite:
    """One array of the plan and the CPU data its chunks are cut from."""

    entry: TensorEntry | ObjectEntry
    data: np.ndarray
    """C-contiguous, typed as the entry's data type."""


@dataclass(frozen=True, slots=True)
class SavePlan:
    entries: tuple[Entry, ...]
    lists: tuple[Key, ...]
    arrays: tuple[ArrayWrite, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.entry.layout.nbytes for a in self.arrays)


def choose_chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """A chunk shape whose chunks are contiguous in C order and close to ``chunk_bytes``.

    The chunk is ``[1, ..., 1, n, *shape[k+1:]]`` for the outermost dimension
    ``k`` whose trailing block fits: every chunk is then one contiguous byte
    range of the tensor, written and read in place with no gather.
    """
    if not shape:
        return ()
    trailing = [math.prod(shape[d + 1 :]) * itemsize for d in range(len(shape))]
    for k, block in enumerate(trailing):
        # The innermost dimension always fits: a chunk is at least one element.
        if block <= chunk_bytes or k == len(shape) - 1:
            n = max(1, min(shape[k], chunk_bytes // max(block, 1)))
            return (*([1] * k), n, *(max(s, 1) for s in shape[k + 1 :]))
    raise AssertionError("unreachable: the loop returns at the innermost dimension")


def plan_save(flat: Flattened, options: SaveOptions) -> SavePlan:
    """Check every leaf and decide how it is stored; raises before anything is written."""
    if not 0 < options.chunk_bytes <= DEFAULT_LIMITS.max_chunk_bytes:
        raise LimitExceededError(
            f"chunk_bytes={options.chunk_bytes}: readers refuse chunks "
            f"over {DEFAULT_LIMITS.max_chunk_bytes} bytes"
        )
    entries: list[Entry] = []
    arrays: list[ArrayWrite] = []
    folded_paths: dict[str, str] = {}
    pickle_keys = set(options.pickle_keys)
    for key, value in flat.leaves:
        path = key_to_path(key)
        _check_case_collisions(path, folded_paths)
        entry, data = _plan_leaf(key, path, value, options, path in pickle_keys)
        pickle_keys.discard(path)
        entries.append(entry)
        if data is not None:
            assert not isinstance(entry, ValueEntry)
            arrays.append(ArrayWrite(entry, data))
    if pickle_keys:
        raise InvalidKeyError(f"pickle_keys names keys the state dict lacks: {sorted(pickle_keys)}")
    return SavePlan(tuple(entries), tuple(flat.lists), tuple(arrays))


def _check_case_collisions(path: str, folded_paths: dict[str, str]) -> None:
    """Refuse a path or a group on its way that equals another ignoring case (spec R4.8)."""
    for prefix in [*parent_paths(path), path]:
        other = folded_paths.setdefault(prefix.lower(), prefix)
        if other != prefix:
            raise InvalidKeyError(
                f"keys {other} and {prefix} differ only in letter case; "
                "they would collide on case-insensitive file systems"
            )


def _plan_leaf(
    key: Key, path: str, value: Any, options: SaveOptions, may_pickle: bool
) -> tuple[Entry, np.ndarray | None]:
    if may_pickle:
        blob = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        return ObjectEntry(key, _layout(_UINT8, blob.shape, options), "pickle"), blob
    if isinstance(value, torch.Tensor):
        return _plan_tensor(key, path, value, options)
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.ascontiguousarray(value).reshape(np.shape(value))
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        dtype = dtype_of_numpy(array.dtype, path)
        return TensorEntry(key, _layout(dtype, array.shape, options), "numpy"), array
    if isinstance(value, (bytes, bytearray, memoryview)):
        blob = np.frombuffer(bytes(value), np.uint8)
        return ObjectEntry(key, _layout(_UINT8, blob.shape, options), "bytes"), blob
    if is_json(value):
        return ValueEntry(key, value), None
    if isinstance(value, float):
        spelling = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        return ValueEntry(key, spelling, "float"), None
    raise UnsafeEncodingError(
        f"{path}: a {type(value).__module__}.{type(value).__qualname__} is neither a tensor, "
        f"an array, bytes nor JSON; pass pickle_keys=[{path!r}] to store it pickled "
        "(readers must then opt in to unpickle it)"
    )


def _plan_tensor(
    key: Key, path: str, tensor: torch.Tensor, options: SaveOptions
) -> tuple[TensorEntry, np.ndarray]:
    if tensor.layout != torch.strided or tensor.is_nested or tensor.device.type == "meta":
        raise TensorMismatchError(
            f"{path}: {tensor.layout} / {tensor.device} tensors have no data to save; "
            "convert to a dense tensor first"
        )
    dtype = dtype_of_torch(tensor.dtype, path)
    cpu = tensor.detach().to("cpu").contiguous()
    if cpu.is_conj():
        cpu = cpu.resolve_conj()
    if cpu.is_neg():
        cpu = cpu.resolve_neg()
    return TensorEntry(key, _layout(dtype, tuple(cpu.shape), options)), as_numpy(cpu, dtype)


def _layout(dtype: DType, shape: tuple[int, ...], options: SaveOptions) -> ArrayLayout:
    chunk_shape = choose_chunk_shape(shape, dtype.itemsize, options.chunk_bytes)
    return ArrayLayout(dtype, shape, chunk_shape, options.zstd_level)
