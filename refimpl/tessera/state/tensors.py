"""Zero-copy views between torch tensors and the NumPy arrays the codecs work on.

NumPy has no bfloat16 or float8; ``ml_dtypes`` has. A CPU tensor is viewed as
an unsigned integer tensor of the same width, handed to NumPy, and viewed
again as the format's NumPy type: no element is copied either way.
"""

from __future__ import annotations

import numpy as np
import torch

from ..format.dtypes import DType

__all__ = ["as_numpy", "as_torch"]

_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_numpy(tensor: torch.Tensor, dtype: DType) -> np.ndarray:
    """A NumPy view of a CPU, C-contiguous tensor, typed as the format's ``dtype``."""
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        return tensor.numpy()
    if tensor.dim() == 0:
        return as_numpy(tensor.reshape(1), dtype).reshape(())
    return tensor.view(_SAME_WIDTH[dtype.itemsize]).numpy().view(dtype.numpy_dtype)


def as_torch(array: np.ndarray, dtype: DType) -> torch.Tensor:
    """A torch view of a C-contiguous NumPy array holding the format's ``dtype``."""
    if dtype.torch_dtype.is_complex or dtype.torch_dtype == torch.bool:
        return torch.from_numpy(array)
    if array.ndim == 0:
        return as_torch(array.reshape(1), dtype).reshape(())
    width = _SAME_WIDTH[dtype.itemsize]
    raw = array.view(np.dtype(f"<i{dtype.itemsize}") if dtype.itemsize > 1 else np.uint8)
    return torch.from_numpy(raw).view(width).view(dtype.torch_dtype)
