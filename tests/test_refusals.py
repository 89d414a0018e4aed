"""Every error class of §13, each provoked by a crafted checkpoint (R11, R13, R15.3).

Hostile manifests are made by editing the root ``zarr.json`` of a good
checkpoint as JSON. Each test checks the error class, its ``code`` and that the
message names the key, chunk or file at fault.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch
from tessera import ReaderLimits
from tessera.storage.local import LocalStorage
from tessera.testing import RecordingStorage

from .conftest import (
    assert_tree_bit_equal,
    edit_json,
    edit_manifest,
    entry_of,
    flip_byte,
    read_json,
    reseal_root_file,
    write_chunk_file,
)

W = torch.arange(24.0).reshape(4, 6)
V = torch.arange(5, dtype=torch.int16)


def _state() -> dict[str, Any]:
    return {"w": W.clone(), "grp": {"v": V.clone(), "n": 3}, "blob": b"abc"}


@pytest.fixture
def good(ckpt: Path) -> Path:
    """w: float32 [4, 6] in chunks [1, 6] (c/0/0 ... c/3/0); grp/v: int16 [5]; blob: bytes."""
    tessera.save(_state(), ckpt, options=tessera.SaveOptions(chunk_bytes=24))
    return ckpt


@pytest.fixture
def good_zstd(ckpt: Path) -> Path:
    tessera.save(_state(), ckpt, options=tessera.SaveOptions(compression=tessera.Zstd(), chunk_bytes=24))
    return ckpt


def _load_raises(path: Path, cls: type[tessera.TesseraError], *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(cls) as info:
        tessera.load(path, **kwargs)
    assert info.value.code == cls.code
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- existence and commit (R9.13) -----------------------------------------------------------


def test_not_found_R9_13(tmp_path: Path) -> None:
    _load_raises(tmp_path / "nope", tessera.CheckpointNotFoundError, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    _load_raises(tmp_path / "empty", tessera.CheckpointNotFoundError, "empty")
    assert tessera.CheckpointNotFoundError.code == "not_found"


def test_claimed_but_uncommitted_R9_13(good: Path) -> None:
    (good / "zarr.json").unlink()
    _load_raises(good, tessera.UncommittedCheckpointError, "no root zarr.json", "claimed")
    assert tessera.UncommittedCheckpointError.code == "uncommitted"


def test_random_files_are_uncommitted_R9_13(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "weights.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "d" / "sub").mkdir()
    _load_raises(tmp_path / "d", tessera.UncommittedCheckpointError, "not a committed Tessera checkpoint")


def test_uncommitted_wins_over_corrupt_chunks_R13_2(good: Path) -> None:
    flip_byte(good / "w" / "c" / "0" / "0")
    (good / "zarr.json").unlink()
    _load_raises(good, tessera.UncommittedCheckpointError)


@pytest.mark.parametrize(
    "root",
    [
        {"zarr_format": 3, "node_type": "group", "attributes": {}},
        {"zarr_format": 3, "node_type": "group", "attributes": {"tessera": {"format": "other"}}},
        {"zarr_format": 3, "node_type": "group", "attributes": {"tessera": "1.0"}},
        {"zarr_format": 3, "node_type": "group"},
        [],
        "tessera",
    ],
    ids=["plain-group", "other-format", "string-manifest", "no-attributes", "array", "string"],
)
def test_not_a_tessera_manifest_R9_13(good: Path, root: Any) -> None:
    (good / "zarr.json").write_text(json.dumps(root))
    _load_raises(good, tessera.SchemaViolationError)


# -- versions (§12) -------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.0", "0.9", "3.1", "10.0"])
def test_unknown_major_R12_2(good: Path, version: str) -> None:
    # A 2.0 manifest may look nothing like 1.0: the version is checked before the schema (R12.4).
    edit_manifest(good, lambda m: m.update(format_version=version, entries=5, save_id=None))
    _load_raises(good, tessera.UnsupportedVersionError, version)


@pytest.mark.parametrize("version", ["1.7", "1.10", "1.0"])
def test_newer_minor_with_unknown_fields_is_read_R12_3(good: Path, version: str) -> None:
    def newer(m: dict[str, Any]) -> None:
        m["format_version"] = version
        m["signature"] = {"alg": "ed25519", "value": "..."}
        m["provenance"]["hosts"] = ["a", "b"]
        m["writer"]["build"] = "abc"
        for e in m["entries"]:
            e["digest"] = "sha256:..."

    edit_manifest(good, newer)
    edit_json(good / "zarr.json", lambda d: d["attributes"].update(other_tool={"x": 1}))
    assert_tree_bit_equal(tessera.load(good), _state())
    assert tessera.open(good).manifest.format_version == version
    assert tessera.verify(good).ok


@pytest.mark.parametrize("listed", [["x"], ["signature"], ["a", "b"]])
def test_must_understand_unknown_field_R12_3(good: Path, listed: list[str]) -> None:
    edit_manifest(good, lambda m: m.update(format_version="1.3", must_understand=listed, signature={}))
    _load_raises(good, tessera.UnsupportedVersionError, listed[0])


@pytest.mark.parametrize("value", [5, "abc", [1], None, {"x": 1}], ids=repr)
def test_must_understand_not_a_list_of_strings_R12_4(good: Path, value: Any) -> None:
    edit_manifest(good, lambda m: m.update(must_understand=value))
    _load_raises(good, tessera.SchemaViolationError)


@pytest.mark.parametrize("version", ["01.0", "1", "1.0.0", "1.01", "v1.0", " 1.0", 1.0, 1, None], ids=repr)
def test_malformed_version_R12_1(good: Path, version: Any) -> None:
    edit_manifest(good, lambda m: m.update(format_version=version))
    _load_raises(good, tessera.SchemaViolationError)


# -- schema violations (R3.2, R3.10-R3.16) --------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "json_path"),
    [
        (lambda m: m.pop("save_id"), "$.attributes.tessera"),
        (lambda m: m.pop("entries"), "$.attributes.tessera"),
        (lambda m: m["provenance"].update(world_size="1"), "$.attributes.tessera.provenance.world_size"),
        (lambda m: m["provenance"].update(world_size=0), "$.attributes.tessera.provenance.world_size"),
        (lambda m: m.update(save_id="ABC"), "$.attributes.tessera.save_id"),
        (lambda m: m.update(created="yesterday"), "$.attributes.tessera.created"),
        (lambda m: m.update(metadata=[]), "$.attributes.tessera.metadata"),
        (lambda m: m["entries"][0].update(dtype="float128"), "$.attributes.tessera.entries[0]"),
        (lambda m: m["entries"][0].update(kind="blob"), "$.attributes.tessera.entries[0].kind"),
        (lambda m: m["entries"][0].update(chunk_shape=[0, 6]), "$.attributes.tessera.entries[0]"),
        (lambda m: m["entries"][0].update(shape=[-4, 6]), "$.attributes.tessera.entries[0]"),
        (lambda m: m["entries"][0].pop("codecs"), "$.attributes.tessera.entries[0]"),
        (lambda m: m["entries"][0].pop("origin"), "$.attributes.tessera.entries[0]"),
        (lambda m: m["entries"][0].update(key=[True]), "$.attributes.tessera.entries[0].key"),
        (lambda m: m["entries"][0].update(key=[""]), "$.attributes.tessera.entries[0].key"),
        (lambda m: m["entries"][0].update(key=[]), "$.attributes.tessera.entries[0].key"),
        pytest.param(
            lambda m: m["entries"][0].update(shape=[4.0, 6]),
            "$.attributes.tessera.entries[0]",
        ),
        pytest.param(
            lambda m: m["entries"][0].update(chunk_count=4.0),
            "$.attributes.tessera.entries[0]",
        ),
        (lambda m: m["entries"][2].update(encoding="yaml"), "$.attributes.tessera.entries[2]"),
        (lambda m: m["entries"][3].update(dtype="float32"), "$.attributes.tessera.entries[3]"),
        (lambda m: m["lists"].append([]), "$.attributes.tessera.lists"),
    ],
    ids=[
        "missing-save_id",
        "missing-entries",
        "world_size-string",
        "world_size-0",
        "save_id-format",
        "created-format",
        "metadata-list",
        "unknown-dtype",
        "unknown-kind",
        "zero-chunk",
        "negative-shape",
        "no-codecs",
        "no-origin",
        "bool-key",
        "empty-key-component",
        "empty-key",
        "float-shape-R3_7",
        "float-chunk_count-R3_7",
        "value-encoding",
        "object-dtype",
        "empty-list-key",
    ],
)
def test_schema_violation_names_json_path_R3_2(good: Path, mutate: Any, json_path: str) -> None:
    edit_manifest(good, mutate)
    message = _load_raises(good, tessera.SchemaViolationError, "root.schema.json", json_path)
    assert str(good / "zarr.json") in message


def test_schema_errors_are_all_listed_R11_9(good: Path) -> None:
    def several(m: dict[str, Any]) -> None:
        m.pop("created")
        m["provenance"]["world_size"] = -1
        m["entries"][0]["dtype"] = "complex256"

    edit_manifest(good, several)
    message = _load_raises(good, tessera.SchemaViolationError)
    assert "created" in message and "world_size" in message and "entries[0]" in message


@pytest.mark.parametrize(
    ("mutate", "cls", "fragment"),
    [
        (lambda m: m["entries"][0].update(shape=[4, 6, 1]), tessera.SchemaViolationError, "rank"),
        (lambda m: m["entries"][0].update(chunk_count=5), tessera.InconsistentCheckpointError, "5 chunks"),
        (
            lambda m: m["entries"][2].update(encoding="float", value="nan"),
            tessera.SchemaViolationError,
            "NaN",
        ),
        (
            lambda m: m["entries"][3].update(shape=[1, 3], chunk_shape=[1, 3]),
            tessera.SchemaViolationError,
            "1-d uint8",
        ),
    ],
    ids=["rank-mismatch-R3_17", "chunk_count-R3_17", "float-value-R3_16", "object-rank-R3_15"],
)
def test_entry_checks_R3_15_to_R3_17(good: Path, mutate: Any, cls: type, fragment: str) -> None:
    edit_manifest(good, mutate)
    _load_raises(good, cls, fragment)


@pytest.mark.parametrize(
    "codecs",
    [
        [{"name": "bytes", "configuration": {"endian": "big"}}, {"name": "crc32c"}],
        [{"name": "bytes", "configuration": {"endian": "little"}}],
        [{"name": "crc32c"}, {"name": "bytes", "configuration": {"endian": "little"}}],
        [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "zstd", "configuration": {"level": 3, "checksum": True}},
            {"name": "crc32c"},
        ],
        [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "zstd", "configuration": {"level": 3}},
            {"name": "crc32c"},
        ],
        [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "gzip"}, {"name": "crc32c"}],
        [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}, {"name": "crc32c"}],
        [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c", "configuration": {}}],
    ],
    ids=[
        "big-endian",
        "no-crc",
        "order",
        "zstd-checksum",
        "zstd-no-checksum-member",
        "gzip",
        "crc-twice",
        "crc-config",
    ],
)
def test_codec_chain_refused_R6_1(good: Path, codecs: list[dict[str, Any]]) -> None:
    """The chain is refused even where manifest and array zarr.json agree."""
    edit_manifest(good, lambda m: m["entries"][0].update(codecs=codecs))
    edit_json(good / "w" / "zarr.json", lambda d: d.update(codecs=codecs))
    _load_raises(good, tessera.SchemaViolationError)


def test_endian_on_one_byte_type_refused_R6_1(good: Path) -> None:
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    edit_manifest(good, lambda m: m["entries"][3].update(codecs=codecs))
    edit_json(good / "blob" / "zarr.json", lambda d: d.update(codecs=codecs))
    _load_raises(good, tessera.SchemaViolationError)


# -- strict JSON (R11.4, R11.5) -------------------------------------------------------------


def _replace_root_text(root: Path, old: str, new: str) -> None:
    text = (root / "zarr.json").read_text()
    assert old in text
    (root / "zarr.json").write_text(text.replace(old, new, 1))
    reseal_root_file(root / "zarr.json")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"metadata":{}', '"metadata":{"x":NaN}'),
        ('"metadata":{}', '"metadata":{"x":Infinity}'),
        ('"metadata":{}', '"metadata":{"x":-Infinity}'),
        ('"metadata":{}', '"metadata":{"x":1e400}'),
        ('"metadata":{}', '"metadata":{"x":"\\ud800"}'),
        ('"metadata":{}', '"metadata":{"x":1,"x":2}'),
        ('"metadata":{}', '"metadata":{},"metadata":{}'),
        ('"metadata":{}', '"metadata":{"a":{"b":1,"b":1}}'),
        ('"metadata":{}', '"metadata":{"x":01}'),
        ('"metadata":{}', '"metadata":{"x":\'s\'}'),
        ('"metadata":{}', '"metadata":{"x":1,}'),
    ],
    ids=[
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "lone-surrogate",
        "duplicate",
        "duplicate-top",
        "duplicate-deep",
        "leading-zero",
        "single-quote",
        "trailing-comma",
    ],
)
def test_strict_json_R11_4(good: Path, old: str, new: str) -> None:
    _replace_root_text(good, old, new)
    _load_raises(good, tessera.SchemaViolationError, "zarr.json")


@pytest.mark.parametrize(
    "transform",
    [
        lambda b: b"\xef\xbb\xbf" + b,
        lambda b: b + b" {}",
        lambda b: b + b"\x00",
        lambda b: b.replace(b'"metadata":{}', b'"metadata":{"x":"\xff"}'),
        lambda b: b[: len(b) // 2],
        lambda b: b"",
    ],
    ids=["bom", "trailing-data", "trailing-nul", "invalid-utf8", "truncated", "empty"],
)
def test_strict_json_bytes_R11_4(good: Path, transform: Any) -> None:
    (good / "zarr.json").write_bytes(transform((good / "zarr.json").read_bytes()))
    _load_raises(good, tessera.SchemaViolationError)


@pytest.mark.parametrize("depth", [65, 200, 10_000, 100_000])
def test_too_deep_json_R11_5(good: Path, depth: int) -> None:
    _replace_root_text(good, '"metadata":{}', '"metadata":{"x":' + "[" * depth + "]" * depth + "}")
    _load_raises(good, tessera.LimitExceededError, "deeper")


def test_depth_limit_boundary_R11_5(good: Path) -> None:
    # The outermost object is depth 1: root(1) > attributes(2) > tessera(3) > metadata(4) > x(5...).
    _replace_root_text(good, '"metadata":{}', '"metadata":{"x":' + "[" * 60 + "]" * 60 + "}")
    assert tessera.open(good).metadata["x"] is not None  # depth 64: allowed
    _replace_root_text(good, '"x":[', '"x":[[')
    _replace_root_text(good, "]}", "]]}")
    _load_raises(good, tessera.LimitExceededError)


def test_json_size_limit_R11_5(good: Path) -> None:
    size = (good / "zarr.json").stat().st_size
    with pytest.raises(tessera.LimitExceededError, match=f"{size} bytes"):
        tessera.open(good, limits=ReaderLimits(max_json_bytes=size - 1))
    assert tessera.open(good, limits=ReaderLimits(max_json_bytes=size)).keys()
    # The array zarr.json is bounded too, on first access.
    ck = tessera.open(good, limits=ReaderLimits(max_json_bytes=size, max_json_depth=64))
    array_size = (good / "w" / "zarr.json").stat().st_size
    ck_small = tessera.Checkpoint(ck.storage, ck.manifest, limits=ReaderLimits(max_json_bytes=array_size - 1))
    with pytest.raises(tessera.LimitExceededError):
        ck_small.read("w")


def test_writer_refuses_metadata_readers_would_refuse_R11_6(ckpt: Path) -> None:
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    with pytest.raises(tessera.LimitExceededError):
        tessera.save({"w": torch.ones(1)}, ckpt, metadata={"deep": deep})
    assert not ckpt.exists()


# -- chunks (R5.7, R6.5-R6.8) ---------------------------------------------------------------


@pytest.mark.parametrize("region", [None, [slice(1, 3), slice(2, 4)]], ids=["whole", "region"])
@pytest.mark.parametrize("offset", [0, 23, -1, -4])
def test_flipped_bit_R6_6(good: Path, region: Any, offset: int) -> None:
    path = good / "w" / "c" / "1" / "0"
    flip_byte(path, offset % path.stat().st_size)
    with pytest.raises(tessera.ChecksumMismatchError) as info:
        tessera.open(good).read("w", region)
    assert info.value.code == "checksum_mismatch"
    assert "w chunk c/1/0" in str(info.value)
    assert str(good) in str(info.value)


def test_flipped_bit_in_compressed_chunk_R6_6(good_zstd: Path) -> None:
    flip_byte(good_zstd / "w" / "c" / "2" / "0", 5)
    _load_raises(good_zstd, tessera.ChecksumMismatchError, "w chunk c/2/0")


def test_flipped_bit_in_bytes_object_R6_6(good: Path) -> None:
    flip_byte(good / "blob" / "c" / "0", 1)
    _load_raises(good, tessera.ChecksumMismatchError, "blob chunk c/0")


def test_corrupt_chunk_read_in_place_raises_R6_6(good: Path) -> None:
    """R6.6: a chunk read straight into the caller's tensor is checked there; the load
    raises (the destination's contents are then unspecified)."""
    flip_byte(good / "grp" / "v" / "c" / "0", 0)
    dest = torch.zeros(5, dtype=torch.int16)
    with pytest.raises(tessera.ChecksumMismatchError, match="grp/v chunk c/0"):
        tessera.load(good, {"grp": {"v": dest}}, strict="ignore_all")


@pytest.mark.parametrize("size", [0, 3, 20, 27, 29, 100])
def test_wrong_size_uncompressed_chunk_R6_7(good: Path, size: int) -> None:
    """Size is checked before the CRC: 24 bytes of data + 4 of CRC = 28 (R13.2)."""
    path = good / "w" / "c" / "3" / "0"
    data = path.read_bytes()
    assert len(data) == 28
    path.write_bytes((data * 4)[:size])
    _load_raises(good, tessera.InconsistentCheckpointError, "w chunk c/3/0", str(size))


def test_truncated_compressed_chunk_R6_7(good_zstd: Path) -> None:
    path = good_zstd / "w" / "c" / "0" / "0"
    path.write_bytes(path.read_bytes()[:3])
    _load_raises(good_zstd, tessera.InconsistentCheckpointError, "w chunk c/0/0")
    path.write_bytes(b"")
    _load_raises(good_zstd, tessera.InconsistentCheckpointError, "w chunk c/0/0")


def test_missing_chunk_R5_7(good: Path) -> None:
    (good / "w" / "c" / "2" / "0").unlink()
    _load_raises(good, tessera.MissingChunkError, "w chunk c/2/0", "never read as fill value")


def test_missing_chunk_directory_R5_7(good: Path) -> None:
    shutil.rmtree(good / "w" / "c")
    message = _load_raises(good, tessera.MissingChunkError)
    assert re.search(r"w chunk c/[0-3]/0", message), message


def test_chunk_that_is_a_directory_R5_7(good: Path) -> None:
    """A directory where a chunk file should be is no chunk: missing."""
    path = good / "grp" / "v" / "c" / "0"
    path.unlink()
    path.mkdir()
    _load_raises(good, tessera.MissingChunkError, "grp/v chunk c/0")


# -- zstd frames (R6.3, R6.8) ---------------------------------------------------------------

_MAGIC = struct.pack("<I", 0xFD2FB528)
_WINDOW_128K = b"\x38"  # Window_Descriptor: 2^17 bytes


def _zstd_frame(blocks: list[tuple[str, bytes, int]], content_size: int | None) -> bytes:
    """A zstd frame of raw ("raw", data, 0) or run-length ("rle", byte, count) blocks."""
    descriptor = 0 if content_size is None else 0xC0  # FCS field of 8 bytes
    out = bytearray(_MAGIC + bytes([descriptor]) + _WINDOW_128K)
    if content_size is not None:
        out += struct.pack("<Q", content_size)
    for i, (kind, data, count) in enumerate(blocks):
        last = int(i == len(blocks) - 1)
        if kind == "raw":
            out += ((len(data) << 3) | last).to_bytes(3, "little") + data
        else:
            out += ((count << 3) | (1 << 1) | last).to_bytes(3, "little") + data
    return bytes(out)


def _write_chunk(path: Path, body: bytes) -> None:
    write_chunk_file(path, body)


def test_zstd_frame_helper_is_valid() -> None:
    from numcodecs.zstd import Zstd

    payload = bytes(range(24))
    assert Zstd().decode(_zstd_frame([("raw", payload, 0)], 24)) == payload
    assert Zstd().decode(_zstd_frame([("rle", b"\x07", 10)], None)) == b"\x07" * 10


def test_valid_foreign_frame_accepted_R6_3(good_zstd: Path) -> None:
    """Any valid single frame declaring the right size decodes, whatever its blocks."""
    data = W[1].numpy().tobytes()
    _write_chunk(
        good_zstd / "w" / "c" / "1" / "0", _zstd_frame([("raw", data[:10], 0), ("raw", data[10:], 0)], 24)
    )
    assert torch.equal(tessera.load(good_zstd)["w"], W)


@pytest.mark.parametrize(
    "frame",
    [
        _zstd_frame([("raw", bytes(24), 0)], None),
        _zstd_frame([("raw", bytes(24), 0)], 23),
        _zstd_frame([("raw", bytes(24), 0)], 2**40),
        _zstd_frame([("rle", b"\x00", 4096)], None),
        _zstd_frame([("raw", bytes(24), 0)], 24) + _zstd_frame([("raw", bytes(8), 0)], 8),
    ],
    ids=["no-content-size", "wrong-content-size", "huge-content-size", "rle-no-content-size", "two-frames"],
)
def test_zstd_frame_must_declare_the_chunk_size_R6_3(good_zstd: Path, frame: bytes) -> None:
    _write_chunk(good_zstd / "w" / "c" / "1" / "0", frame)
    _load_raises(good_zstd, tessera.InconsistentCheckpointError, "w chunk c/1/0")


def test_zstd_garbage_with_valid_crc_R6_7(good_zstd: Path) -> None:
    _write_chunk(good_zstd / "w" / "c" / "1" / "0", b"not zstd at all")
    _load_raises(good_zstd, tessera.InconsistentCheckpointError, "w chunk c/1/0")


def test_zstd_decoding_to_wrong_length_R6_7(good_zstd: Path) -> None:
    from numcodecs.zstd import Zstd

    _write_chunk(good_zstd / "w" / "c" / "1" / "0", Zstd(level=1).encode(bytes(20)))
    _load_raises(good_zstd, tessera.InconsistentCheckpointError, "w chunk c/1/0")


def test_compressed_chunk_over_the_bound_R6_8(good_zstd: Path) -> None:
    n = 24
    bound = n + n // 128 + 1028  # the largest chunk file zstd can make of n bytes, CRC included
    path = good_zstd / "w" / "c" / "1" / "0"
    _write_chunk(path, b"\x00" * (bound - 4 + 1))
    assert path.stat().st_size == bound + 1
    _load_raises(good_zstd, tessera.LimitExceededError, "w chunk c/1/0")
    _write_chunk(path, b"\x00" * (bound - 4))  # at the bound: read, then refused as bad zstd
    _load_raises(good_zstd, tessera.InconsistentCheckpointError, "w chunk c/1/0")


def test_zstd_bomb_is_not_decompressed_R6_8(tmp_path: Path) -> None:
    """A 64 KiB chunk whose 16 KiB zstd frame expands to 256 MiB: refused without the memory."""
    script = textwrap.dedent(
        f"""
        import resource, struct, sys, crc32c, torch, tessera
        root = {str(tmp_path / "ckpt")!r}
        options = tessera.SaveOptions(compression=tessera.Zstd(), chunk_bytes=65536)
        tessera.save({{"a": torch.zeros(16384)}}, root, options=options)
        frame = bytearray(struct.pack("<I", 0xFD2FB528) + b"\\x00\\x38")
        blocks = 2048  # 2048 run-length blocks of 128 KiB: 256 MiB
        for i in range(blocks):
            frame += (((131072 << 3) | 2 | int(i == blocks - 1)).to_bytes(3, "little") + b"\\x00")
        frame = bytes(frame)
        with open(root + "/a/c/0", "wb") as f:
            f.write(frame + struct.pack("<I", crc32c.crc32c(frame)))
        from tessera.format.digest import PLACEHOLDER, seal_root  # list the frame's CRC (R3.19)
        import json
        doc = json.load(open(root + "/zarr.json"))
        manifest = doc["attributes"]["tessera"]
        manifest["entries"][0]["chunk_crc32c"] = format(crc32c.crc32c(frame), "08x")
        manifest["manifest_digest"] = PLACEHOLDER
        open(root + "/zarr.json", "wb").write(seal_root(json.dumps(doc).encode()))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            tessera.load(root)
        except tessera.TesseraError as exc:
            code = exc.code
        else:
            code = "loaded"
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        print(code, grown)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    code, grown_mib = out.stdout.split()
    assert code in ("inconsistent", "limit_exceeded")
    assert int(grown_mib) < 32, f"decompressing the bomb took {grown_mib} MiB"


# -- array zarr.json against the manifest (R5.10) -------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(shape=[4, 7]), "shape"),
        (lambda d: d.update(shape=[5, 6]), "shape"),
        (lambda d: d.update(data_type="int32"), "data_type"),
        (lambda d: d.update(fill_value=0), "fill_value"),
        (lambda d: d.update(fill_value="Infinity"), "fill_value"),
        (lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[2, 6]), "chunk_grid"),
        (
            lambda d: d.update(
                codecs=[
                    {"name": "bytes", "configuration": {"endian": "little"}},
                    {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
                    {"name": "crc32c"},
                ]
            ),
            "codecs",
        ),
        (lambda d: d.update(dimension_names=["x", "y"]), "dimension_names"),
    ],
)
def test_array_zarr_json_disagrees_R5_10(good: Path, mutate: Any, field: str) -> None:
    edit_json(good / "w" / "zarr.json", mutate)
    _load_raises(good, tessera.InconsistentCheckpointError, field, "w/zarr.json")


def test_int_array_fill_false_is_not_zero_R5_9(good: Path) -> None:
    edit_json(good / "grp" / "v" / "zarr.json", lambda d: d.update(fill_value=False))
    _load_raises(good, tessera.InconsistentCheckpointError, "fill_value")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(chunk_key_encoding={"name": "default"}),
        lambda d: d.update(dimension_names=None),
        lambda d: d.update(storage_transformers=[]),
        lambda d: d.update(attributes={"user": {"any": [1, 2]}}),
        lambda d: d.pop("attributes"),
    ],
    ids=[
        "short-key-encoding",
        "dimension_names-null",
        "storage_transformers-empty",
        "user-attributes",
        "no-attributes",
    ],
)
def test_equivalent_array_spellings_accepted_R5_10(good: Path, mutate: Any) -> None:
    edit_json(good / "w" / "zarr.json", mutate)
    assert torch.equal(tessera.load(good)["w"], W)
    assert tessera.verify(good).ok


def test_member_order_and_whitespace_carry_no_meaning_R2_8(good: Path) -> None:
    for path in (good / "zarr.json", good / "w" / "zarr.json"):
        doc = read_json(path)
        reordered = {k: doc[k] for k in reversed(list(doc))}
        path.write_text(json.dumps(reordered, indent=3, sort_keys=True))
    reseal_root_file(good / "zarr.json")  # the digest covers the bytes, whitespace included (R3.20)
    assert_tree_bit_equal(tessera.load(good), _state())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(
            chunk_grid={"name": "rectilinear", "configuration": {"chunk_shapes": [[1] * 4, [6]]}}
        ),
        lambda d: d.update(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}),
        lambda d: d.update(chunk_key_encoding={"name": "default", "configuration": {"separator": "."}}),
        lambda d: d.update(zarr_format=2),
        lambda d: d.update(node_type="group"),
        lambda d: d.update(extra_member=1),
        lambda d: d.update(storage_transformers=[{"name": "sharding"}]),
        lambda d: d.pop("codecs"),
    ],
    ids=[
        "rectilinear-R5_1",
        "v2-keys",
        "dot-separator",
        "zarr2",
        "group",
        "extra-member",
        "transformer",
        "no-codecs",
    ],
)
def test_array_zarr_json_schema_R5_10(good: Path, mutate: Any) -> None:
    edit_json(good / "w" / "zarr.json", mutate)
    _load_raises(good, tessera.SchemaViolationError, "w/zarr.json")


def test_array_zarr_json_missing_R5_10(good: Path) -> None:
    (good / "w" / "zarr.json").unlink()
    _load_raises(good, tessera.InconsistentCheckpointError, "w/zarr.json", "missing")


def test_array_zarr_json_not_strict_json_R11_4(good: Path) -> None:
    path = good / "w" / "zarr.json"
    path.write_text(path.read_text().replace('"attributes":{}', '"attributes":{},"attributes":{}'))
    _load_raises(good, tessera.SchemaViolationError, "w/zarr.json")


# -- keys and paths in a crafted manifest (R3.11-R3.13, R11.2, R15.3) -----------------------


@pytest.mark.parametrize(
    ("key", "path", "cls"),
    [
        (["w"], "x", tessera.InconsistentCheckpointError),
        (["a.b"], "a%2Eb", tessera.InconsistentCheckpointError),
        ([".."], "%2E%2E", tessera.InconsistentCheckpointError),
        (["w"], "W", tessera.InconsistentCheckpointError),
        ([0], "~00", tessera.SchemaViolationError),
        (["..", "w"], "../w", tessera.SchemaViolationError),
        (["w"], "../w", tessera.SchemaViolationError),
        (["w"], "/w", tessera.SchemaViolationError),
        (["w"], "/tmp/w", tessera.SchemaViolationError),
        (["w"], "a\\w", tessera.SchemaViolationError),
        (["w"], "w/", tessera.SchemaViolationError),
        (["w"], "a//w", tessera.SchemaViolationError),
        (["w"], ".", tessera.SchemaViolationError),
        (["w"], "", tessera.SchemaViolationError),
        (["w"], "w\u0000", tessera.SchemaViolationError),
        (["a" * 300], "a" * 300, tessera.InvalidKeyError),
    ],
    ids=[
        "other-path",
        "escaped-safe",
        "dotdot-escape",
        "case",
        "int-leading-zero",
        "dotdot",
        "dotdot-key",
        "absolute",
        "absolute-tmp",
        "backslash",
        "trailing-slash",
        "empty-segment",
        "dot",
        "empty",
        "nul",
        "too-long",
    ],
)
def test_crafted_entry_paths_R3_11_R15_3(good: Path, key: list[Any], path: str, cls: type) -> None:
    edit_manifest(good, lambda m: m["entries"][0].update(key=key, path=path))
    message = _load_raises(good, cls)
    if cls is tessera.InconsistentCheckpointError:
        assert "manifest entry 0" in message and repr(path) in message and "does not match key" in message
    elif cls is tessera.SchemaViolationError:
        assert "$.attributes.tessera.entries[0].path" in message
    else:
        assert "255" in message


def test_path_escape_never_touches_outside_files(good: Path) -> None:
    """Whatever the crafted path, the reader asks its storage for no file outside the root."""
    outside = good.parent / "w"
    shutil.copytree(good / "w", outside)
    storage = RecordingStorage(LocalStorage(good))
    for path in ["../w", "%2E%2E/w", "..%2Fw"]:
        edit_manifest(good, lambda m, path=path: m["entries"][0].update(key=["..", "w"], path=path))
        with pytest.raises(tessera.TesseraError):
            tessera.load(storage)
    asked = [c.path for c in storage.calls if c.path]
    assert asked and all(".." not in p.split("/") for p in asked), asked
    assert all(os.path.realpath(good / p).startswith(str(good.resolve())) for p in asked), asked


def test_duplicate_entries_R3_12(good: Path) -> None:
    edit_manifest(good, lambda m: m["entries"].append(dict(m["entries"][0])))
    _load_raises(good, tessera.InconsistentCheckpointError, "'w'")


def test_value_and_container_at_once_R3_13(good: Path) -> None:
    edit_manifest(
        good,
        lambda m: m["entries"].append(
            {"kind": "value", "key": ["grp"], "path": "grp", "encoding": "json", "value": 1}
        ),
    )
    _load_raises(good, tessera.InconsistentCheckpointError, "grp")


def test_schema_check_precedes_entry_checks_R13_3(good: Path) -> None:
    def both(m: dict[str, Any]) -> None:
        m["entries"].append(dict(m["entries"][0]))  # a cross-entry fault (R3.12)
        m["entries"][1]["chunk_count"] = 99  # an entry fault (R3.17)
        m.pop("created")  # a schema fault

    edit_manifest(good, both)
    _load_raises(good, tessera.SchemaViolationError, "created")


def test_entry_checks_precede_cross_entry_checks_R13_3(good: Path) -> None:
    def both(m: dict[str, Any]) -> None:
        m["entries"].append(dict(m["entries"][0]))  # duplicate path: inconsistent (R3.12)
        m["entries"][3]["shape"] = [1, 3]  # an object of rank 2: schema_violation (R3.15)
        m["entries"][3]["chunk_shape"] = [1, 3]

    edit_manifest(good, both)
    _load_raises(good, tessera.SchemaViolationError, "1-d uint8")


# -- symbolic links (R11.3) -----------------------------------------------------------------


def test_array_directory_symlinked_outside_R11_3(good: Path) -> None:
    outside = good.parent / "elsewhere"
    shutil.copytree(good / "w", outside)
    shutil.rmtree(good / "w")
    (good / "w").symlink_to(outside, target_is_directory=True)
    _load_raises(good, tessera.InvalidKeyError, "outside")
    report = tessera.verify(good)
    assert "bad_key" in {p.code for p in report.problems}


def test_group_directory_symlinked_outside_R11_3(good: Path) -> None:
    outside = good.parent / "elsewhere"
    shutil.copytree(good / "grp", outside)
    shutil.rmtree(good / "grp")
    (good / "grp").symlink_to(outside, target_is_directory=True)
    with pytest.raises(tessera.InvalidKeyError):
        tessera.load(good, keys=["grp/v"])
    assert torch.equal(tessera.load(good, keys=["w"])["w"], W)


@pytest.mark.parametrize("target", ["w/c/1/0", "w/zarr.json", "zarr.json"])
def test_file_that_is_a_symlink_R11_3(good: Path, target: str) -> None:
    path = good / target
    copy = good.parent / "copy"
    shutil.copy(path, copy)
    path.unlink()
    path.symlink_to(copy)
    _load_raises(good, tessera.InvalidKeyError, "symbolic link")


def test_root_may_be_reached_through_a_symlink(good: Path) -> None:
    link = good.parent / "link"
    link.symlink_to(good, target_is_directory=True)
    assert_tree_bit_equal(tessera.load(link), _state())


# -- limits (R11.6-R11.8) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "chunk_shape", "dtype"),
    [
        ([10**18], [1], "float32"),  # 10^18 chunks
        ([10**20], [2**18], "float32"),  # 10^20 elements
        ([1] * 1000, [1] * 1000, "float32"),  # rank 1000
        ([2**34], [2**34], "float32"),  # one 64 GiB chunk
        ([2**62, 2**62], [2**31, 2**31], "float64"),  # products overflow int64
    ],
    ids=["1e18-chunks", "1e20-elements", "rank-1000", "64GiB-chunk", "overflow"],
)
def test_huge_arrays_refused_before_any_read_R11_6(
    good: Path, shape: list[int], chunk_shape: list[int], dtype: str
) -> None:
    import math

    count = math.prod(-(-s // c) for s, c in zip(shape, chunk_shape, strict=True))
    edit_manifest(
        good,
        lambda m: m["entries"][0].update(
            shape=shape, chunk_shape=chunk_shape, dtype=dtype, chunk_count=count
        ),
    )
    storage = RecordingStorage(LocalStorage(good))
    tracemalloc.start()
    try:
        with pytest.raises(tessera.LimitExceededError) as info:
            tessera.open(storage)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "limit_exceeded"
    assert "'w'" in str(info.value)
    assert [c.path for c in storage.ops("read_file", "read_into")] == ["zarr.json"]
    assert peak < 16 * 2**20


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        (ReaderLimits(max_rank=1), "rank 2"),
        (ReaderLimits(max_chunk_bytes=23), "24 bytes"),
        (ReaderLimits(max_chunks_per_array=3), "4 chunks"),
        (ReaderLimits(max_array_bytes=95), "96 bytes"),
    ],
)
def test_reader_limits_are_configurable_R11_6(good: Path, limits: ReaderLimits, fragment: str) -> None:
    with pytest.raises(tessera.LimitExceededError, match=fragment):
        tessera.open(good, limits=limits)


def test_limits_checked_before_chunk_count_R11_6(good: Path) -> None:
    edit_manifest(good, lambda m: m["entries"][0].update(shape=[10**18], chunk_shape=[1], chunk_count=1))
    _load_raises(good, tessera.LimitExceededError)


def test_hostile_array_zarr_json_cannot_bypass_limits_R11_8(good: Path) -> None:
    edit_json(good / "w" / "zarr.json", lambda d: d.update(shape=[10**18, 6]))
    _load_raises(good, tessera.InconsistentCheckpointError, "shape")


# -- pickle (R8.6, R8.7) --------------------------------------------------------------------


class Payload:
    """An object that is neither tensor, bytes nor JSON."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Payload) and other.value == self.value


class Evil:
    """Unpickling this creates a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


def test_arbitrary_object_needs_pickle_keys_R8_6(ckpt: Path) -> None:
    with pytest.raises(tessera.UnsafeEncodingError, match="pickle_keys") as info:
        tessera.save({"cfg": {"obj": Payload(1)}}, ckpt)
    assert info.value.code == "unsafe_encoding"
    assert "cfg/obj" in str(info.value)
    assert not ckpt.exists()


def test_pickle_round_trip_with_both_opt_ins_R8_7(ckpt: Path) -> None:
    state = {"cfg": {"obj": Payload(7), "set": {1, 2}}, "w": torch.ones(2)}
    tessera.save(state, ckpt, options=tessera.SaveOptions(pickle_keys=["cfg/obj", "cfg/set"]))
    entry = entry_of(ckpt, "cfg/obj")
    assert (entry["kind"], entry["encoding"], entry["dtype"]) == ("object", "pickle", "uint8")
    with pytest.raises(tessera.UnsafeEncodingError, match="cfg/obj") as info:
        tessera.load(ckpt)
    assert info.value.code == "unsafe_encoding"
    # Keys that are not pickled load without the opt-in.
    assert torch.equal(tessera.load(ckpt, keys=["w"])["w"], torch.ones(2))
    loaded = tessera.load(ckpt, allow_pickle=True)
    assert loaded["cfg"]["obj"] == Payload(7) and loaded["cfg"]["set"] == {1, 2}
    assert tessera.open(ckpt).value("cfg/obj", allow_pickle=True) == Payload(7)


def test_loading_without_opt_in_never_runs_code_R8_7(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    tessera.save({"evil": Evil(marker)}, ckpt, options=tessera.SaveOptions(pickle_keys=["evil"]))
    assert pickle.loads(pickle.dumps(Evil(tmp_path / "probe"))) is None and (tmp_path / "probe").exists()
    with pytest.raises(tessera.UnsafeEncodingError):
        tessera.load(ckpt)
    with pytest.raises(tessera.UnsafeEncodingError):
        tessera.open(ckpt).value("evil")
    with pytest.raises(tessera.UnsafeEncodingError):
        tessera.load(ckpt, {"evil": None}, strict="raise_all")
    assert tessera.verify(ckpt).ok
    assert not marker.exists()
    tessera.load(ckpt, allow_pickle=True)
    assert marker.exists()


def test_pickle_keys_must_name_stored_keys_R8_6(ckpt: Path) -> None:
    with pytest.raises(tessera.InvalidKeyError, match="nope") as info:
        tessera.save({"w": torch.ones(1)}, ckpt, options=tessera.SaveOptions(pickle_keys=["nope"]))
    assert info.value.code == "bad_key"
    assert not ckpt.exists()


def test_pickle_relabelled_as_bytes_is_returned_raw_R8_7(ckpt: Path, tmp_path: Path) -> None:
    """A pickle entry relabelled "bytes" comes back as its raw bytes: still never unpickled."""
    marker = tmp_path / "ran"
    tessera.save({"evil": Evil(marker)}, ckpt, options=tessera.SaveOptions(pickle_keys=["evil"]))
    edit_manifest(ckpt, lambda m: m["entries"][0].update(encoding="bytes"))
    raw = tessera.load(ckpt)["evil"]
    assert isinstance(raw, bytes) and raw.startswith(b"\x80")  # a pickle protocol header
    assert not marker.exists()


# -- never overwrite (R9.2, R9.6) -----------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_saving_over_a_committed_checkpoint_R9_6(good: Path) -> None:
    before = _snapshot(good)
    for state in ({"w": torch.zeros(1)}, _state(), {}):
        with pytest.raises(tessera.CheckpointExistsError) as info:
            tessera.save(state, good)
        assert info.value.code == "already_exists"
        assert "committed" in str(info.value)
    assert _snapshot(good) == before
    assert_tree_bit_equal(tessera.load(good), _state())
    assert tessera.verify(good).ok


def test_saving_into_a_non_empty_directory_R9_2(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(tessera.CheckpointExistsError, match="not empty"):
        tessera.save({"w": torch.ones(1)}, target)
    assert sorted(os.listdir(target)) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"


def test_saving_into_a_claimed_directory_R9_2(good: Path) -> None:
    (good / "zarr.json").unlink()  # an uncommitted save, maybe still running
    before = _snapshot(good)
    with pytest.raises(tessera.CheckpointExistsError, match="claimed"):
        tessera.save({"w": torch.ones(1)}, good)
    assert _snapshot(good) == before


def test_saving_into_an_empty_directory_is_fine_R9_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    tessera.save({"w": W}, tmp_path / "empty")
    assert torch.equal(tessera.load(tmp_path / "empty")["w"], W)


def test_bool_bytes_other_than_0_1(ckpt: Path) -> None:
    """R7.2: a reader MAY refuse a bool byte other than 00/01; if it loads, it must not crash."""
    tessera.save({"b": torch.tensor([True, False, True])}, ckpt)
    _write_chunk(ckpt / "b" / "c" / "0", b"\x01\x00\x02")
    try:
        value = tessera.load(ckpt)["b"]
    except tessera.InconsistentCheckpointError:
        return
    assert value.shape == (3,)


def test_every_error_class_has_its_spec_code_R13_1() -> None:
    from tessera.errors import ERROR_CLASSES

    assert set(ERROR_CLASSES) == {
        "not_found",
        "uncommitted",
        "unsupported_version",
        "schema_violation",
        "inconsistent",
        "limit_exceeded",
        "checksum_mismatch",
        "missing_chunk",
        "tensor_mismatch",
        "unsafe_encoding",
        "bad_key",
        "key_mismatch",
        "already_exists",
        "io_error",
        "bad_sharding",
        "collective_failed",
        "config_mismatch",
    }
    for code, cls in ERROR_CLASSES.items():
        assert cls.code == code and issubclass(cls, tessera.TesseraError)
        assert getattr(tessera, cls.__name__) is cls


def test_read_of_a_json_value_as_array(good: Path) -> None:
    with pytest.raises(tessera.TensorMismatchError, match="grp/n"):
        tessera.open(good).read("grp/n")
    assert np.asarray(tessera.open(good).read("blob")).tobytes() == b"abc"
    assert read_json(good / "blob" / "zarr.json")["data_type"] == "uint8"
