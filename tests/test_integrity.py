"""Format 1.1: chunks bound to their place (R3.19, R6.6) and a checked manifest (R3.20, R3.21).

A valid chunk in another chunk's place and a one-bit change of a JSON value in the root
``zarr.json`` loaded silently under 1.0; under 1.1 both are refused by ``load`` and ``open``
and reported by ``verify``, while 1.0 checkpoints stay readable and stock Zarr readers see
nothing new (tests/test_interop.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera.format.digest import PLACEHOLDER

from .conftest import (
    assert_chunk_lists_are_stored_crcs,
    assert_tree_bit_equal,
    edit_manifest,
    read_json,
    reseal_root_file,
    write_json,
)


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(4, 6),  # chunks [2, 3]: four of 24 bytes each
        "v": torch.arange(12, dtype=torch.int32),  # chunks [4]: each read in place into its destination
        "opt": {"step": torch.tensor(3.0), "m": torch.randn(5).to(torch.bfloat16)},
        "empty": torch.zeros(0, 3),
        "blob": b"\x01\x02\x03",
        "lr": 0.5,
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    tessera.save(
        _state(),
        root,
        options=tessera.SaveOptions(chunk_shapes={"w": [2, 3], "v": [4]}),
        metadata={"step": 100},
    )
    return root


def _swap(root: Path, a: str, b: str, array: str = "w") -> None:
    first, second = root / array / "c" / a, root / array / "c" / b
    data_a, data_b = first.read_bytes(), second.read_bytes()
    first.write_bytes(data_b)
    second.write_bytes(data_a)


def _codes(root: Path) -> set[str]:
    return {p.code for p in tessera.verify(root).problems}


def test_writer_lists_the_stored_crc_of_every_chunk_R3_19(tmp_path: Path) -> None:
    """One process, raw and zstd: the chunk list is the CRC at the end of each chunk file, in C order
    (the 0-d array's one chunk, and "" for an array of no chunks, included)."""
    for compression in (None, "zstd"):
        root = tmp_path / f"ck-{compression}"
        tessera.save(
            _state(),
            root,
            options=tessera.SaveOptions(
                compression=tessera.Zstd() if compression else None, chunk_shapes={"w": [2, 3], "v": [4]}
            ),
        )
        assert assert_chunk_lists_are_stored_crcs(root) == 4 + 3 + 1 + 1 + 1
        entries = {e["path"]: e for e in read_json(root / "zarr.json")["attributes"]["tessera"]["entries"]}
        assert entries["empty"]["chunk_crc32c"] == ""
        assert "chunk_crc32c" not in entries["lr"]


def test_root_carries_its_digest_R3_20_R12_5(ckpt: Path) -> None:
    data = (ckpt / "zarr.json").read_bytes()
    manifest = json.loads(data)["attributes"]["tessera"]
    assert manifest["format_version"] == "1.2" and manifest["must_understand"] == []
    value = manifest["manifest_digest"]
    assert data.count(f'"{value}"'.encode()) == 1
    import hashlib

    at = data.index(value.encode()) + len("sha256:")
    assert "sha256:" + hashlib.sha256(data[:at] + b"0" * 64 + data[at + 64 :]).hexdigest() == value


def test_swapped_chunks_are_refused_R6_6(ckpt: Path) -> None:
    """Two same-size valid chunks swapped: each passes its own CRC, not the chunk list."""
    _swap(ckpt, "0/0", "0/1")
    with pytest.raises(tessera.ChecksumMismatchError, match=r"w chunk c/0/[01] .*other data"):
        tessera.load(ckpt)
    ck = tessera.open(ckpt)
    with pytest.raises(tessera.ChecksumMismatchError):
        ck.read("w", (slice(0, 2), slice(2, 4)))  # a region that reads both swapped chunks
    with pytest.raises(tessera.ChecksumMismatchError):
        ck.read("w", (slice(0, 1), slice(3, 6)))  # one of them
    # A region that never reads them still works (R14.2), and so does every other key (R14.1).
    assert torch.equal(ck.read("w", (slice(2, 4),)), _state()["w"][2:4])
    assert_tree_bit_equal(ck.values(["opt/m", "blob", "lr"]), [_state()["opt"]["m"], b"\x01\x02\x03", 0.5])
    report = tessera.verify(ckpt)
    assert [p.code for p in report.problems] == ["checksum_mismatch"] * 2


def test_swapped_chunks_read_in_place_are_refused_R6_6(ckpt: Path) -> None:
    """Whole chunks of a 1-d array stream straight into the destination; the listed CRC is
    compared there too."""
    _swap(ckpt, "0", "2", array="v")
    # Either swapped chunk may be the first the read threads find.
    with pytest.raises(tessera.ChecksumMismatchError, match=r"v chunk c/[02] .*other data"):
        tessera.open(ckpt).read("v")
    assert torch.equal(tessera.open(ckpt).read("v", (slice(4, 8),)), torch.arange(4, 8, dtype=torch.int32))


def test_chunk_copied_over_another_is_refused_R6_6(ckpt: Path) -> None:
    (ckpt / "w" / "c" / "1" / "1").write_bytes((ckpt / "w" / "c" / "0" / "0").read_bytes())
    with pytest.raises(tessera.ChecksumMismatchError):
        tessera.load(ckpt)
    assert _codes(ckpt) == {"checksum_mismatch"}


def test_one_bit_in_a_json_value_of_the_root_is_refused_R3_21(ckpt: Path) -> None:
    """metadata step 100 -> 101 is one flipped bit ('0' 0x30 -> '1' 0x31): still strict,
    schema-valid JSON, caught only by the digest."""
    root = ckpt / "zarr.json"
    data = bytearray(root.read_bytes())
    at = data.index(b'"step":100') + len(b'"step":10')
    data[at] ^= 0x01
    root.write_bytes(bytes(data))
    for read in (tessera.load, tessera.open):
        with pytest.raises(tessera.ChecksumMismatchError, match="manifest_digest"):
            read(ckpt)
    assert _codes(ckpt) == {"checksum_mismatch"}


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        # The member's name flipped: a 1.1 manifest without its digest (R3.20).
        (b'"manifest_digest"', b'"manifest_digesu"', tessera.SchemaViolationError),
        # "1.2" -> "1.0": the digest is still there, and still checked (R3.21).
        (b'"format_version":"1.2"', b'"format_version":"1.0"', tessera.ChecksumMismatchError),
        # The digest's own digits changed.
        (b'"sha256:', b'"sha256:0', tessera.SchemaViolationError),
    ],
)
def test_flips_around_the_digest_R3_20_R3_21(ckpt: Path, old: bytes, new: bytes, error: type) -> None:
    root = ckpt / "zarr.json"
    root.write_bytes(root.read_bytes().replace(old, new, 1))
    with pytest.raises(error):
        tessera.open(ckpt)


