"""What the writer puts on disk, byte for byte, against the spec's own examples (§2, §3.4, §5-§7)."""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
import tessera
import torch
from tessera.format.dtypes import DTYPES

from .conftest import DTYPE_NAMES, SPEC, random_tensor, read_json


def _spec_example_state() -> dict[str, Any]:
    """The state dict of the example in §2."""
    return {
        "model": {
            "embed.weight": torch.arange(6.0).reshape(3, 2),
            "layers": [{"w": torch.ones(2, dtype=torch.float16)}, {"w": torch.ones(2, dtype=torch.float16)}],
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3, 2)}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}],
        },
        "rng": b"\x01\x02\x03",
        "loss_scale": float("inf"),
    }


@pytest.fixture
def example(tmp_path: Path) -> Path:
    root = tmp_path / "step-00000100"
    tessera.save(
        _spec_example_state(), root, options=tessera.SaveOptions(chunk_bytes=16), metadata={"step": 100}
    )
    return root


def test_spec_example_tree_R2_3_to_R2_5(example: Path) -> None:
    """Exactly the files of the §2 tree: no more (R2.5), no fewer (R2.4, R5.7)."""
    files = sorted(p.relative_to(example).as_posix() for p in example.rglob("*") if p.is_file())
    layer = ["zarr.json", "w/zarr.json", "w/c/0"]
    assert files == sorted(
        [
            ".tessera-claim.json",
            "zarr.json",
            "model/zarr.json",
            "model/embed.weight/zarr.json",
            "model/embed.weight/c/0/0",
            "model/embed.weight/c/1/0",
            "model/layers/zarr.json",
            *(f"model/layers/~0/{f}" for f in layer),
            *(f"model/layers/~1/{f}" for f in layer),
            "optimizer/zarr.json",
            "optimizer/state/zarr.json",
            "optimizer/state/~0/zarr.json",
            "optimizer/state/~0/step/zarr.json",
            "optimizer/state/~0/step/c",
            "optimizer/state/~0/exp_avg/zarr.json",
            "optimizer/state/~0/exp_avg/c/0/0",
            "optimizer/state/~0/exp_avg/c/1/0",
            "rng/zarr.json",
            "rng/c/0",
        ]
    )


def test_spec_example_manifest_R3_4(example: Path) -> None:
    """Every entry printed in §3.4 is what the writer writes (the spec leaves some out for space)."""
    text = SPEC.read_text(encoding="utf-8").split("### 3.4 Example", 1)[1]
    spec_doc = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    ours = read_json(example / "zarr.json")
    spec_m, our_m = spec_doc["attributes"]["tessera"], ours["attributes"]["tessera"]
    for volatile in ("save_id", "created", "writer", "manifest_digest"):
        spec_m.pop(volatile)
        our_m.pop(volatile)
    spec_entries = spec_m.pop("entries")
    our_entries = {e["path"]: e for e in our_m.pop("entries")}
    assert our_m == spec_m
    for entry in spec_entries:
        assert our_entries[entry["path"]] == entry, entry["path"]
    assert list(our_entries) == [
        "model/embed.weight",
        "model/layers/~0/w",
        "model/layers/~1/w",
        "optimizer/state/~0/step",
        "optimizer/state/~0/exp_avg",
        "optimizer/param_groups",
        "rng",
        "loss_scale",
    ]


def test_root_document_members_R3_1_R12_5(example: Path) -> None:
    root = read_json(example / "zarr.json")
    assert list(root) == ["zarr_format", "node_type", "attributes"]
    assert (root["zarr_format"], root["node_type"], list(root["attributes"])) == (3, "group", ["tessera"])
    m = root["attributes"]["tessera"]
    assert m["format"] == "tessera" and m["format_version"] == "1.2" and m["must_understand"] == []
    assert m["writer"] == {"name": "tessera-python", "version": tessera.__version__}
    assert m["provenance"] == {"world_size": 1, "parallelism": {}}
    assert m["metadata"] == {"step": 100}
    assert m["lists"] == [["model", "layers"]] and m["tuples"] == []
    parsed = uuid.UUID(m["save_id"])
    assert parsed.version == 4 and str(parsed) == m["save_id"]  # R3.3: fresh v4, lower case
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", m["created"])


