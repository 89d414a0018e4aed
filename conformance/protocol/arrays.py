"""Tensors in ``.npy`` files as the protocol passes them (PROTOCOL.md P19).

NumPy has no bfloat16 or float8 types, and a ``.npy`` file written with
``ml_dtypes`` carries a type code no other language reads. So those types
travel as their bit patterns in the unsigned integer of their width; every
other type is stored as itself. The harness compares bits, never values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["BITS_DTYPES", "DTYPE_NAMES", "as_bits", "dtype_rules", "load_bits", "save_bits", "storage_dtype"]

_NATIVE = {
    "bool": "|b1",
    "int8": "|i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint8": "|u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "complex64": "<c8",
    "complex128": "<c16",
}
BITS_DTYPES = {
    "bfloat16": "<u2",
    "float8_e4m3fn": "|u1",
    "float8_e5m2": "|u1",
    "float8_e4m3fnuz": "|u1",
    "float8_e5m2fnuz": "|u1",
}
"""Types NumPy lacks, carried as the bits of the same width."""

DTYPE_NAMES: tuple[str, ...] = (*_NATIVE, *BITS_DTYPES)
"""Every data type of spec §7, in the spec's order."""


_LAYOUT_RULES = {
    "bfloat16": "R7.3",
    "float8_e4m3fn": "R7.4",
    "float8_e5m2": "R7.5",
    "float8_e4m3fnuz": "R7.6",
    "float8_e5m2fnuz": "R7.7",
}


def dtype_rules(name: str) -> tuple[str, ...]:
    """The spec rule that states the bit layout of ``name``, for the types the spec defines itself."""
    return (_LAYOUT_RULES[name],) if name in _LAYOUT_RULES else ()


def storage_dtype(name: str) -> np.dtype:
    """The NumPy type a ``.npy`` file uses for the format's data type ``name``."""
    return np.dtype(_NATIVE.get(name) or BITS_DTYPES[name])


def as_bits(array: np.ndarray) -> np.ndarray:
    """The array's elements as unsigned integers of their width, for bit-exact comparison.

    ``bool`` stays one byte per element; complex types become two integers per element.
    """
    array = np.require(array, requirements="C")  # ascontiguousarray would make a 0-d array 1-d
    width = array.dtype.itemsize if array.dtype.kind != "c" else array.dtype.itemsize // 2
    flat = array.reshape(-1).view(f"<u{width}") if array.size else np.zeros(0, f"<u{width}")
    return flat.reshape(*array.shape, -1) if array.dtype.kind == "c" else flat.reshape(array.shape)


def save_bits(path: Path, array: np.ndarray, dtype: str) -> None:
    """Write ``array`` (already of :func:`storage_dtype`) as the ``.npy`` of a ``dtype`` tensor."""
    expected = storage_dtype(dtype)
    if array.dtype != expected:
        raise ValueError(f"{dtype} travels as {expected}, not {array.dtype}")
    np.save(path, np.require(array, requirements="C"), allow_pickle=False)


def load_bits(path: Path, dtype: str) -> np.ndarray:
    """Read a ``.npy`` that must hold a ``dtype`` tensor; a wrong file type raises ``ValueError``."""
    array = np.load(path, allow_pickle=False)
    expected = storage_dtype(dtype)
    if array.dtype.newbyteorder("<") != expected.newbyteorder("<") or array.dtype.byteorder == ">":
        raise ValueError(
            f"{path.name} holds {array.dtype.str}, but a {dtype} tensor travels as {expected.str}"
        )
    return array
