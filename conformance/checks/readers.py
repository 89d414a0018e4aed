"""Reading a written checkpoint back, bit for bit: the reference reader and two stock Zarr libraries.

The reference reader (``tessera.open``) reads every entry as a Tessera user
would (R2.3). zarr-python and tensorstore read every array with no Tessera
code but ``tessera.format.zarr_dtypes``, which registers the ML float types with
zarr-python (tensorstore knows them): a Tessera checkpoint is a Zarr v3
hierarchy any Zarr reader opens (R2.1). Bits are compared as the protocol
carries them (P19), so NaN payloads and negative zeros count. A reader that
raises is a finding naming the reader and its message, never a crash.

The two stock libraries come with the package's ``interop`` extra, not with a
plain install: they are imported when a written checkpoint is first checked,
and ``conformance run`` asks :func:`missing_stock_readers` before it starts a
case that needs them, so that a plain install lists cases and runs the reader
profile, and says which extra to install for the others.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tessera
import torch
from tessera import TesseraError
from tessera.format import key_to_path

from ..protocol.arrays import as_bits, storage_dtype
from .documents import same_json
from .entries import StoredArray
from .expected import ExpectedCheckpoint, ExpectedObject, ExpectedTensor, ExpectedValue
from .findings import Findings

__all__ = [
    "INTEROP_EXTRA",
    "bits_difference",
    "check_reference_reader",
    "check_stock_readers",
    "missing_stock_readers",
]

STOCK_READERS = ("zarr", "tensorstore")
"""The stock Zarr libraries every written checkpoint is read back with (R2.1)."""
INTEROP_EXTRA = "tessera-checkpoint[interop]"
"""The extra of the package that installs them."""

_RULE_IN_MESSAGE = re.compile(r"\bR\d+\.\d+\b")
_RULE_OF_CODE = {
    "not_found": "R9.13",
    "uncommitted": "R9.13",
    "unsupported_version": "R12.5",
    "schema_violation": "R3.2",
    "inconsistent": "R5.10",
    "limit_exceeded": "R11.6",
    "checksum_mismatch": "R6.4",
    "missing_chunk": "R5.7",
    "tensor_mismatch": "R2.3",
    "unsafe_encoding": "R8.4",
    "bad_key": "R3.11",
    "key_mismatch": "R3.9",
}
"""For a refusal whose message cites no rule: the writer's rule behind the reader's error class (§13)."""
_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def check_reference_reader(root: Path, expected: ExpectedCheckpoint, skip: set[str], out: Findings) -> None:
    """R2.3: ``tessera.open(root)`` gives back every entry of the case, bit for bit."""
    try:
        checkpoint = tessera.open(root)
    except Exception as exc:
        out.add(_rule_of(exc), f"the reference reader cannot open the checkpoint: {_describe(exc)}")
        return
    for entry in expected.entries:
        path = key_to_path(entry.key)
        if path in skip:
            continue
        try:
            problem = _reference_difference(checkpoint, path, entry)
        except Exception as exc:
            out.add(_rule_of(exc), f"the reference reader cannot read {path}: {_describe(exc)}")
            continue
        if problem:
            out.add("R2.3", f"the reference reader reads {path} {problem}")


def _reference_difference(
    checkpoint: tessera.Checkpoint, path: str, entry: ExpectedTensor | ExpectedObject | ExpectedValue
) -> str | None:
    if isinstance(entry, ExpectedTensor):
        return bits_difference(_storage_view(checkpoint.read(path), entry.dtype), entry.bits)
    got = checkpoint.value(path)
    if isinstance(entry, ExpectedObject):
        if got == entry.data:
            return None
        return f"as {len(got)} bytes different from the case's {len(entry.data)}: {got[:16]!r}..."
    want = entry.value
    if entry.encoding == "float":
        want = _FLOATS.get(want, want) if isinstance(want, str) else want
        same = isinstance(got, float) and (got == want or (math.isnan(got) and math.isnan(want)))
    else:
        same = same_json(got, want)
    return None if same else f"as {got!r}; the case stored {want!r}"


def missing_stock_readers() -> str | None:
    """Why the stock readers cannot run here (the first import error), or ``None`` if they can."""
    try:
        for name in STOCK_READERS:
            importlib.import_module(name)
    except ImportError as exc:
        return str(exc)
    return None


def check_stock_readers(root: Path, arrays: Iterable[StoredArray], skip: set[str], out: Findings) -> None:
    """R2.1: zarr-python and tensorstore read every tensor and object array whole, bit for bit."""
    import tensorstore as ts
    import tessera.format.zarr_dtypes  # noqa: F401  (registers bfloat16 and the float8 types with zarr-python)
    import zarr
    from zarr.storage import LocalStore

    store = LocalStore(root, read_only=True)

    def zarr_read(path: str) -> np.ndarray:
        return np.asarray(zarr.open_array(store=store, path=path, mode="r")[...])

    def tensorstore_read(path: str) -> np.ndarray:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / path)}}
        return np.asarray(ts.open(spec, read=True).result().read().result())

    readers: list[tuple[str, Callable[[str], np.ndarray]]] = [
        ("zarr-python", zarr_read),
        ("tensorstore", tensorstore_read),
    ]
    for array in arrays:
        if array.expected is None or array.path in skip:
            continue
        if isinstance(array.expected, ExpectedTensor):
            dtype, want = array.expected.dtype, array.expected.bits
        else:
            dtype, want = "uint8", np.frombuffer(array.expected.data, np.uint8)
        for name, read in readers:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    problem = bits_difference(_storage_view(read(array.path), dtype), want)
            except Exception as exc:
                out.add("R2.1", f"{name} cannot read {array.path}: {_describe(exc)}")
                continue
            if problem:
                out.add("R2.1", f"{name} reads {array.path} {problem}")


def _storage_view(value: Any, dtype: str) -> np.ndarray:
    """A reader's result as the protocol carries ``dtype`` (P19): its bytes, viewed, never converted."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        shape: tuple[int, ...] = tuple(tensor.shape)
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
    else:
        array = np.asarray(value)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        # ascontiguousarray makes a 0-d array 1-d: the shape is taken first.
        shape, raw = array.shape, np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    want = storage_dtype(dtype)
    if raw.size != math.prod(shape) * want.itemsize:
        raise TypeError(
            f"elements of {raw.size // max(math.prod(shape), 1)} bytes, not the {want.itemsize} of {dtype}"
        )
    return raw.view(want).reshape(shape)


