"""``tessera.verify`` (R11.9): every document and every chunk checked, every problem reported."""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from pathlib import Path

import pytest
import tessera
import torch

from .conftest import edit_json, edit_manifest, flip_byte, write_chunk_file


@pytest.fixture
def good(ckpt: Path) -> Path:
    """a: float32 [6, 4] in chunks [1, 4] (c/0/0..c/5/0); g/b: int64 [10] in chunks [2];
    g/h/c: bf16 0-d; z: zero-size; v: a JSON value."""
    state = {
        "a": torch.arange(24.0).reshape(6, 4),
        "g": {"b": torch.arange(10), "h": {"c": torch.tensor(1.5, dtype=torch.bfloat16)}},
        "z": torch.empty(0, 3),
        "v": {"k": [1, 2]},
    }
    tessera.save(state, ckpt, options=tessera.SaveOptions(chunk_bytes=16))
    return ckpt


def test_good_checkpoint_R11_9(good: Path) -> None:
    report = tessera.verify(good)
    assert report.ok
    assert report.problems == []
    assert report.arrays == 4
    assert report.chunks == 6 + 5 + 1 + 0
    assert report.nbytes == 24 * 4 + 10 * 8 + 2 + 0
    assert report.location == str(good.absolute())


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_every_problem_is_reported_at_once_R11_9(ckpt: Path, compression: str | None) -> None:
    state = {"a": torch.arange(24.0).reshape(6, 4), "g": {"b": torch.arange(10)}}
    tessera.save(
        state,
        ckpt,
        options=tessera.SaveOptions(compression=tessera.Zstd() if compression else None, chunk_bytes=16),
    )
    flip_byte(ckpt / "a" / "c" / "1" / "0", 2)
    flip_byte(ckpt / "a" / "c" / "4" / "0", -1 % (ckpt / "a" / "c" / "4" / "0").stat().st_size)
    flip_byte(ckpt / "g" / "b" / "c" / "3", 0)
    (ckpt / "a" / "c" / "2" / "0").unlink()
    (ckpt / "g" / "b" / "c" / "0").unlink()
    (ckpt / "a" / "c" / "9").mkdir()
    (ckpt / "a" / "c" / "9" / "0").write_bytes(b"stale")
    (ckpt / "g" / "b" / "c" / "5").write_bytes(b"foreign")
    (ckpt / "g" / "zarr.json").unlink()
    edit_json(ckpt / ".tessera-claim.json", lambda d: d.update(save_id=str(uuid.uuid4())))

    report = tessera.verify(ckpt)
    assert not report.ok
    codes = Counter(p.code for p in report.problems)
    assert codes == {"checksum_mismatch": 3, "missing_chunk": 2, "inconsistent": 4}, report.problems
    text = "\n".join(p.message for p in report.problems)
    for fragment in [
        "a chunk c/1/0",
        "a chunk c/4/0",
        "g/b chunk c/3",
        "a chunk c/2/0",
        "g/b chunk c/0",
        "c/9/0",
        "c/5",
        "g/zarr.json",
        "two writers",
    ]:
        assert fragment in text, fragment


def test_problems_come_in_manifest_and_chunk_order_on_every_run_R11_9(ckpt: Path) -> None:
    """Chunks are checked on many threads; the report lists their problems in one order (the README
    shows `tessera verify` output), not in the order the threads finished."""
    state = {"a": torch.arange(256.0).reshape(64, 4), "b": torch.arange(64.0).reshape(16, 4)}
    tessera.save(state, ckpt, options=tessera.SaveOptions(chunk_bytes=16))
    damaged = [("a", r) for r in range(0, 64, 3)] + [("b", r) for r in (2, 7, 11)]
    for name, row in damaged:
        flip_byte(ckpt / name / "c" / str(row) / "0", 1)
    expected = [f"{name} chunk c/{row}/0 " for name, row in damaged]
    for _ in range(3):
        messages = [p.message for p in tessera.verify(ckpt, threads=8).problems]
        assert [m[: len(e)] for m, e in zip(messages, expected, strict=True)] == expected


