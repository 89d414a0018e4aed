"""Data types of the format (spec §6): names, byte layouts, fill values, torch and NumPy twins.

Names are those of tensorstore's ``zarr3`` driver, which zarr-python also uses
for the core types. The bit layout of each non-core type is stated in the spec,
not left to a library's name: ``float8_e4m3fn`` (PyTorch's, max 448, no
infinities) is not zarr-extensions' ``float8_e4m3``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ..errors import SchemaViolationError, TensorMismatchError

__all__ = ["DType", "DTYPES", "dtype_by_name", "dtype_of_torch", "dtype_of_numpy"]


@dataclass(frozen=True, slots=True)
class DType:
    """One data type of the format."""

    name: str
    """The Zarr v3 ``data_type`` name."""
    itemsize: int
    """Bytes per element; stored little-endian where more than one."""
    torch_dtype: torch.dtype
    fill_value: str | int | bool | list[str]
    """The array's ``fill_value``: NaN for every floating type, so that a stock
    reader turns a lost chunk into NaN, never into plausible zeros (spec §8)."""

    @property
    def numpy_dtype(self) -> np.dtype:
        """The NumPy dtype a reader decodes into, of the same name (an ``ml_dtypes`` type for the ML
    floats). ``ml_dtypes`` is imported on first use only: its
        import costs about 0.9 s (0.7.0), paid by every process that imports Tessera otherwise."""
        return _numpy_dtype(self.name)

    @property
    def is_floating(self) -> bool:
        return self.torch_dtype.is_floating_point or self.torch_dtype.is_complex

    @property
    def bytes_codec(self) -> dict[str, object]:
        """The ``bytes`` codec: one-byte types carry no ``endian`` (as tensorstore writes them)."""
        if self.itemsize == 1:
            return {"name": "bytes"}
        return {"name": "bytes", "configuration": {"endian": "little"}}

    def fill_bytes(self) -> bytes:
        """One element of the fill value, as stored."""
        return np.full((), _decode_fill(self), dtype=self.numpy_dtype).tobytes()


def _decode_fill(dtype: DType) -> object:
    if isinstance(dtype.fill_value, list):
        return complex(float(dtype.fill_value[0]), float(dtype.fill_value[1]))
    if dtype.fill_value == "NaN":
        return float("nan")
    return dtype.fill_value


@cache
def _numpy_dtype(name: str) -> np.dtype:
    if hasattr(np, name) and name not in _ML_FLOATS:
        return np.dtype(name)
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


_ML_FLOATS = frozenset(
    ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
)
"""The types whose NumPy twin comes from ``ml_dtypes``."""


def _entry(name: str, torch_dtype: torch.dtype) -> DType:
    fill: str | int | bool | list[str]
    if torch_dtype.is_complex:
        fill = ["NaN", "NaN"]
    elif torch_dtype.is_floating_point:
        fill = "NaN"
    elif torch_dtype == torch.bool:
        fill = False
    else:
        fill = 0
    return DType(name, torch_dtype.itemsize, torch_dtype, fill)


DTYPES: tuple[DType, ...] = (
    _entry("bool", torch.bool),
    _entry("int8", torch.int8),
    _entry("int16", torch.int16),
    _entry("int32", torch.int32),
    _entry("int64", torch.int64),
    _entry("uint8", torch.uint8),
    _entry("uint16", torch.uint16),
    _entry("uint32", torch.uint32),
    _entry("uint64", torch.uint64),
    _entry("float16", torch.float16),
    _entry("float32", torch.float32),
    _entry("float64", torch.float64),
    _entry("complex64", torch.complex64),
    _entry("complex128", torch.complex128),
    _entry("bfloat16", torch.bfloat16),
    _entry("float8_e4m3fn", torch.float8_e4m3fn),
    _entry("float8_e5m2", torch.float8_e5m2),
    _entry("float8_e4m3fnuz", torch.float8_e4m3fnuz),
    _entry("float8_e5m2fnuz", torch.float8_e5m2fnuz),
)

_BY_NAME = {d.name: d for d in DTYPES}
_BY_TORCH = {d.torch_dtype: d for d in DTYPES}


def dtype_by_name(name: str) -> DType:
    """The data type a manifest or ``zarr.json`` names; unknown names are a schema violation."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise SchemaViolationError(
            f"unknown data type {name!r}; Tessera 1.x knows {sorted(_BY_NAME)}"
        ) from None


def dtype_of_torch(dtype: torch.dtype, key: str) -> DType:
    """The format's type for a torch dtype; ``key`` names the tensor in the error."""
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise TensorMismatchError(
            f"{key}: torch dtype {dtype} has no Tessera data type; "
            f"supported: {sorted(str(d) for d in _BY_TORCH)}"
        ) from None


def dtype_of_numpy(dtype: np.dtype, key: str) -> DType:
    """The format's type for a NumPy dtype (native byte order), found by its name (which the
    format's names follow), so that looking up a core type never imports ``ml_dtypes``."""
    native = dtype.newbyteorder("=")
    found = _BY_NAME.get(native.name)
    if found is None or found.numpy_dtype != native:
        raise TensorMismatchError(f"{key}: NumPy dtype {dtype} has no Tessera data type")
    return found