def bits_difference(got: np.ndarray, want: np.ndarray) -> str | None:
    """``None`` if ``got`` equals ``want`` bit for bit; else what differs, in words."""
    if got.shape != want.shape:
        return f"with shape {list(got.shape)}; the case's is {list(want.shape)}"
    a, b = as_bits(got), as_bits(want)
    if np.array_equal(a, b):
        return None
    differs = a != b
    if a.ndim > want.ndim:  # complex: two integers per element
        differs = differs.any(axis=-1)
    first = tuple(int(i) for i in np.argwhere(differs)[0])
    return (
        f"with {int(differs.sum())} of {differs.size} elements different from the case's data; the first, at "
        f"{list(first)}, has bits {_hex(a[first])} where the data has {_hex(b[first])}"
    )


def _hex(bits: np.ndarray) -> str:
    return " ".join(f"{int(v):0{2 * bits.dtype.itemsize}x}" for v in np.atleast_1d(bits))


def _rule_of(exc: BaseException) -> str:
    """The rule a reader's refusal points at: one its message cites, else the one behind its error class."""
    cited = _RULE_IN_MESSAGE.search(str(exc))
    if cited:
        return cited.group(0)
    return _RULE_OF_CODE.get(exc.code, "R2.3") if isinstance(exc, TesseraError) else "R2.3"


def _describe(exc: BaseException) -> str:
    kind = exc.code if isinstance(exc, TesseraError) else type(exc).__name__
    return f"{kind}: {' '.join(str(exc).split())}"  # on one line: some messages list problems on several