def test_array_metadata_problem_skips_its_chunks_R11_9(good: Path) -> None:
    edit_json(good / "a" / "zarr.json", lambda d: d.update(shape=[6, 5]))
    flip_byte(good / "g" / "b" / "c" / "0", 0)
    report = tessera.verify(good)
    assert sorted(p.code for p in report.problems) == ["checksum_mismatch", "inconsistent"]
    assert report.chunks == 5 + 1  # a's chunks are not counted: its metadata is wrong
    assert any("a/zarr.json" in p.message and "shape" in p.message for p in report.problems)


def test_missing_array_zarr_json_R5_10(good: Path) -> None:
    (good / "g" / "b" / "zarr.json").unlink()
    report = tessera.verify(good)
    assert [p.code for p in report.problems] == ["inconsistent"]
    assert "g/b/zarr.json is missing" in report.problems[0].message


def test_invalid_group_document_R2_7(good: Path) -> None:
    (good / "g" / "h" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array"}))
    report = tessera.verify(good)
    assert [p.code for p in report.problems] == ["schema_violation"]
    assert "g/h/zarr.json" in report.problems[0].message
    assert tessera.load(good)["g"]["h"]["c"].item() == 1.5  # loading does not need groups (R2.7)


@pytest.mark.parametrize(
    "claim",
    [{"format": "tessera"}, {"format": "tessera", "save_id": "x", "created": "now", "writer": {}}],
    ids=["missing-fields", "bad-fields"],
)
def test_invalid_claim_R11_9(good: Path, claim: dict) -> None:
    (good / ".tessera-claim.json").write_text(json.dumps(claim))
    report = tessera.verify(good)
    assert [p.code for p in report.problems] == ["schema_violation"]
    assert ".tessera-claim.json" in report.problems[0].message


def test_claim_is_optional_R9_12(good: Path) -> None:
    """Copies may drop dot-files: no claim is not a problem."""
    (good / ".tessera-claim.json").unlink()
    assert tessera.verify(good).ok
    assert tessera.load(good)["v"] == {"k": [1, 2]}


def test_ignores_what_it_does_not_name_R2_6(good: Path) -> None:
    (good / ".DS_Store").write_bytes(b"junk")
    (good / "zarr.json.0123.tmp").write_text("{")
    (good / "README").write_text("hi")
    (good / "v").mkdir()  # a value entry has no node: a directory there means nothing
    assert tessera.verify(good).ok


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        (lambda p: (p / "zarr.json").unlink(), "uncommitted"),
        (lambda p: shutil.rmtree(p), "not_found"),
        (lambda p: (p / "zarr.json").write_text("{"), "schema_violation"),
        (lambda p: edit_manifest(p, lambda m: m.update(format_version="2.0")), "unsupported_version"),
        (lambda p: edit_manifest(p, lambda m: m["entries"].append(m["entries"][0])), "inconsistent"),
        (
            lambda p: edit_manifest(
                p, lambda m: m["entries"][0].update(shape=[10**18, 4], chunk_count=4 * 10**18)
            ),
            "limit_exceeded",
        ),
    ],
    ids=["uncommitted", "not-found", "bad-json", "major-2", "duplicate", "huge"],
)
def test_unreadable_manifest_is_one_problem(good: Path, damage: object, code: str) -> None:
    damage(good)  # type: ignore[operator]
    report = tessera.verify(good)
    assert [p.code for p in report.problems] == [code]
    assert not report.ok and report.arrays == 0


def test_verify_never_raises_for_a_symlinked_array(good: Path) -> None:
    outside = good.parent / "elsewhere"
    shutil.copytree(good / "a", outside)
    shutil.rmtree(good / "a")
    (good / "a").symlink_to(outside, target_is_directory=True)
    report = tessera.verify(good)
    assert "bad_key" in {p.code for p in report.problems}