def test_fresh_save_id_per_save_R3_3(tmp_path: Path) -> None:
    ids = {tessera.save({"x": torch.ones(1)}, tmp_path / str(i)).save_id for i in range(3)}
    assert len(ids) == 3


def test_spec_example_chunk_bytes_R6_5(example: Path) -> None:
    """§6 example: chunk c/1/0 of [[0, 1], [2, 3], [4, 5]] in chunks [2, 2] is these 20 bytes."""
    raw = (example / "model" / "embed.weight" / "c" / "1" / "0").read_bytes()
    assert raw.hex(" ") == "00 00 80 40 00 00 a0 40 00 00 c0 7f 00 00 c0 7f da 43 70 96"
    assert (example / "model" / "embed.weight" / "c" / "0" / "0").read_bytes()[:16] == np.arange(
        4, dtype="<f4"
    ).tobytes()


def test_crc32c_check_value_R6_4() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_every_chunk_ends_with_its_crc32c_R6_4(tmp_path: Path, compression: str | None) -> None:
    tessera.save(
        {"t": random_tensor("float64", (7, 3), seed=1)},
        tmp_path / "c",
        options=tessera.SaveOptions(compression=tessera.Zstd() if compression else None, chunk_bytes=48),
    )
    chunks = [p for p in (tmp_path / "c" / "t" / "c").rglob("*") if p.is_file()]
    assert len(chunks) == 4
    for chunk in chunks:
        body = chunk.read_bytes()
        assert struct.unpack("<I", body[-4:])[0] == crc32c.crc32c(body[:-4])


# Fill bytes of R7.2's table, one element, little-endian.
FILL_BYTES = {
    "bool": "00",
    "int8": "00",
    "int16": "0000",
    "int32": "00000000",
    "int64": "00" * 8,
    "uint8": "00",
    "uint16": "0000",
    "uint32": "00000000",
    "uint64": "00" * 8,
    "float16": "007e",
    "float32": "0000c07f",
    "float64": "000000000000f87f",
    "complex64": "0000c07f" * 2,
    "complex128": "000000000000f87f" * 2,
    "bfloat16": "c07f",
    "float8_e4m3fn": "7f",
    "float8_e5m2": "7e",
    "float8_e4m3fnuz": "80",
    "float8_e5m2fnuz": "80",
}
FILL_VALUES = {"bool": False, "complex64": ["NaN", "NaN"], "complex128": ["NaN", "NaN"]}


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_edge_chunk_padding_is_the_fill_R5_4_R7_2(tmp_path: Path, name: str) -> None:
    dtype = next(d for d in DTYPES if d.name == name)
    t = random_tensor(name, (3,), seed=5)
    tessera.save(
        {"t": t}, tmp_path / "c", options=tessera.SaveOptions(chunk_bytes=2 * dtype.itemsize)
    )  # chunks of 2: the second overhangs
    raw = (tmp_path / "c" / "t" / "c" / "1").read_bytes()
    assert len(raw) == 2 * dtype.itemsize + 4
    element = t[2:3].view(torch.uint8).numpy().tobytes()
    assert raw[: dtype.itemsize] == element
    assert raw[dtype.itemsize : -4].hex() == FILL_BYTES[name]


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_array_zarr_json_exact_R5_8_R5_9_R6_1(tmp_path: Path, name: str) -> None:
    dtype = next(d for d in DTYPES if d.name == name)
    tessera.save(
        {"t": random_tensor(name, (5, 3), seed=1)},
        tmp_path / "c",
        options=tessera.SaveOptions(chunk_bytes=3 * dtype.itemsize * 2),
    )
    raw = (tmp_path / "c" / "t" / "zarr.json").read_text()
    doc = json.loads(raw)
    assert list(doc) == [
        "zarr_format",
        "node_type",
        "shape",
        "data_type",
        "chunk_grid",
        "chunk_key_encoding",
        "fill_value",
        "codecs",
        "attributes",
    ]
    default_fill = "NaN" if dtype.is_floating else 0
    assert doc == {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [5, 3],
        "data_type": name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 3]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": FILL_VALUES.get(name, default_fill),
        "codecs": [
            {"name": "bytes"}
            if dtype.itemsize == 1
            else {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "crc32c"},
        ],
        "attributes": {},
    }
    assert "false" in raw if name == "bool" else True  # a JSON boolean, not 0


