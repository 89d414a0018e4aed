"""Save then load gives back exactly what was saved (spec §7, §8, R14.6)."""

from __future__ import annotations

import collections
import math
import random
from pathlib import Path

import numpy as np
import pytest
import tessera
import torch
from tessera.format.dtypes import DTYPES

from .conftest import (
    DTYPE_NAMES,
    assert_bit_equal,
    assert_tree_bit_equal,
    bits,
    every_dtype_state,
    forced_chunks,
    random_tensor,
    read_json,
)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_every_dtype_bit_exact_R7_1(ckpt: Path, compression: str | None) -> None:
    """Every type of §7, random bit patterns plus NaN payloads, infinities, -0, subnormals;
    32-byte chunks make several chunks per array, with edge chunks."""
    state = every_dtype_state((5, 7))
    tessera.save(
        state,
        ckpt,
        options=tessera.SaveOptions(compression=tessera.Zstd() if compression else None, chunk_bytes=32),
    )
    manifest = read_json(ckpt / "zarr.json")["attributes"]["tessera"]
    assert [e["dtype"] for e in manifest["entries"]] == DTYPE_NAMES
    assert all(e["chunk_count"] > 1 for e in manifest["entries"])
    loaded = tessera.load(ckpt)
    assert_tree_bit_equal(loaded, state)


def test_dtype_table_matches_torch_and_numpy_R7_2() -> None:
    """Each name of §7 maps to the torch and NumPy types and byte width of the spec's table."""
    import ml_dtypes

    table = {
        "bool": (1, torch.bool, np.bool_),
        "int8": (1, torch.int8, np.int8),
        "int16": (2, torch.int16, np.int16),
        "int32": (4, torch.int32, np.int32),
        "int64": (8, torch.int64, np.int64),
        "uint8": (1, torch.uint8, np.uint8),
        "uint16": (2, torch.uint16, np.uint16),
        "uint32": (4, torch.uint32, np.uint32),
        "uint64": (8, torch.uint64, np.uint64),
        "float16": (2, torch.float16, np.float16),
        "float32": (4, torch.float32, np.float32),
        "float64": (8, torch.float64, np.float64),
        "complex64": (8, torch.complex64, np.complex64),
        "complex128": (16, torch.complex128, np.complex128),
        "bfloat16": (2, torch.bfloat16, ml_dtypes.bfloat16),
        "float8_e4m3fn": (1, torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
        "float8_e5m2": (1, torch.float8_e5m2, ml_dtypes.float8_e5m2),
        "float8_e4m3fnuz": (1, torch.float8_e4m3fnuz, ml_dtypes.float8_e4m3fnuz),
        "float8_e5m2fnuz": (1, torch.float8_e5m2fnuz, ml_dtypes.float8_e5m2fnuz),
    }
    assert {d.name for d in DTYPES} == set(table)
    for d in DTYPES:
        size, tdt, ndt = table[d.name]
        assert (d.itemsize, d.torch_dtype, d.numpy_dtype) == (size, tdt, np.dtype(ndt)), d.name


@pytest.mark.parametrize(
    ("name", "value", "hexbits"),
    [
        ("float8_e4m3fn", 448.0, "7e"),
        ("float8_e4m3fn", -0.0, "80"),
        ("float8_e4m3fn", 2.0**-9, "01"),
        ("float8_e5m2", 57344.0, "7b"),
        ("float8_e5m2", float("inf"), "7c"),
        ("float8_e5m2", 2.0**-16, "01"),
        ("float8_e4m3fnuz", 240.0, "7f"),
        ("float8_e4m3fnuz", 2.0**-10, "01"),
        ("float8_e5m2fnuz", 57344.0, "7f"),
        ("float8_e5m2fnuz", 2.0**-17, "01"),
        ("bfloat16", 1.0, "803f"),
        ("bfloat16", float("-inf"), "80ff"),
    ],
)
def test_ml_float_layouts_R7_3_to_R7_7(ckpt: Path, name: str, value: float, hexbits: str) -> None:
    """The stored bytes are the layout the spec states, not just a library's name."""
    dtype = next(d for d in DTYPES if d.name == name)
    t = torch.tensor([value], dtype=torch.float32).to(dtype.torch_dtype)
    tessera.save({"x": t}, ckpt)
    raw = (ckpt / "x" / "c" / "0").read_bytes()
    assert raw[:-4].hex() == hexbits
    back = tessera.load(ckpt)["x"]
    assert_bit_equal(back, t)
    assert back.float().item() == value or (math.isnan(value) and math.isnan(back.float().item()))


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_zero_d_R5_2(ckpt: Path, name: str) -> None:
    t = random_tensor(name, (), seed=3)
    tessera.save({"s": t}, ckpt)
    assert (ckpt / "s" / "c").is_file(), "the only chunk of a 0-d array is <path>/c"
    got = tessera.load(ckpt)["s"]
    assert_bit_equal(got, t)


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0,), (2, 0, 3)])
def test_zero_size_has_no_chunks_R5_6(ckpt: Path, shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=torch.float32)
    tessera.save({"z": t}, ckpt)
    entry = read_json(ckpt / "zarr.json")["attributes"]["tessera"]["entries"][0]
    assert entry["chunk_count"] == 0
    assert all(c >= 1 for c in entry["chunk_shape"])
    assert (ckpt / "z" / "zarr.json").is_file()
    assert not (ckpt / "z" / "c").exists()
    got = tessera.load(ckpt)["z"]
    assert got.shape == shape and got.dtype == torch.float32
    assert tessera.verify(ckpt).ok


