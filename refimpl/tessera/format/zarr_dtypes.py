"""Tessera's ML float types for zarr-python, which has none of them (spec §7).

Importing this module registers them with zarr-python's data type registry;
from then on a plain ``zarr.open_array`` reads ``bfloat16`` and the float8
arrays, with no other Tessera code. (zarr-python 3.1 collects the
``zarr.data_type`` entry points but never loads them, so registration is
explicit.) The names and byte layouts are
tensorstore's, so both libraries read what either writes. Two-byte types take
the ``bytes`` codec's ``endian``; one-byte types must not (tensorstore writes
``{"name": "bytes"}`` for them).

This module imports zarr-python; the rest of Tessera never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import HasItemSize

try:  # zarr-python 3.4 moved it and deprecates the old home
    from zarr.errors import DataTypeValidationError  # type: ignore[attr-defined]
except ImportError:  # zarr-python 3.1
    from zarr.core.dtype.common import DataTypeValidationError
from zarr.core.dtype.npy.float import BaseFloat
from zarr.core.dtype.wrapper import ZDType

__all__ = ["BFloat16", "Float8E4M3FN", "Float8E4M3FNUZ", "Float8E5M2", "Float8E5M2FNUZ"]


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):  # type: ignore[type-arg]
    """bfloat16: 1 sign, 8 exponent (bias 127), 7 mantissa bits; the top half of a float32."""

    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name: ClassVar[str] = "bfloat16"  # type: ignore[misc]
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ("bfloat16",)

    @property
    def item_size(self) -> int:
        return 2


@dataclass(frozen=True, kw_only=True)
class _Float8(ZDType, HasItemSize):  # type: ignore[type-arg]
    """One-byte floats: no byte order, so no ``endian`` in the ``bytes`` codec.

    Not a ``BaseFloat``: that class carries an endianness, and zarr-python 3.4
    demands ``endian`` of every type that does. The JSON and scalar handling
    is BaseFloat's own.
    """

    _check_json_v2 = BaseFloat.__dict__["_check_json_v2"]
    _check_json_v3 = BaseFloat.__dict__["_check_json_v3"]
    _from_json_v2 = BaseFloat.__dict__["_from_json_v2"]
    _from_json_v3 = BaseFloat.__dict__["_from_json_v3"]
    to_json = BaseFloat.__dict__["to_json"]
    _check_scalar = BaseFloat.__dict__["_check_scalar"]
    _cast_scalar_unchecked = BaseFloat.__dict__["_cast_scalar_unchecked"]
    cast_scalar = BaseFloat.__dict__["cast_scalar"]
    default_scalar = BaseFloat.__dict__["default_scalar"]
    from_json_scalar = BaseFloat.__dict__["from_json_scalar"]
    to_json_scalar = BaseFloat.__dict__["to_json_scalar"]

    @classmethod
    def from_native_dtype(cls, dtype: object) -> _Float8:
        if cls._check_native_dtype(dtype):  # type: ignore[arg-type]
            return cls()
        raise DataTypeValidationError(f"{dtype} is not {cls._zarr_v3_name}")

    def to_native_dtype(self) -> np.dtype:  # type: ignore[type-arg]
        return self.dtype_cls()  # type: ignore[no-any-return]

    @property
    def item_size(self) -> int:
        return 1


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FN(_Float8):
    """PyTorch's float8_e4m3fn: bias 7, no infinities, NaN is S.1111.111, max 448."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fn))
    _zarr_v3_name: ClassVar[str] = "float8_e4m3fn"  # type: ignore[misc]
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ("float8_e4m3fn",)


@dataclass(frozen=True, kw_only=True)
class Float8E5M2(_Float8):
    """float8_e5m2: bias 15, IEEE-style infinities and NaNs, max 57344."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e5m2))
    _zarr_v3_name: ClassVar[str] = "float8_e5m2"  # type: ignore[misc]
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ("float8_e5m2",)


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FNUZ(_Float8):
    """float8_e4m3fnuz: bias 8, no infinities, no negative zero, NaN is 0x80."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fnuz))
    _zarr_v3_name: ClassVar[str] = "float8_e4m3fnuz"  # type: ignore[misc]
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ("float8_e4m3fnuz",)


@dataclass(frozen=True, kw_only=True)
class Float8E5M2FNUZ(_Float8):
    """float8_e5m2fnuz: bias 16, no infinities, no negative zero, NaN is 0x80."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e5m2fnuz))
    _zarr_v3_name: ClassVar[str] = "float8_e5m2fnuz"  # type: ignore[misc]
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ("float8_e5m2fnuz",)


for _dtype in (BFloat16, Float8E4M3FN, Float8E5M2, Float8E4M3FNUZ, Float8E5M2FNUZ):
    data_type_registry.register(_dtype._zarr_v3_name, _dtype)