def _zstd_frames(z: bytes) -> list[int | None]:
    """Declared content size of each frame of ``z`` (RFC 8878), walking block headers."""
    sizes: list[int | None] = []
    pos = 0
    while pos < len(z):
        assert z[pos : pos + 4] == struct.pack("<I", 0xFD2FB528), "not a zstd frame"
        descriptor = z[pos + 4]
        pos += 5
        single = bool(descriptor & 0x20)
        if not single:
            pos += 1  # window descriptor
        pos += (0, 1, 2, 4)[descriptor & 3]
        fcs = (0, 2, 4, 8)[descriptor >> 6] or (1 if single else 0)
        value = int.from_bytes(z[pos : pos + fcs], "little") if fcs else None
        sizes.append(value + 256 if fcs == 2 else value)  # type: ignore[operator]
        pos += fcs
        while True:
            header = int.from_bytes(z[pos : pos + 3], "little")
            pos += 3
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            pos += 1 if kind == 1 else size
            if last:
                break
        if descriptor & 0x04:
            pos += 4
    assert pos == len(z)
    return sizes


@pytest.mark.parametrize("shape", [(64, 3), (5,), ()])
def test_zstd_chunks_are_one_frame_declaring_its_size_R6_3(tmp_path: Path, shape: tuple[int, ...]) -> None:
    t = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    tessera.save(
        {"t": t}, tmp_path / "c", options=tessera.SaveOptions(compression=tessera.Zstd(), chunk_bytes=96)
    )
    entry = read_json(tmp_path / "c" / "t" / "zarr.json")
    n = math.prod(entry["chunk_grid"]["configuration"]["chunk_shape"]) * 4
    chunks = [p for p in (tmp_path / "c" / "t").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    for chunk in chunks:
        assert _zstd_frames(chunk.read_bytes()[:-4]) == [n]


def test_values_live_in_the_manifest_only_R2_3(example: Path) -> None:
    assert not (example / "loss_scale").exists()
    assert not (example / "optimizer" / "param_groups").exists()
    entries = {e["path"]: e for e in read_json(example / "zarr.json")["attributes"]["tessera"]["entries"]}
    assert entries["loss_scale"] == {
        "kind": "value",
        "key": ["loss_scale"],
        "path": "loss_scale",
        "encoding": "float",
        "value": "Infinity",
    }


def test_no_group_document_for_value_paths_R2_4(tmp_path: Path) -> None:
    tessera.save({"a": {"b": {"c": 1}}, "t": {"u": torch.ones(1)}}, tmp_path / "c")
    files = sorted(
        p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*") if p.is_file()
    )
    assert files == [".tessera-claim.json", "t/u/c/0", "t/u/zarr.json", "t/zarr.json", "zarr.json"]


def test_chunk_shapes_fix_the_grid_of_named_arrays_R5_12(tmp_path: Path) -> None:
    """``chunk_shapes`` replaces the writer's choice for the arrays it names, and only those."""
    state = {"a": {"w": torch.arange(35.0).reshape(5, 7), "b": torch.zeros(4)}}
    tessera.save(state, tmp_path / "ck", options=tessera.SaveOptions(chunk_shapes={"a/w": [2, 3]}))
    entries = {e.path: e.layout.chunk_shape for e in tessera.open(tmp_path / "ck").manifest.entries}
    assert entries == {"a/w": (2, 3), "a/b": (4,)}
    assert torch.equal(tessera.load(tmp_path / "ck")["a"]["w"], state["a"]["w"])


@pytest.mark.parametrize(
    ("chunk_shapes", "error"),
    [
        ({"w": [2]}, tessera.TensorMismatchError),
        ({"nowhere": [1, 1]}, tessera.InvalidKeyError),
    ],
)
def test_chunk_shapes_refused_before_anything_is_written(
    tmp_path: Path, chunk_shapes: dict[str, list[int]], error: type[tessera.TesseraError]
) -> None:
    with pytest.raises(error):
        tessera.save(
            {"w": torch.zeros(3, 3)}, tmp_path / "ck", options=tessera.SaveOptions(chunk_shapes=chunk_shapes)
        )
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