def test_non_contiguous_views(ckpt: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "transposed": base.t(),
        "sliced": base[1:5:2, 3:9:3],
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),
        "narrow": base.narrow(1, 2, 5),
        "permuted": torch.arange(24).reshape(2, 3, 4).permute(2, 0, 1),
        "channels_last": torch.arange(48.0).reshape(2, 3, 2, 4).to(memory_format=torch.channels_last),
        "grad": torch.ones(3, requires_grad=True) * 2,
    }
    tessera.save(state, ckpt, options=tessera.SaveOptions(chunk_bytes=16))
    loaded = tessera.load(ckpt)
    for key, want in state.items():
        got = loaded[key]
        assert got.shape == want.shape, key
        assert torch.equal(got, want.detach()), key
        assert got.is_contiguous()


def test_conj_and_neg_views_of_complex(ckpt: Path) -> None:
    z = torch.complex(torch.arange(6.0), -torch.arange(6.0) * 0.5).reshape(2, 3)
    conj = z.conj()
    neg = z.conj().imag  # a lazily negated view
    assert conj.is_conj() and neg.is_neg()
    tessera.save({"conj": conj, "neg": neg, "conj_t": conj.t()}, ckpt)
    loaded = tessera.load(ckpt)
    assert not loaded["conj"].is_conj()
    assert torch.equal(loaded["conj"], conj.resolve_conj())
    assert torch.equal(loaded["neg"], neg.resolve_neg())
    assert torch.equal(loaded["conj_t"], conj.t().resolve_conj())
    assert bits(loaded["conj"]) == bits(conj)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_chunked_arrays_with_edges_R5_3(ckpt: Path, compression: str | None) -> None:
    t = random_tensor("float32", (37, 11, 3), seed=1)
    tessera.save(
        {"t": t},
        ckpt,
        options=tessera.SaveOptions(compression=tessera.Zstd() if compression else None, chunk_bytes=1000),
    )
    entry = read_json(ckpt / "zarr.json")["attributes"]["tessera"]["entries"][0]
    grid = [math.ceil(s / c) for s, c in zip(entry["shape"], entry["chunk_shape"], strict=True)]
    assert entry["chunk_count"] == math.prod(grid) > 4
    assert any(s % c for s, c in zip(entry["shape"], entry["chunk_shape"], strict=True))
    assert_bit_equal(tessera.load(ckpt)["t"], t)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_general_regular_grid_R5_3(ckpt: Path, compression: str | None) -> None:
    """Chunks cut short in several dimensions at once (not the writer's default grid)."""
    t = random_tensor("int16", (7, 5, 6), seed=2)
    with forced_chunks(lambda shape: (3, 2, 4)):
        tessera.save(
            {"t": t}, ckpt, options=tessera.SaveOptions(compression=tessera.Zstd() if compression else None)
        )
    entry = read_json(ckpt / "zarr.json")["attributes"]["tessera"]["entries"][0]
    assert entry["chunk_shape"] == [3, 2, 4] and entry["chunk_count"] == 3 * 3 * 2
    assert_bit_equal(tessera.load(ckpt)["t"], t)


