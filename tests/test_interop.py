"""Stock Zarr readers and writers (zarr-python, tensorstore) and Tessera agree bit for bit (R2.1).

On the reading side only ``tessera.format.zarr_dtypes`` (which registers the ML float
types with zarr-python) is Tessera code; tensorstore knows every type natively.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import tessera.format.zarr_dtypes  # noqa: F401  (registers bfloat16 and float8 with zarr-python)
import torch

from .conftest import DTYPE_BY_NAME, DTYPE_NAMES, bits, chunk_files, random_tensor, read_json, write_json

ts = pytest.importorskip("tensorstore")
zarr = pytest.importorskip("zarr")

SHAPES = {"grid": (5, 7), "scalar": (), "empty": (0, 4), "vector": (13,)}


@pytest.fixture(scope="module", params=[None, "zstd"], ids=["raw", "zstd"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One checkpoint with every dtype in every shape; 16-byte chunks force edge chunks."""
    root = tmp_path_factory.mktemp("interop") / "ckpt"
    state = {
        name: {
            kind: random_tensor(name, shape, seed=i * 10 + j)
            for j, (kind, shape) in enumerate(SHAPES.items())
        }
        for i, name in enumerate(DTYPE_NAMES)
    }
    tessera.save(
        state,
        root,
        options=tessera.SaveOptions(compression=tessera.Zstd() if request.param else None, chunk_bytes=16),
    )
    return root, state


def _ts_read(path: Path) -> np.ndarray:
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, read=True).result()
    return np.asarray(store.read().result())


def _zarr_read(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(store=str(path), mode="r")[...])


@pytest.mark.parametrize("name", DTYPE_NAMES)
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("read", [_zarr_read, _ts_read], ids=["zarr-python", "tensorstore"])
def test_stock_readers_read_every_array_bit_exact_R2_1(
    saved: tuple[Path, dict], name: str, kind: str, read: Callable[[Path], np.ndarray]
) -> None:
    root, state = saved
    got = read(root / name / kind)
    want = state[name][kind]
    assert got.shape == tuple(want.shape)
    assert got.dtype == DTYPE_BY_NAME[name].numpy_dtype
    assert got.tobytes() == bits(want)


# zarr-python warns about files it does not know (the claim file): harmless.
@pytest.mark.filterwarnings("ignore:Object at .tessera-claim.json is not recognized")
def test_zarr_python_group_lists_every_array_R2_4(saved: tuple[Path, dict]) -> None:
    root, state = saved
    group = zarr.open_group(store=str(root), mode="r")
    members = dict(group.members(max_depth=None))
    manifest = group.attrs["tessera"]
    assert manifest["format"] == "tessera" and manifest["format_version"] == "1.2"
    arrays = {path for path, node in members.items() if isinstance(node, zarr.Array)}
    groups = {path for path, node in members.items() if isinstance(node, zarr.Group)}
    assert arrays == {e["path"] for e in manifest["entries"]}
    assert groups == set(DTYPE_NAMES)
    assert sorted(group.group_keys()) == sorted(DTYPE_NAMES)


@pytest.mark.parametrize(
    ("name", "fill"),
    [
        ("float32", "nan"),
        ("bfloat16", "nan"),
        ("float8_e4m3fn", "nan"),
        ("complex64", "nan"),
        ("int32", 0),
        ("uint8", 0),
        ("bool", False),
    ],
)
def test_fill_values_R5_9(saved: tuple[Path, dict], name: str, fill: object) -> None:
    root, _ = saved
    array = zarr.open_array(store=str(root / name / "grid"), mode="r")
    value = np.asarray(array.fill_value)
    if fill == "nan":
        assert np.isnan(value.astype(np.complex128 if "complex" in name else np.float64)).all()
    else:
        assert value == fill
    doc = read_json(root / name / "grid" / "zarr.json")
    expected = {"nan": ["NaN", "NaN"] if "complex" in name else "NaN"}.get(fill, fill)  # type: ignore[call-overload]
    assert doc["fill_value"] == expected


def test_lost_chunk_is_nan_in_tensorstore_but_an_error_in_tessera_R5_7(ckpt: Path) -> None:
    """Why NaN is the fill value (R5.9): a stock reader turns a lost chunk into NaN, not zeros;
    Tessera refuses it (R5.7)."""
    t = torch.arange(1.0, 21.0).reshape(4, 5)
    tessera.save({"w": t}, ckpt, options=tessera.SaveOptions(chunk_bytes=20))  # one row per chunk
    assert chunk_files(ckpt / "w") == ["c/0/0", "c/1/0", "c/2/0", "c/3/0"]
    (ckpt / "w" / "c" / "2" / "0").unlink()
    got = _ts_read(ckpt / "w")
    assert np.isnan(got[2]).all()
    np.testing.assert_array_equal(np.delete(got, 2, axis=0), np.delete(t.numpy(), 2, axis=0))
    assert np.isnan(_zarr_read(ckpt / "w")[2]).all()
    with pytest.raises(tessera.MissingChunkError) as info:
        tessera.load(ckpt)
    assert info.value.code == "missing_chunk"
    assert "w chunk c/2/0" in str(info.value)
    # Rows that do not touch the lost chunk still read.
    assert torch.equal(tessera.open(ckpt).read("w", [slice(0, 2)]), t[:2])


