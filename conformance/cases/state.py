"""A state for a backend to write: its leaves, the files a write request points to, what must be stored.

Writer cases describe a state as data (keys, data types, shapes, seeds), and the bits are made only
when a case runs, so that listing the catalog costs nothing, even for a tensor of 96 MiB. The bits
come from a seeded generator, so every run asks for the same checkpoint; floating types start with
the patterns a writer that converts values instead of copying bytes would lose (a NaN with a payload,
negative zero, the smallest subnormal), since the harness compares bits (P19).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checks.expected import ExpectedEntry, ExpectedObject, ExpectedTensor, ExpectedValue, Key
from ..protocol.arrays import BITS_DTYPES, save_bits, storage_dtype

__all__ = ["Blob", "Inputs", "Leaf", "State", "Tensor", "Value", "random_bits"]


def random_bits(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded random elements of ``dtype``, of its storage type (P19); ``bool`` is 0 or 1 (spec R7.2)."""
    count = math.prod(shape)
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, count, dtype=np.uint8).view(np.bool_).reshape(shape)
    storage = storage_dtype(dtype)
    raw = rng.integers(0, 256, count * storage.itemsize, dtype=np.uint8)
    if dtype in BITS_DTYPES or storage.kind in "fc":
        width = storage.itemsize // 2 if storage.kind == "c" else storage.itemsize
        parts = raw.view(f"<u{width}")
        top = 1 << (8 * width - 1)
        specials = [2 * top - 1, top, 1]  # all ones (a NaN with payload), the sign bit alone, 1 ulp
        parts[: len(specials)] = specials[: len(parts)]
    return raw.view(storage).reshape(shape)


@dataclass(frozen=True, slots=True)
class Tensor:
    """A tensor leaf of seeded random bits."""

    key: Key
    dtype: str
    shape: tuple[int, ...]
    seed: int = 0
    chunk_shape: tuple[int, ...] | None = None
    """The chunk shape the case asks for (P12); checked only of a backend that claims ``chunk_shapes``."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * storage_dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class Blob:
    """An ``object`` leaf of encoding ``bytes`` (spec R8.4)."""

    key: Key
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class Value:
    """A ``value`` leaf: a JSON subtree, or with ``float`` one of ``NaN``, ``Infinity``, ``-Infinity``."""

    key: Key
    value: Any
    encoding: str = "json"


Leaf = Tensor | Blob | Value


@dataclass(frozen=True, slots=True)
class State:
    """What one process holds, in state-dict order (spec R3.9), and how it asks for it to be saved.

    ``leaves`` are the leaves of the walk of spec §8: a JSON subtree is one ``Value``, never split,
    or a backend's own walk would store it as one entry where the case expects several.
    """

    leaves: tuple[Leaf, ...]
    lists: tuple[Key, ...] = ()
    metadata: Any = field(default_factory=dict)
    """Any JSON: a refusal case sends metadata that is not an object (spec R3.6)."""
    compression: dict[str, Any] | None = None

    @property
    def arrays(self) -> int:
        """Entries stored as Zarr arrays (tensors and objects): they are what puts files beside the root."""
        return sum(not isinstance(leaf, Value) for leaf in self.leaves)

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves if not isinstance(leaf, Value))

    @property
    def dtypes(self) -> frozenset[str]:
        return frozenset(leaf.dtype for leaf in self.leaves if isinstance(leaf, Tensor))

    @property
    def features(self) -> frozenset[str]:
        """The claims (P3) a backend needs to write this state."""
        objects = {"objects"} if any(isinstance(leaf, Blob) for leaf in self.leaves) else set()
        return frozenset(objects | ({"compression"} if self.compression is not None else set()))


class Inputs:
    """A case's data folder: each leaf's bits made once and written once, as P12 and P19 ask."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder
        self._bits: dict[Tensor, np.ndarray] = {}
        self._files: dict[Tensor | Blob, str] = {}

    def bits(self, tensor: Tensor) -> np.ndarray:
        if tensor not in self._bits:
            self._bits[tensor] = random_bits(tensor.dtype, tensor.shape, tensor.seed)
        return self._bits[tensor]

    def entry(self, leaf: Leaf, **extra: Any) -> dict[str, Any]:
        """The write request's entry for ``leaf`` (P11-P13), plus ``extra`` (``shards``, ``grid``)."""
        if isinstance(leaf, Value):
            return {
                "key": list(leaf.key),
                "kind": "value",
                "encoding": leaf.encoding,
                "value": leaf.value,
                **extra,
            }
        if isinstance(leaf, Blob):
            return {
                "key": list(leaf.key),
                "kind": "object",
                "encoding": "bytes",
                "data": self._file(leaf),
                **extra,
            }
        entry = {
            "key": list(leaf.key),
            "kind": "tensor",
            "dtype": leaf.dtype,
            "shape": list(leaf.shape),
            "data": self._file(leaf),
        }
        if leaf.chunk_shape is not None:
            entry["chunk_shape"] = list(leaf.chunk_shape)
        return {**entry, **extra}

    def expected(self, leaf: Leaf, chunk_shapes: bool, key: Key | None = None) -> ExpectedEntry:
        """What the manifest must hold for ``leaf``, at ``key`` (a grid cell's) or its own.

        ``chunk_shapes``: the backend claims them, so the chunk shape asked for is the one to find.
        """
        key = leaf.key if key is None else key
        if isinstance(leaf, Value):
            return ExpectedValue(key, leaf.encoding, leaf.value)
        if isinstance(leaf, Blob):
            return ExpectedObject(key, leaf.data)
        return ExpectedTensor(key, leaf.dtype, self.bits(leaf), leaf.chunk_shape if chunk_shapes else None)

    def _file(self, leaf: Tensor | Blob) -> str:
        if leaf not in self._files:
            number = len(self._files)
            if isinstance(leaf, Blob):
                path = self._folder / f"{number}.bin"
                path.write_bytes(leaf.data)
            else:
                path = self._folder / f"{number}.npy"
                save_bits(path, self.bits(leaf), leaf.dtype)
            self._files[leaf] = str(path)
        return self._files[leaf]