def test_compression_is_recorded_R6_1(tmp_path: Path) -> None:
    t = torch.zeros(1000)
    tessera.save({"t": t}, tmp_path / "raw")
    tessera.save({"t": t}, tmp_path / "z", options=tessera.SaveOptions(compression=tessera.Zstd(5)))
    raw = read_json(tmp_path / "raw" / "t" / "zarr.json")["codecs"]
    z = read_json(tmp_path / "z" / "t" / "zarr.json")["codecs"]
    assert raw == [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    assert z == [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "zstd", "configuration": {"level": 5, "checksum": False}},
        {"name": "crc32c"},
    ]
    assert (tmp_path / "z" / "t" / "c" / "0").stat().st_size < 200
    assert (tmp_path / "raw" / "t" / "c" / "0").stat().st_size == 4004
    assert torch.equal(tessera.load(tmp_path / "z")["t"], t)


def test_bad_compression_argument_refused(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="None or 'zstd'"), pytest.warns(DeprecationWarning):
        tessera.save({"t": torch.ones(1)}, ckpt, compression="gzip")  # type: ignore[arg-type]
    assert not ckpt.exists()


def test_nested_containers_and_values_R8_1_R8_2(ckpt: Path) -> None:
    state = {
        "model": {"layers": [{"w": torch.ones(2)}, {"w": torch.zeros(2)}], "b": torch.arange(3)},
        "opt": {"state": {0: {"step": torch.tensor(3.0)}, 5: {"step": torch.tensor(4.0)}}},
        "tensors_tuple": (torch.ones(1), torch.zeros(1)),
        "mixed_list": [torch.ones(1), 3, "s", None, {"k": [1, 2]}],
        "config": {"lr": 1e-3, "betas": [0.9, 0.999], "name": "x", "on": True, "none": None},
        "int": 7,
        "big_int": 2**80,
        "neg": -1,
        "float": 0.1,
        "str": "ü日",
        "bool": False,
        "none": None,
        "empty_dict": {},
        "empty_list": [],
        "empty_in_walked": {1: {}, 2: []},
        "bytes": b"\x00\x01\xff",
        "bytearray": bytearray(b"abc"),
        "memoryview": memoryview(b"xyz"),
        "empty_bytes": b"",
        9: torch.ones(1),
        -2: "neg key",
    }
    tessera.save(state, ckpt)
    loaded = tessera.load(ckpt)
    want = dict(state)
    assert type(loaded["tensors_tuple"]) is tuple  # tuples come back as tuples (R8.8, format 1.2)
    want["bytearray"] = b"abc"
    want["memoryview"] = b"xyz"
    assert_tree_bit_equal(loaded, want)
    manifest = read_json(ckpt / "zarr.json")["attributes"]["tessera"]
    assert sorted(map(tuple, manifest["lists"])) == [("mixed_list",), ("model", "layers"), ("tensors_tuple",)]
    assert manifest["tuples"] == [["tensors_tuple"]]
    kinds = {e["path"]: (e["kind"], e.get("encoding")) for e in manifest["entries"]}
    assert kinds["config"] == ("value", "json")
    assert kinds["mixed_list/~4"] == ("value", "json")
    assert kinds["bytes"] == ("object", "bytes")
    assert kinds["empty_dict"] == ("value", "json")
    assert kinds["empty_in_walked/~1"] == ("value", "json")
    assert kinds["~9"] == ("tensor", None)


def test_large_bytes_object_in_many_chunks_R8_4(ckpt: Path) -> None:
    blob = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
    tessera.save(
        {"blob": blob, "ba": bytearray(blob[:77])}, str(ckpt), options=tessera.SaveOptions(chunk_bytes=64)
    )  # a str path works too
    entry = read_json(ckpt / "blob" / "zarr.json")
    assert entry["chunk_grid"]["configuration"]["chunk_shape"] == [64] and entry["shape"] == [1000]
    loaded = tessera.load(str(ckpt))
    assert loaded == {"blob": blob, "ba": blob[:77]}


