"""Shared fixtures and helpers of the Tessera test suite.

Rule numbers (R5.3, R11.4...) refer to ``spec/tessera-v1.md``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tessera.format.digest import reseal_root
from tessera.format.dtypes import DTYPES, DType
from tessera.storage.local import LocalStorage
from tessera.testing import RecordingStorage

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO / "schemas"
SPEC = REPO / "spec" / "tessera-v1.md"

DTYPE_BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
DTYPE_NAMES: list[str] = [d.name for d in DTYPES]
FLOAT_DTYPE_NAMES: list[str] = [d.name for d in DTYPES if d.is_floating]


# Bit patterns that must survive a save/load unchanged (NaN payloads, signalling
# NaNs, infinities, negative zero, subnormals, extremes), little-endian hex.
SPECIAL_BITS: dict[str, list[str]] = {
    "float16": ["7c00", "fc00", "7e01", "7c01", "8000", "0001", "7bff"],
    "float32": ["7f800000", "ff800000", "7fc00001", "7f800001", "80000000", "00000001", "ffffffff"],
    "float64": [
        "7ff0000000000000",
        "fff0000000000000",
        "7ff8000000000001",
        "8000000000000000",
        "0000000000000001",
        "7ff0000000000001",
    ],
    "complex64": ["7fc000017f800000", "80000000ff800000"],
    "complex128": ["7ff80000000000017ff0000000000000"],
    "bfloat16": ["7f80", "ff80", "7fc1", "7f81", "8000", "0001", "ffff"],
    "float8_e4m3fn": ["7f", "ff", "80", "7e", "01"],
    "float8_e5m2": ["7c", "fc", "7f", "7d", "80", "01", "7b"],
    "float8_e4m3fnuz": ["80", "7f", "00", "01", "ff"],
    "float8_e5m2fnuz": ["80", "7f", "00", "01", "ff"],
}


def _big_endian_hex_to_le(hexstr: str, part: int) -> bytes:
    """``SPECIAL_BITS`` are written most significant byte first, per real component."""
    raw = bytes.fromhex(hexstr)
    return b"".join(raw[i : i + part][::-1] for i in range(0, len(raw), part))


def random_tensor(dtype: str | DType, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of random bit patterns (plus the dtype's special values first)."""
    d = DTYPE_BY_NAME[dtype] if isinstance(dtype, str) else dtype
    n = math.prod(shape)
    rng = np.random.default_rng(seed)
    if d.name == "bool":
        raw = rng.integers(0, 2, n, dtype=np.uint8)
    else:
        raw = rng.integers(0, 256, n * d.itemsize, dtype=np.uint8)
        part = d.itemsize // 2 if d.torch_dtype.is_complex else d.itemsize
        specials = b"".join(_big_endian_hex_to_le(h, part) for h in SPECIAL_BITS.get(d.name, []))
        specials = specials[: len(raw)]
        raw[: len(specials)] = np.frombuffer(specials, np.uint8)
    if n == 0:
        return torch.empty(shape, dtype=d.torch_dtype)
    flat = torch.from_numpy(raw.copy()).view(d.torch_dtype)
    return flat.reshape(shape)