def test_digest_must_occur_once_R3_21(ckpt: Path) -> None:
    """A copy of the digest string elsewhere (user metadata) makes it ambiguous: refused."""
    doc = read_json(ckpt / "zarr.json")
    manifest = doc["attributes"]["tessera"]
    manifest["metadata"]["copy"] = manifest["manifest_digest"]
    write_json(ckpt / "zarr.json", doc, seal=False)
    with pytest.raises(tessera.ChecksumMismatchError, match="occurs 2 times"):
        tessera.open(ckpt)


def test_writer_copes_with_the_placeholder_in_user_data_R3_20(tmp_path: Path) -> None:
    """The digest member precedes the caller's data, so a placeholder-like string there is harmless."""
    tessera.save({"x": torch.ones(2)}, tmp_path / "ck", metadata={"note": PLACEHOLDER})
    assert tessera.open(tmp_path / "ck").metadata["note"] == PLACEHOLDER


def test_chunk_list_of_wrong_length_or_form_R3_19(ckpt: Path) -> None:
    def entry_w(m: dict[str, Any]) -> dict[str, Any]:
        return next(e for e in m["entries"] if e["path"] == "w")

    edit_manifest(ckpt, lambda m: entry_w(m).update(chunk_crc32c=entry_w(m)["chunk_crc32c"][:-1]))
    with pytest.raises(tessera.InconsistentCheckpointError, match="31 hex digits; 4 chunks need 32"):
        tessera.open(ckpt)
    edit_manifest(ckpt, lambda m: entry_w(m).update(chunk_crc32c="G" * 32))
    with pytest.raises(tessera.SchemaViolationError):
        tessera.open(ckpt)
    edit_manifest(ckpt, lambda m: entry_w(m).update(chunk_crc32c="0" * 31 + "\n"))
    with pytest.raises(tessera.SchemaViolationError):
        tessera.open(ckpt)
    edit_manifest(ckpt, lambda m: entry_w(m).pop("chunk_crc32c"))
    with pytest.raises(tessera.SchemaViolationError, match="chunk_crc32c"):
        tessera.open(ckpt)


def _as_1_0(manifest: dict[str, Any]) -> None:
    manifest["format_version"] = "1.0"
    del manifest["manifest_digest"]
    for entry in manifest["entries"]:
        entry.pop("chunk_crc32c", None)


def test_format_1_0_checkpoints_stay_readable_R12_3(ckpt: Path) -> None:
    edit_manifest(ckpt, _as_1_0)
    assert tessera.open(ckpt).manifest.format_version == "1.0"
    assert_tree_bit_equal(tessera.load(ckpt), _state())
    assert tessera.verify(ckpt).ok
    # 1.0 cannot see a chunk in another's place: the reason 1.1 lists the CRCs.
    _swap(ckpt, "0/0", "0/1")
    assert not torch.equal(tessera.load(ckpt)["w"], _state()["w"])


def test_chunk_list_in_a_1_0_manifest_is_used_R3_19(ckpt: Path) -> None:
    """A chunk list is checked wherever it is present, whatever the minor version."""
    edit_manifest(ckpt, lambda m: (m.update(format_version="1.0"), m.pop("manifest_digest")))
    _swap(ckpt, "0/0", "0/1")
    with pytest.raises(tessera.ChecksumMismatchError):
        tessera.load(ckpt)


def test_every_single_bit_flip_of_the_root_is_refused_or_harmless_R3_21(ckpt: Path) -> None:
    """One bit of each byte of the root document (a different bit per byte): each flip is refused
    with a TesseraError, or the checkpoint loads equal to the original."""
    root = ckpt / "zarr.json"
    good = root.read_bytes()
    want = _state()
    loaded = 0
    for at in range(len(good)):
        data = bytearray(good)
        data[at] ^= 1 << (at % 8)
        root.write_bytes(bytes(data))
        try:
            got = tessera.load(ckpt)
        except tessera.TesseraError:
            continue
        assert_tree_bit_equal(got, want)
        loaded += 1
    root.write_bytes(good)
    assert loaded == 0, "every byte of a 1.1 root is covered by its digest"


def test_reseal_helper_is_exact(ckpt: Path) -> None:
    """The tests' re-sealing (a tamperer who recomputes the digest) gives back the writer's bytes."""
    good = (ckpt / "zarr.json").read_bytes()
    reseal_root_file(ckpt / "zarr.json")
    assert (ckpt / "zarr.json").read_bytes() == good