def test_non_finite_floats_R8_3(ckpt: Path) -> None:
    state = {
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "in_list": [1.0, float("inf")],
        "in_dict": {"scale": float("nan"), "ok": 2.5},
    }
    tessera.save(state, ckpt)
    loaded = tessera.load(ckpt)
    assert_tree_bit_equal(loaded, state)
    values = {
        e["path"]: (e["encoding"], e["value"])
        for e in read_json(ckpt / "zarr.json")["attributes"]["tessera"]["entries"]
    }
    assert values["nan"] == ("float", "NaN")
    assert values["inf"] == ("float", "Infinity")
    assert values["ninf"] == ("float", "-Infinity")
    assert values["in_list/~0"] == ("json", 1.0)
    assert values["in_dict/scale"] == ("float", "NaN")


def test_numpy_arrays_come_back_as_numpy_R8_5(ckpt: Path) -> None:
    import ml_dtypes

    state = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "be": np.arange(5, dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "strided": np.arange(20, dtype=np.int64)[::3],
        "bf16": np.array([1.0, -2.0, np.nan], dtype=ml_dtypes.bfloat16),
        "bool": np.array([True, False]),
        "c128": np.array([1 + 2j]),
    }
    tessera.save(state, ckpt, options=tessera.SaveOptions(chunk_bytes=16))
    loaded = tessera.load(ckpt)
    for key, want in state.items():
        got = loaded[key]
        assert isinstance(got, np.ndarray), key
        assert_bit_equal(got, np.asarray(want))
    origins = {
        e["path"]: e["origin"] for e in read_json(ckpt / "zarr.json")["attributes"]["tessera"]["entries"]
    }
    assert set(origins.values()) == {"numpy"}
    assert read_json(ckpt / "be" / "zarr.json")["data_type"] == "int32"


@pytest.mark.parametrize(
    "value",
    [np.float64(2.5), np.array(7, dtype=np.uint16), np.int8(-3), np.array(1.5, dtype=np.float16)],
    ids=repr,
)
def test_numpy_scalars_and_0d_arrays_stay_0d_R8_5(ckpt: Path, value: object) -> None:
    """R8.5: a NumPy scalar is stored as a 0-d array (shape []), not as shape [1]."""
    tessera.save({"x": value}, ckpt)
    assert read_json(ckpt / "x" / "zarr.json")["shape"] == []
    got = tessera.load(ckpt)["x"]
    assert isinstance(got, np.ndarray) and got.shape == ()
    assert_bit_equal(got, np.asarray(value))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.ones(2, dtype=torch.complex32),
        lambda: torch.ones(2).to_sparse(),
        lambda: torch.empty(2, device="meta"),
        lambda: np.array(["a", "b"]),
        lambda: np.array([1, 2], dtype=object),
        lambda: np.array(["2020-01-01"], dtype="datetime64[D]"),
    ],
    ids=["complex32", "sparse", "meta", "str-array", "object-array", "datetime"],
)
def test_unsupported_tensors_refused_R8_5(ckpt: Path, make: object) -> None:
    value = make()  # type: ignore[operator]
    with pytest.raises(tessera.TensorMismatchError) as info:
        tessera.save({"x": value}, ckpt)
    assert info.value.code == "tensor_mismatch"
    assert "x" in str(info.value)
    assert not ckpt.exists()


def test_metadata_round_trip_R3_6(ckpt: Path) -> None:
    metadata = {"step": 1200, "tokens": 2**40, "config": {"lr": 3e-4, "layers": [1, 2]}, "tag": "ü"}
    manifest = tessera.save({"x": torch.ones(1)}, ckpt, metadata=metadata)
    assert manifest.metadata == metadata
    assert tessera.open(ckpt).metadata == metadata
    assert read_json(ckpt / "zarr.json")["attributes"]["tessera"]["metadata"] == metadata


@pytest.mark.parametrize(
    "metadata",
    [{"x": float("nan")}, {"x": float("inf")}, {1: "int key"}, {"x": torch.ones(1)}, ["list"]],
    ids=["nan", "inf", "int-key", "tensor", "not-object"],
)
def test_non_json_metadata_refused_R3_6(ckpt: Path, metadata: object) -> None:
    with pytest.raises(tessera.SchemaViolationError) as info:
        tessera.save({"x": torch.ones(1)}, ckpt, metadata=metadata)  # type: ignore[arg-type]
    assert info.value.code == "schema_violation"
    assert not ckpt.exists()