def every_dtype_state(shape: tuple[int, ...] = (5, 7), seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor of every data type of §7, keyed by the type's name."""
    return {name: random_tensor(name, shape, seed + i) for i, name in enumerate(DTYPE_NAMES)}


def bits(x: Any) -> bytes:
    """The raw bytes of a tensor or array, C order, after resolving lazy conj/neg views."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)  # standard strides, even for size-1 dims
        return dense.reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(x).tobytes()


def assert_bit_equal(got: Any, want: Any) -> None:
    """Same kind (torch/numpy), same dtype, same shape, same bytes."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"expected a torch.Tensor, got {type(got)}"
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        assert tuple(got.shape) == tuple(want.shape), (got.shape, want.shape)
    else:
        want = np.asarray(want)
        assert isinstance(got, np.ndarray), f"expected a numpy array, got {type(got)}"
        assert got.dtype == want.dtype.newbyteorder("="), (got.dtype, want.dtype)
        assert got.shape == want.shape, (got.shape, want.shape)
        if want.dtype.byteorder == ">":
            want = want.astype(want.dtype.newbyteorder("="))
    assert bits(got) == bits(want)


def assert_tree_bit_equal(got: Any, want: Any, where: str = "") -> None:
    """Nested containers equal, tensors and arrays bit-exact, floats NaN-aware."""
    if isinstance(want, (torch.Tensor, np.ndarray)):
        assert_bit_equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {type(got)}"
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_tree_bit_equal(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_tree_bit_equal(g, w, f"{where}/{i}")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), f"{where}: {got!r}"
    else:
        assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
        assert got == want, f"{where}: {got!r} != {want!r}"


# -- crafting hostile or damaged checkpoints ------------------------------------------------


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json(path: Path, doc: Any, *, seal: bool = True) -> None:
    """Write ``doc``; a root document whose manifest has a well-formed ``manifest_digest`` is
    sealed again (its digest recomputed, R3.20), as by a tamperer who recomputes every checksum,
    so that a test crafting a hostile manifest reaches the checks after the digest (R11.1).
    ``seal=False`` keeps the digest as ``doc`` has it."""
    data = json.dumps(doc).encode()
    Path(path).write_bytes(reseal_root(data) if seal else data)


def reseal_root_file(path: Path) -> None:
    """Recompute the manifest digest of the root document at ``path`` after a test edited its
    text (R3.20), whatever its formatting, as a tamperer who recomputes every checksum would."""
    Path(path).write_bytes(reseal_root(Path(path).read_bytes()))


def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    """Load a JSON file, let ``fn`` mutate it in place (its return value is ignored), write it back."""
    doc = read_json(path)
    fn(doc)
    write_json(path, doc)


def replace_json(path: Path, fn: Callable[[Any], Any]) -> None:
    """Load a JSON file and write back ``fn(doc)``."""
    write_json(path, fn(read_json(path)))


def edit_manifest(root: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    """Mutate ``attributes.tessera`` of the root ``zarr.json`` in place."""
    edit_json(Path(root) / "zarr.json", lambda doc: fn(doc["attributes"]["tessera"]))


def write_chunk_file(path: Path, body: bytes) -> None:
    """Write ``body`` and its CRC32C as the chunk file ``path`` of a committed checkpoint, and list
    that CRC for the chunk in the manifest's chunk list (R3.19, re-sealed): a crafted chunk that is
    intact and in its place, so that the checks after the CRC's are what a test reaches."""
    from conformance.generator.damage import write_chunk

    write_chunk(Path(path), body)


def assert_chunk_lists_are_stored_crcs(root: Path) -> int:
    """Every array entry's chunk list (R3.19) is the CRC stored in the last 4 bytes of each of its
    chunk files, in C order of the chunk index; returns how many chunks were compared."""
    manifest = read_json(Path(root) / "zarr.json")["attributes"]["tessera"]
    compared = 0
    for entry in manifest["entries"]:
        if entry["kind"] == "value":
            continue
        grid = [-(-s // c) for s, c in zip(entry["shape"], entry["chunk_shape"], strict=True)]
        stored = []
        for index in np.ndindex(*grid):
            key = "/".join(["c", *map(str, index)])
            stored.append((Path(root) / entry["path"] / key).read_bytes()[-4:][::-1].hex())
        assert entry["chunk_crc32c"] == "".join(stored), entry["path"]
        compared += len(stored)
    return compared


def entry_of(root: Path, path: str) -> dict[str, Any]:
    manifest = read_json(Path(root) / "zarr.json")["attributes"]["tessera"]
    return next(e for e in manifest["entries"] if e["path"] == path)


ROOT = Path(__file__).resolve().parent.parent


def run_conformance(backend: Path, *options: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``conformance run BACKEND OPTIONS`` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "conformance", "run", str(backend), *options],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x01
    Path(path).write_bytes(bytes(data))


def chunk_files(array_dir: Path) -> list[str]:
    """Chunk keys (``c/0/1``) present under an array directory, sorted."""
    base = Path(array_dir)
    return sorted(p.relative_to(base).as_posix() for p in (base / "c").rglob("*") if p.is_file()) + (
        ["c"] if (base / "c").is_file() else []
    )


@contextmanager
def forced_chunks(chunk_shape_of: Callable[[tuple[int, ...]], tuple[int, ...]]) -> Iterator[None]:
    """Make ``tessera.save`` use the chunk shape ``chunk_shape_of(shape)`` for every array.

    The writer normally picks C-contiguous chunks; this reaches the general
    regular grid (several short dimensions per edge chunk) of R5.3.
    """
    import tessera.planning.chunk_grid

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            tessera.planning.chunk_grid,
            "choose_chunk_shape",
            lambda shape, itemsize, chunk_bytes: tuple(chunk_shape_of(tuple(shape))),
        )
        yield


def recorded(path: Path) -> RecordingStorage:
    """The local checkpoint at ``path`` as a storage that records every call made to it."""
    return RecordingStorage(LocalStorage(path))


@contextmanager
def recording(storage: RecordingStorage) -> Iterator[list[tuple[str, str]]]:
    """The read accesses (method, path) made to ``storage`` inside the block, filled on exit."""
    start = len(storage.calls)
    calls: list[tuple[str, str]] = []
    try:
        yield calls
    finally:
        reads = ("read_file", "read_into", "size", "list")
        calls.extend((c.op, c.path or "") for c in storage.calls[start:] if c.op in reads)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A path for a new checkpoint (not yet existing)."""
    return tmp_path / "ckpt"