def test_tessera_chunks_are_byte_identical_to_tensorstore_chunks_R6_5(tmp_path: Path) -> None:
    """Uncompressed chunks are fully determined by the spec: same bytes from either writer."""
    t = random_tensor("float32", (5, 7), seed=4)
    tessera.save({"a": t}, tmp_path / "tessera", options=tessera.SaveOptions(chunk_bytes=28 * 2))
    entry = read_json(tmp_path / "tessera" / "a" / "zarr.json")
    _ts_write(tmp_path / "ts" / "a", t.numpy(), entry)
    keys = chunk_files(tmp_path / "tessera" / "a")
    assert keys == chunk_files(tmp_path / "ts" / "a") and len(keys) == 3
    for key in keys:
        assert (tmp_path / "tessera" / "a" / key).read_bytes() == (
            tmp_path / "ts" / "a" / key
        ).read_bytes(), key


# -- stock writers, Tessera reader ----------------------------------------------------------


def _ts_write(path: Path, data: np.ndarray, metadata: dict[str, Any]) -> None:
    meta = {k: v for k, v in metadata.items() if k not in ("zarr_format", "node_type", "attributes")}
    meta["chunk_key_encoding"] = {"name": "default"}  # tensorstore's short spelling (R5.10)
    store = ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(path)},
            "metadata": meta,
            # Write every chunk, also those equal to the fill value (R5.7).
            "store_data_equal_to_fill_value": True,
        },
        create=True,
    ).result()
    store.write(data).result()


def _zarr_write(path: Path, data: np.ndarray, layout: Any) -> None:
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    compressors: list[Any] = [Crc32cCodec()]
    if layout.zstd_level is not None:
        compressors.insert(0, ZstdCodec(level=layout.zstd_level, checksum=False))
    serializer = BytesCodec(endian="little") if layout.dtype.itemsize > 1 else BytesCodec(endian=None)
    with zarr.config.set({"array.write_empty_chunks": True}):
        array = zarr.create_array(
            store=str(path),
            shape=layout.shape,
            chunks=layout.chunk_shape,
            dtype=data.dtype,
            fill_value=np.full((), np.nan, data.dtype) if layout.dtype.is_floating else 0,
            serializer=serializer,
            compressors=compressors,
            zarr_format=3,
        )
        array[...] = data


def _foreign_checkpoint(
    root: Path, arrays: dict[str, tuple[np.ndarray, tuple[int, ...]]], writer: str, zstd_level: int | None
) -> None:
    """Arrays written by a stock library; only the root manifest is added by hand."""
    from tessera.format.dtypes import dtype_of_numpy
    from tessera.format.layout import ArrayLayout
    from tessera.format.manifest import Manifest, TensorEntry, WriterInfo

    entries = []
    for key, (data, chunk_shape) in arrays.items():
        layout = ArrayLayout(dtype_of_numpy(data.dtype, key), data.shape, chunk_shape, zstd_level)
        if writer == "tensorstore":
            _ts_write(root / key, data, layout.zarr_json())
        else:
            _zarr_write(root / key, data, layout)
        entries.append(TensorEntry((key,), layout, "numpy"))
    manifest = Manifest(
        save_id=str(uuid.uuid4()),
        created="2026-11-21T00:00:00Z",
        writer=WriterInfo(writer, "test"),
        entries=tuple(entries),
        format_version="1.0",  # no chunk lists (R3.19): a 1.0 manifest, which 1.1 readers still read
    )
    write_json(root / "zarr.json", manifest.to_root())


@pytest.mark.parametrize("writer", ["tensorstore", "zarr-python"])
@pytest.mark.parametrize("zstd_level", [None, 3])
def test_tessera_reads_stock_writers_R5_10(tmp_path: Path, writer: str, zstd_level: int | None) -> None:
    import ml_dtypes

    rng = np.random.default_rng(5)
    arrays = {
        "f32": (rng.standard_normal((5, 7)).astype(np.float32), (2, 3)),
        "i64": (rng.integers(-(2**60), 2**60, (4, 3, 5)), (3, 2, 2)),
        "bf16": (rng.standard_normal((9,)).astype(ml_dtypes.bfloat16), (4,)),
        "f8": (rng.standard_normal((3, 3)).astype(ml_dtypes.float8_e4m3fn), (2, 2)),
        "u8": (rng.integers(0, 255, (6,), dtype=np.uint8), (6,)),
        "nan_only": (np.full((3, 4), np.nan, np.float32), (2, 2)),
        "zero_d": (np.array(2.5, np.float64), ()),
    }
    root = tmp_path / "ckpt"
    _foreign_checkpoint(root, arrays, writer, zstd_level)
    # Every chunk exists, even those equal to the fill value (R5.7).
    assert len(chunk_files(root / "nan_only")) == 4
    loaded = tessera.load(root)
    for key, (data, _) in arrays.items():
        assert isinstance(loaded[key], np.ndarray)
        assert loaded[key].shape == data.shape
        assert loaded[key].tobytes() == data.tobytes(), key
    report = tessera.verify(root)
    assert report.ok, report.problems
    assert report.chunks == sum(
        math.prod(math.ceil(s / c) for s, c in zip(d.shape, cs, strict=True)) for d, cs in arrays.values()
    )
    # Regions across chunks read through the same stock-written chunks.
    ck = tessera.open(root)
    np.testing.assert_array_equal(ck.read("f32", [slice(1, 4), slice(2, 6)]), arrays["f32"][0][1:4, 2:6])
    np.testing.assert_array_equal(ck.read("i64", [1, slice(1, 3)]), arrays["i64"][0][1, 1:3])