def test_state_dict_order_is_kept_R3_9(ckpt: Path) -> None:
    state = {"z": torch.ones(1), "a": {"y": 1, "b": torch.ones(1)}, "m": b"x", 3: 4.0}
    tessera.save(state, ckpt)
    assert tessera.open(ckpt).keys() == ["z", "a/y", "a/b", "m", "~3"]
    assert list(tessera.load(ckpt)) == ["z", "a", "m", 3]
    assert list(tessera.load(ckpt)["a"]) == ["y", "b"]


def test_empty_state_dict(ckpt: Path) -> None:
    tessera.save({}, ckpt)
    assert tessera.load(ckpt) == {}
    assert tessera.verify(ckpt).ok


def test_template_load_fills_in_place_R14_6(ckpt: Path) -> None:
    state = {"w": torch.randn(4, 3), "b": torch.randn(3), "n": 5}
    tessera.save(state, ckpt)
    dest_w = torch.zeros(3, 4).t()  # a non-contiguous destination
    template = {"w": dest_w, "b": torch.zeros(3), "n": 0}
    out = tessera.load(ckpt, template)
    assert out is template
    assert out["w"] is dest_w and torch.equal(dest_w, state["w"])
    assert torch.equal(template["b"], state["b"])
    assert template["n"] == 5


def test_tied_and_aliased_destinations(ckpt: Path) -> None:
    """Tied weights (one tensor under two keys) and views of one flat buffer load correctly."""
    embed = torch.randn(5, 3)
    flat_src = torch.arange(10.0)
    state = {
        "embed": embed,
        "head": embed,
        "p0": flat_src[:4].clone(),
        "p1": flat_src[4:].reshape(2, 3).clone(),
    }
    tessera.save(state, ckpt)
    tied = torch.zeros(5, 3)
    flat = torch.zeros(10)
    template = {"embed": tied, "head": tied, "p0": flat[:4], "p1": flat[4:].view(2, 3)}
    tessera.load(ckpt, template, strict="raise_all")
    assert torch.equal(tied, embed)
    assert torch.equal(flat, flat_src)


def test_progress_bar(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools
    import io
    import sys

    import tessera.api.save
    import tessera.util.progress

    verify_module = sys.modules["tessera.api.verify"]  # the package rebinds the name to the function

    stream = io.StringIO()
    bar = functools.partial(tessera.util.progress.Progress, stream=stream)
    monkeypatch.setattr(tessera.engine.chunk_writer, "Progress", bar)
    monkeypatch.setattr(verify_module, "Progress", bar)
    tessera.save({"x": torch.ones(1000)}, ckpt, progress=True, options=tessera.SaveOptions(chunk_bytes=400))
    assert "saving" in stream.getvalue() and "100.0%" in stream.getvalue()
    assert tessera.verify(ckpt, progress=True).ok
    assert "verifying" in stream.getvalue()
    stream.truncate(0)
    tessera.save({"x": torch.ones(10)}, ckpt.with_name("quiet"), progress=False)
    assert stream.getvalue() == ""


@pytest.mark.parametrize("chunk_bytes", [1, 8])
def test_chunk_bytes_smaller_than_one_element(ckpt: Path, chunk_bytes: int) -> None:
    """A tiny chunk_bytes gives one-element chunks (R5.12 leaves the shape to the writer)."""
    t = torch.arange(6.0).to(torch.complex128).reshape(2, 3)
    tessera.save({"t": t}, ckpt, options=tessera.SaveOptions(chunk_bytes=chunk_bytes))
    assert read_json(ckpt / "t" / "zarr.json")["chunk_grid"]["configuration"]["chunk_shape"] == [1, 1]
    assert_bit_equal(tessera.load(ckpt)["t"], t)


def test_threads_do_not_change_bytes(tmp_path: Path) -> None:
    state = every_dtype_state((9, 5), seed=11)
    tessera.save(state, tmp_path / "one", options=tessera.SaveOptions(chunk_bytes=16, threads=1))
    tessera.save(state, tmp_path / "many", options=tessera.SaveOptions(chunk_bytes=16, threads=8))
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    files = [f for f in files if f.name not in ("zarr.json", ".tessera-claim.json") or f.parent != Path(".")]
    assert len(files) > 50
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "many" / f).read_bytes(), f


