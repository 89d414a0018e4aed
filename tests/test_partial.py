"""Partial reads (R14.1, R14.2): regions and key subsets, touching only the chunks they need."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch

from .conftest import (
    assert_bit_equal,
    bits,
    flip_byte,
    forced_chunks,
    random_tensor,
    read_json,
    recorded,
    recording,
)

REGIONS: list[list[Any]] = [
    [],
    [2],
    [-1],
    [0, 0, 0],
    [-7, -5, -6],
    [slice(1, 4)],
    [slice(None), 3],
    [slice(2, 6), slice(1, 5), slice(0, 3)],
    [slice(3, 3)],
    [slice(5, 2)],
    [slice(0, 7), slice(4, 4)],
    [1, -2, slice(1, None)],
    [slice(-3, None), slice(None, -1)],
    [slice(0, 100), slice(-100, 2)],
    [slice(6, 7), 4, 5],
]


def _layouts() -> Iterator[tuple[str, Any]]:
    yield "writer-default", None
    yield "cut-3d", lambda shape: (3, 2, 4)
    yield "whole", lambda shape: shape
    yield "ones", lambda shape: (1, 1, 1)


@pytest.fixture(scope="module", params=list(_layouts()), ids=lambda p: p[0])
def chunked(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, torch.Tensor]:
    name, chunking = request.param
    root = tmp_path_factory.mktemp(name)
    t = random_tensor("int32", (7, 5, 6), seed=9)
    state = {"t": t, "z": t.to(torch.float64)}
    if chunking is None:
        tessera.save({"t": t}, root / "raw", options=tessera.SaveOptions(chunk_bytes=40))
        tessera.save(
            state, root / "zstd", options=tessera.SaveOptions(compression=tessera.Zstd(), chunk_bytes=40)
        )
    else:
        with forced_chunks(chunking):
            tessera.save({"t": t}, root / "raw")
            tessera.save(state, root / "zstd", options=tessera.SaveOptions(compression=tessera.Zstd()))
    return root, t


@pytest.mark.parametrize("region", REGIONS, ids=repr)
@pytest.mark.parametrize("variant", ["raw", "zstd"])
def test_region_matches_numpy_indexing_R14_2(
    chunked: tuple[Path, torch.Tensor], region: list[Any], variant: str
) -> None:
    root, t = chunked
    ck = tessera.open(root / variant)
    got = ck.read("t", region)
    want = t[tuple(region)] if region else t
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert bits(got) == bits(want)
    dest = torch.full(want.shape, -1, dtype=torch.int32)
    ck.read_into("t", dest, region)
    assert bits(dest) == bits(want)


def _expected_chunks(region: list[Any], shape: tuple[int, ...], chunk_shape: tuple[int, ...]) -> set[str]:
    """Chunk keys overlapping a region, computed independently of the reader."""
    ranges = []
    for dim, (size, c) in enumerate(zip(shape, chunk_shape, strict=True)):
        item = region[dim] if dim < len(region) else slice(None)
        if isinstance(item, int):
            start = item % size
            stop = start + 1
        else:
            start, stop, _ = item.indices(size)
        if stop <= start:
            return set()
        ranges.append(range(start // c, (stop - 1) // c + 1))
    return {"/".join(["c", *map(str, idx)]) for idx in itertools.product(*ranges)}


@pytest.mark.parametrize("region", REGIONS, ids=repr)
@pytest.mark.parametrize("variant", ["raw", "zstd"])
def test_region_reads_only_overlapping_chunks_R14_2(
    chunked: tuple[Path, torch.Tensor], region: list[Any], variant: str
) -> None:
    root, t = chunked
    storage = recorded(root / variant)
    ck = tessera.open(storage)
    entry = ck.entry("t")
    with recording(storage) as calls:
        ck.read("t", region)
    data_reads = {p.removeprefix("t/") for m, p in calls if m in ("read_file", "read_into") and "/c" in p}
    expected = _expected_chunks(region, entry.layout.shape, entry.layout.chunk_shape)
    assert data_reads == expected
    # Nothing but this array's zarr.json and its chunks is touched.
    assert {p for _, p in calls} <= {"t/zarr.json"} | {f"t/{k}" for k in expected}
    # A second read does not re-read the array's zarr.json (checked once per handle).
    with recording(storage) as again:
        ck.read("t", region)
    assert ("read_file", "t/zarr.json") not in again


def test_chunks_outside_the_region_may_be_damaged_R14_2(tmp_path: Path) -> None:
    t = torch.arange(40.0).reshape(8, 5)
    tessera.save({"t": t}, tmp_path / "c", options=tessera.SaveOptions(chunk_bytes=40))  # two rows per chunk
    flip_byte(tmp_path / "c" / "t" / "c" / "3" / "0", 3)
    (tmp_path / "c" / "t" / "c" / "2" / "0").unlink()
    ck = tessera.open(tmp_path / "c")
    assert torch.equal(ck.read("t", [slice(0, 4)]), t[:4])
    with pytest.raises(tessera.ChecksumMismatchError, match="t chunk c/3/0"):
        ck.read("t", [7])
    with pytest.raises(tessera.MissingChunkError, match="t chunk c/2/0"):
        ck.read("t", [slice(3, 5)])


def test_read_into_non_contiguous_and_other_layouts_R14_6(tmp_path: Path) -> None:
    t = random_tensor("bfloat16", (7, 5, 6), seed=1)
    with forced_chunks(lambda shape: (3, 2, 4)):
        tessera.save({"t": t}, tmp_path / "c")
    ck = tessera.open(tmp_path / "c")
    permuted = torch.empty(6, 5, 7, dtype=torch.bfloat16).permute(2, 1, 0)
    assert not permuted.is_contiguous()
    ck.read_into("t", permuted)
    assert bits(permuted) == bits(t)
    strided = torch.zeros(7, 10, 6, dtype=torch.bfloat16)[:, ::2]
    ck.read_into("t", strided)
    assert bits(strided) == bits(t)
    expanded_dim = torch.zeros(5, 6, dtype=torch.bfloat16)
    ck.read_into("t", expanded_dim, [4])
    assert bits(expanded_dim) == bits(t[4])
    region_dest = torch.zeros(4, 3, dtype=torch.bfloat16).t()
    ck.read_into("t", region_dest, [2, slice(1, 4), slice(0, 4)])
    assert bits(region_dest) == bits(t[2, 1:4, 0:4])


@pytest.mark.parametrize(
    ("dest", "region"),
    [
        (torch.zeros(7, 5, 6, dtype=torch.float32), None),  # dtype differs
        (torch.zeros(7, 5, 5, dtype=torch.int32), None),  # shape differs
        (torch.zeros(7 * 5 * 6, dtype=torch.int32), None),  # no implicit reshape
        (torch.zeros(1, 5, 6, dtype=torch.int32), [2]),  # int drops the dimension
        (torch.zeros(5, 6, dtype=torch.int32), [slice(2, 3)]),
    ],
    ids=["dtype", "shape", "reshape", "int-index", "slice-index"],
)
def test_read_into_refuses_mismatch_R14_6(ckpt: Path, dest: torch.Tensor, region: Any) -> None:
    tessera.save({"t": torch.arange(210, dtype=torch.int32).reshape(7, 5, 6)}, ckpt)
    before = dest.clone()
    with pytest.raises(tessera.TensorMismatchError) as info:
        tessera.open(ckpt).read_into("t", dest, region)
    assert info.value.code == "tensor_mismatch"
    assert "t:" in str(info.value)
    assert torch.equal(dest, before)


@pytest.mark.parametrize("region", [[7], [-8], [0, 5], [0, 0, 0, 0]], ids=repr)
def test_bad_regions_refused_R14_2(ckpt: Path, region: list[Any]) -> None:
    tessera.save({"t": torch.zeros(7, 5, 6)}, ckpt)
    with pytest.raises(tessera.TensorMismatchError) as info:
        tessera.open(ckpt).read("t", region)
    assert info.value.code == "tensor_mismatch"


@pytest.mark.parametrize(
    ("region", "error"),
    [
        ([slice(0, 4, 2)], ValueError),
        ([slice(None, None, -1)], ValueError),
        ([True], TypeError),
        ([1.0], TypeError),
        ([None], TypeError),
    ],
    ids=repr,
)
def test_region_argument_mistakes_are_type_and_value_errors(
    ckpt: Path, region: list[Any], error: type[Exception]
) -> None:
    """Not a region outside the array (R14.2) but a mistake in the call: no format error."""
    tessera.save({"t": torch.zeros(7, 5, 6)}, ckpt)
    with pytest.raises(error, match="t: region") as info:
        tessera.open(ckpt).read("t", region)
    assert not isinstance(info.value, tessera.TesseraError)


# -- subsets of keys ------------------------------------------------------------------------


@pytest.fixture
def model_ckpt(ckpt: Path) -> tuple[Path, dict[str, Any]]:
    state = {
        "model": {
            "embed": torch.arange(12.0).reshape(3, 4),
            "layers": [{"w": torch.ones(2) * i, "b": torch.zeros(1)} for i in range(3)],
        },
        "optimizer": {"state": {0: {"exp_avg": torch.full((3, 4), 7.0)}}, "param_groups": [{"lr": 0.1}]},
        "rng": b"\x01\x02",
        "step": 10,
    }
    tessera.save(state, ckpt, options=tessera.SaveOptions(chunk_bytes=16))
    return ckpt, state


@pytest.mark.parametrize(
    ("keys", "want"),
    [
        (["model"], lambda s: {"model": s["model"]}),
        (["model/embed"], lambda s: {"model": {"embed": s["model"]["embed"]}}),
        (["model/layers"], lambda s: {"model": {"layers": s["model"]["layers"]}}),
        (["model/layers/~0", "model/layers/~1"], lambda s: {"model": {"layers": s["model"]["layers"][:2]}}),
        (["model/layers/~1/w"], lambda s: {"model": {"layers": {1: {"w": s["model"]["layers"][1]["w"]}}}}),
        (["step", "rng"], lambda s: {"step": 10, "rng": b"\x01\x02"}),
        (["optimizer/param_groups"], lambda s: {"optimizer": {"param_groups": [{"lr": 0.1}]}}),
    ],
    ids=["prefix", "leaf", "list", "list-head", "list-middle", "values", "json"],
)
def test_subset_load_reads_only_its_chunks_R14_1(
    model_ckpt: tuple[Path, dict[str, Any]], keys: list[str], want: Any
) -> None:
    from .conftest import assert_tree_bit_equal

    root, state = model_ckpt
    storage = recorded(root)
    ck = tessera.open(storage)
    with recording(storage) as calls:
        got = tessera.load(ck, keys=keys)
    assert_tree_bit_equal(got, want(state))
    touched = {p for _, p in calls}
    for path in touched:
        assert any(path == k or path.startswith(k + "/") for k in keys), f"{path} read for {keys}"


def test_subset_load_of_unknown_key_fails_R14_3(model_ckpt: tuple[Path, dict[str, Any]]) -> None:
    root, _ = model_ckpt
    with pytest.raises(tessera.KeyMismatchError, match="model/nope") as info:
        tessera.load(root, keys=["model/embed", "model/nope"])
    assert info.value.code == "key_mismatch"
    with pytest.raises(tessera.KeyMismatchError):
        tessera.open(root).read("model/nope")
    with pytest.raises(tessera.KeyMismatchError):
        tessera.open(root).entry(("model", "nope"))


def test_checkpoint_handle_api(model_ckpt: tuple[Path, dict[str, Any]]) -> None:
    root, state = model_ckpt
    ck = tessera.open(root)
    assert ck.keys() == [
        "model/embed",
        "model/layers/~0/w",
        "model/layers/~0/b",
        "model/layers/~1/w",
        "model/layers/~1/b",
        "model/layers/~2/w",
        "model/layers/~2/b",
        "optimizer/state/~0/exp_avg",
        "optimizer/param_groups",
        "rng",
        "step",
    ]
    assert len(ck) == 11 and list(ck) == ck.keys()
    assert "model/embed" in ck and ("model", "layers", 0, "w") in ck and "model" not in ck
    assert ck.entry(("optimizer", "state", 0, "exp_avg")).kind == "tensor"
    assert ck.entry("rng").kind == "object" and ck.entry("step").kind == "value"
    assert ck.value("step") == 10
    assert ck.value("rng") == b"\x01\x02"
    rng_tensor = ck.read("rng")
    assert rng_tensor.dtype == torch.uint8 and rng_tensor.tolist() == [1, 2]
    assert_bit_equal(ck.read(("model", "embed"), [slice(1, 3), 2]), state["model"]["embed"][1:3, 2])
    with pytest.raises(tessera.TensorMismatchError, match="step"):
        ck.read("step")
    assert [e.path for e in ck.subtree("model/layers/~1")] == ["model/layers/~1/w", "model/layers/~1/b"]
    assert ck.metadata == {}
    assert read_json(root / "zarr.json")["attributes"]["tessera"]["entries"][0]["path"] == "model/embed"


def test_numpy_region_comes_back_as_numpy(ckpt: Path) -> None:
    a = np.arange(24, dtype=np.int16).reshape(4, 6)
    tessera.save({"a": a}, ckpt, options=tessera.SaveOptions(chunk_bytes=12))
    got = tessera.open(ckpt).read("a", [slice(1, 3), -1])
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, a[1:3, -1])


@pytest.mark.parametrize(
    ("view", "region"),
    [
        ((slice(6, 7), slice(4, 5), slice(5, 6)), [slice(6, 7), slice(4, 5), slice(5, 6)]),
        ((slice(2, 3), slice(4, 5), slice(None)), [slice(2, 3), slice(4, 5)]),
        ((slice(0, 1), slice(None), slice(None)), [slice(3, 4)]),
        ((slice(1, 6), slice(1, 3), slice(2, 5)), [slice(2, 7), slice(0, 2), slice(3, 6)]),
    ],
)
def test_read_into_a_view_writes_nothing_outside_it(ckpt: Path, view: tuple, region: list[Any]) -> None:
    """A destination that is a window of a bigger tensor: its neighbours stay untouched."""
    t = torch.arange(210, dtype=torch.int32).reshape(7, 5, 6)
    tessera.save({"t": t}, ckpt, options=tessera.SaveOptions(chunk_bytes=40))
    big = torch.full((7, 5, 6), -1, dtype=torch.int32)
    tessera.open(ckpt).read_into("t", big[view], region)
    want = torch.full((7, 5, 6), -1, dtype=torch.int32)
    want[view] = t[tuple(region)]
    assert torch.equal(big, want)
