"""Deterministic tensor contents, and their bits as the protocol's ``.npy`` files carry them.

Every tensor of a vector is built from a seed, so that regenerating the
vectors gives the same bytes. Floating types start with the values where
readers go wrong (NaN with and without payload, signed infinities, negative
zero, subnormals, the largest finite value), integers with their extremes,
and the rest are random bit patterns: a reader must carry bits, never values.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import ml_dtypes
import numpy as np
import torch

from ..protocol.arrays import storage_dtype

__all__ = ["bits_of", "dtype_name", "tensor"]

_TORCH: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128", "bfloat16",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    )
}  # fmt: skip
_REAL_OF_COMPLEX = {"complex64": "float32", "complex128": "float64"}
_PAYLOAD_NANS: dict[str, list[int]] = {
    # Signalling NaNs and NaNs with payload, which a conversion through another type would lose.
    "float16": [0x7C01, 0xFE01],
    "float32": [0x7F800001, 0xFFC00001],
    "float64": [0x7FF0000000000001, 0xFFF8000000000001],
    "bfloat16": [0x7F81, 0xFFC1],
}


def dtype_name(x: torch.Tensor | np.ndarray) -> str:
    """The format's name (spec §7) of a tensor's or array's element type."""
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return x.dtype.name


def bits_of(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The elements of ``x`` as the array a ``.npy`` of its type holds (PROTOCOL.md P19)."""
    name = dtype_name(x)
    if isinstance(x, torch.Tensor):
        raw = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    else:
        raw = np.ascontiguousarray(x).tobytes()
    return np.frombuffer(raw, dtype=storage_dtype(name)).reshape(tuple(x.shape)).copy()


def _specials(name: str) -> bytes:
    """The edge values of a type, little-endian, in the order they lead a tensor."""
    if name == "bool":
        return b""
    if name in _REAL_OF_COMPLEX:
        real = np.frombuffer(_specials(_REAL_OF_COMPLEX[name]), storage_dtype(_REAL_OF_COMPLEX[name]))
        pairs = np.stack([real, real[::-1]], axis=-1)  # real and imaginary parts differ
        return pairs.astype(pairs.dtype.newbyteorder("<")).tobytes()
    numpy_type: Any = getattr(ml_dtypes, name, None) or np.dtype(name).type
    if name.startswith(("int", "uint")):
        info = np.iinfo(numpy_type)
        edges = sorted({0, 1, info.max, info.min, -1 if info.min < 0 else 2})
        return np.array(edges, dtype=numpy_type).astype(np.dtype(numpy_type).newbyteorder("<")).tobytes()
    finfo = ml_dtypes.finfo(numpy_type)
    wanted = [0.0, -0.0, 1.0, -1.5, math.inf, -math.inf, math.nan]
    wanted += [float(finfo.max), -float(finfo.max), float(finfo.smallest_normal)]
    wanted += [float(finfo.smallest_subnormal), -float(finfo.smallest_subnormal)]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # casting inf to a type without infinities gives NaN
        values = np.array(wanted, dtype=np.float64).astype(numpy_type)
    raw = values.tobytes()
    width = np.dtype(numpy_type).itemsize
    return raw + b"".join(n.to_bytes(width, "little") for n in _PAYLOAD_NANS.get(name, []))


def tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A ``name`` tensor of ``shape``: the type's edge values first, then random bits (bool: 0 or 1)."""
    count = math.prod(shape)
    itemsize = storage_dtype(name).itemsize
    rng = np.random.default_rng(seed)
    if name == "bool":
        raw = rng.integers(0, 2, count, dtype=np.uint8)
    else:
        raw = rng.integers(0, 256, count * itemsize, dtype=np.uint8)
        specials = np.frombuffer(_specials(name), np.uint8)[: raw.size]
        raw[: specials.size] = specials
    flat = torch.from_numpy(raw.copy()).view(_TORCH[name]) if count else torch.empty(0, dtype=_TORCH[name])
    return flat.reshape(shape)