# -- a real training state ------------------------------------------------------------------


def _training_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(5, 6) + torch.from_numpy(np.random.standard_normal((5, 6)).astype(np.float32))
        scale = random.random()
        loss = (model(x) * scale).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_adamw_model_and_rng_resume_identically(ckpt: Path) -> None:
    """Model + AdamW + torch/python/numpy RNG restored: the continued run is bit-identical."""
    model, optimizer = _training_state()
    random.seed(1)
    np.random.seed(2)
    _train(model, optimizer, 3)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
        "step": 3,
    }
    tessera.save(state, ckpt, options=tessera.SaveOptions(chunk_bytes=64), metadata={"step": 3})
    expected_losses = _train(model, optimizer, 4)
    expected_params = [p.detach().clone() for p in model.parameters()]

    # A fresh process' worth of objects, and scrambled RNGs.
    model2, optimizer2 = _training_state()
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    template = {
        "model": model2.state_dict(),
        "optimizer": optimizer2.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "step": 0,
    }
    loaded = tessera.load(ckpt, template, strict=tessera.Strict.RAISE_ALL)
    assert loaded["step"] == 3
    assert isinstance(loaded["rng"]["python"], tuple) and isinstance(loaded["rng"]["numpy"], tuple)
    model2.load_state_dict(loaded["model"])
    optimizer2.load_state_dict(loaded["optimizer"])
    torch.set_rng_state(loaded["rng"]["torch"])
    random.setstate(loaded["rng"]["python"])
    np.random.set_state(loaded["rng"]["numpy"])
    assert _train(model2, optimizer2, 4) == expected_losses
    for got, want in zip(model2.parameters(), expected_params, strict=True):
        assert bits(got) == bits(want)


def test_optimizer_state_without_template(ckpt: Path) -> None:
    model, optimizer = _training_state()
    _train(model, optimizer, 2)
    sd = optimizer.state_dict()
    tessera.save({"optimizer": sd}, ckpt)
    loaded = tessera.load(ckpt)["optimizer"]
    assert sorted(loaded["state"]) == sorted(sd["state"])  # int keys stay ints
    for pid, st in sd["state"].items():
        for name, value in st.items():
            assert_bit_equal(loaded["state"][pid][name], value)
    assert loaded["param_groups"][0]["params"] == sd["param_groups"][0]["params"]
    assert loaded["param_groups"][0]["betas"] == sd["param_groups"][0]["betas"]
    assert type(loaded["param_groups"][0]["betas"]) is tuple


def test_tuple_templates_come_back_as_tuples_R8_8(ckpt: Path) -> None:
    state = {"pair": (torch.ones(2), 5), "json_tuple": (1, (2, 3)), "t3": (torch.ones(1), torch.zeros(1))}
    tessera.save(state, ckpt)
    loaded = tessera.load(ckpt)  # format 1.2: tuples without a template too
    assert loaded["json_tuple"] == (1, (2, 3)) and type(loaded["pair"]) is tuple
    template = {"pair": (torch.zeros(2), 0), "json_tuple": (0, (0, 0)), "t3": (torch.zeros(1), torch.ones(1))}
    out = tessera.load(ckpt, template)
    assert isinstance(out["pair"], tuple) and out["pair"][1] == 5
    assert torch.equal(out["pair"][0], torch.ones(2))
    assert out["json_tuple"] == (1, (2, 3))
    assert isinstance(out["t3"], tuple) and torch.equal(out["t3"][1], torch.zeros(1))


Pair = collections.namedtuple("Pair", "tensor count")


def test_namedtuple_template_R8_8(ckpt: Path) -> None:
    tessera.save({"p": Pair(torch.ones(2), 5)}, ckpt)
    out = tessera.load(ckpt, {"p": Pair(torch.zeros(2), 0)})
    assert isinstance(out["p"], Pair)
    assert out["p"].count == 5
    assert torch.equal(out["p"].tensor, torch.ones(2))