def test_verify_reads_every_chunk(good: Path) -> None:
    from tessera.storage.local import LocalStorage
    from tessera.testing import RecordingStorage

    storage = RecordingStorage(LocalStorage(good))
    assert tessera.verify(storage, threads=1).ok
    chunks = {
        c.path for c in storage.ops("read_file", "read_into") if c.path and not c.path.endswith(".json")
    }
    assert chunks == {f"a/c/{i}/0" for i in range(6)} | {f"g/b/c/{i}" for i in range(5)} | {"g/h/c/c"}


def test_lost_chunk_is_one_problem_not_two_R11_9(good: Path) -> None:
    """The directory a lost chunk leaves behind (c/2/) is not an extra chunk file."""
    (good / "a" / "c" / "2" / "0").unlink()
    report = tessera.verify(good)
    assert [p.code for p in report.problems] == ["missing_chunk"], report.problems


def test_chunk_of_a_zero_size_array_is_extra_R5_6(good: Path) -> None:
    (good / "z" / "c" / "0").mkdir(parents=True)
    (good / "z" / "c" / "0" / "0").write_bytes(b"\x00" * 16)
    report = tessera.verify(good)
    assert [p.code for p in report.problems] == ["inconsistent"]
    assert "c/0/0" in report.problems[0].message


@pytest.mark.parametrize(
    "doc",
    [
        {"zarr_format": 3, "node_type": "group", "attributes": {"x": 1}},
        {"zarr_format": 3, "node_type": "group"},
        {"zarr_format": 3, "node_type": "group", "attributes": {}, "extra": True},
    ],
    ids=["attributes", "no-attributes", "extra-member"],
)
def test_group_document_of_other_content_is_inconsistent_R2_7(good: Path, doc: dict[str, object]) -> None:
    """A schema-valid group document that is not exactly R2.4's content (issue 15)."""
    (good / "g" / "zarr.json").write_text(json.dumps(doc))
    report = tessera.verify(good)
    assert [p.code for p in report.problems] == ["inconsistent"], report.problems
    assert "g/zarr.json" in report.problems[0].message


def test_group_document_member_order_and_whitespace_are_free_R2_8(good: Path) -> None:
    (good / "g" / "zarr.json").write_text('{ "attributes": {},\n "node_type": "group", "zarr_format": 3 }')
    assert tessera.verify(good).ok


@pytest.mark.parametrize(
    "change",
    [
        {"created": "2001-01-01T00:00:00.000000Z"},
        {"writer": {"name": "someone-else", "version": "9"}},
    ],
    ids=["created", "writer"],
)
def test_claim_differing_from_manifest_is_inconsistent_R9_12(good: Path, change: dict[str, object]) -> None:
    """The claim's ``created`` and ``writer`` must be the manifest's, as its ``save_id`` is (issue 15)."""
    edit_json(good / ".tessera-claim.json", lambda d: d.update(change))
    report = tessera.verify(good)
    assert [p.code for p in report.problems] == ["inconsistent"], report.problems
    assert next(iter(change)) in report.problems[0].message


def test_bool_byte_other_than_0_1_is_inconsistent_even_with_a_valid_crc_R7_2(ckpt: Path) -> None:
    """A bool chunk holding the byte 2 under a correct CRC, listed in the manifest's chunk list:
    ``inconsistent`` (issue 15)."""
    tessera.save({"mask": torch.tensor([True, False, True])}, ckpt)
    chunk = ckpt / "mask" / "c" / "0"
    body = bytearray(chunk.read_bytes()[:-4])
    body[1] = 2
    write_chunk_file(chunk, bytes(body))
    report = tessera.verify(ckpt)
    assert [p.code for p in report.problems] == ["inconsistent"], report.problems
    assert "mask chunk c/0" in report.problems[0].message and "byte 2" in report.problems[0].message
