"""The recording and fault-injecting storages (tessera.testing) on real saves: the commit's call
order as the storage sees it (spec §9), and each fault a medium can produce, with what a save or
a load must make of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera.storage.base import CLAIM_FILE
from tessera.storage.local import LocalStorage
from tessera.testing import CHUNKS, FaultyStorage, RecordingStorage

from .conftest import assert_tree_bit_equal
from .memory_storage import Medium, MemoryStorage


def _state() -> dict[str, Any]:
    return {"w": torch.arange(40.0).reshape(8, 5), "b": torch.ones(3, dtype=torch.bfloat16), "step": 4}


def test_the_commit_order_as_the_storage_sees_it_R9_1_R9_8(tmp_path: Path) -> None:
    storage = RecordingStorage(LocalStorage(tmp_path / "ck"))
    tessera.save(_state(), storage, options=tessera.SaveOptions(chunk_bytes=40, threads=4))
    ops = [c.op for c in storage.calls if c.op in ("claim", "write_file", "sync", "publish_root")]
    assert ops[0] == "claim" and ops[-2:] == ["sync", "publish_root"]
    assert set(ops[1:-2]) == {"write_file"} and len(ops) > 8
    written = {c.path: c.data for c in storage.ops("write_file")}
    for path, data in written.items():
        assert (tmp_path / "ck" / str(path)).read_bytes() == data
    publish = storage.ops("publish_root")[0]
    assert publish.data == (tmp_path / "ck" / "zarr.json").read_bytes()


@pytest.mark.parametrize("torn", [False, True])
def test_a_failed_or_torn_chunk_write_leaves_nothing_R9_7(tmp_path: Path, torn: bool) -> None:
    root = tmp_path / "ck"
    storage = FaultyStorage(LocalStorage(root)).fail_write(nth=2, matching=CHUNKS, torn=torn)
    with pytest.raises(tessera.StorageError, match="injected fault"):
        tessera.save(_state(), storage, options=tessera.SaveOptions(chunk_bytes=40, threads=1))
    assert not root.exists()


def test_a_failed_claim_writes_nothing(tmp_path: Path) -> None:
    storage = RecordingStorage(FaultyStorage(LocalStorage(tmp_path / "ck")).fail_claim())
    with pytest.raises(tessera.StorageError, match="injected fault"):
        tessera.save(_state(), storage)
    assert [c.op for c in storage.calls if c.op != "list"] == ["claim"]
    assert not (tmp_path / "ck").exists()


def test_a_truncated_chunk_is_an_io_error_on_load_and_a_problem_for_verify(tmp_path: Path) -> None:
    tessera.save(_state(), tmp_path / "ck", options=tessera.SaveOptions(chunk_bytes=40))
    short = FaultyStorage(LocalStorage(tmp_path / "ck")).short_read("w/c/1/*")
    with pytest.raises(tessera.StorageError, match="truncated file") as info:
        tessera.load(short)
    assert info.value.code == "io_error" and "w/c/1/0" in str(info.value)
    report = tessera.verify(short)
    assert not report.ok and [p.code for p in report.problems] == ["io_error"]
    assert_tree_bit_equal(tessera.load(tmp_path / "ck"), _state())  # the files themselves are sound


@pytest.mark.filterwarnings("ignore:.*partial files could not be removed:tessera.TesseraWarning")
def test_a_power_cut_at_any_call_leaves_nothing_or_the_whole_checkpoint_R9_8() -> None:
    """A medium that loses what was not synced, cut after each of a save's calls in turn: the
    checkpoint is then absent, uncommitted, or complete; never committed with a hole."""
    outcomes = []
    for cut in range(40):
        medium = Medium()
        inner = MemoryStorage(medium, "mem://ck")
        try:
            cut_off = FaultyStorage(inner).lose_unsynced(power_cut_after=cut)
            tessera.save(_state(), cut_off, options=tessera.SaveOptions(chunk_bytes=40))
        except tessera.StorageError as exc:
            assert "power went off" in str(exc)
        try:
            loaded = tessera.load(MemoryStorage(medium, "mem://ck"))
        except (tessera.CheckpointNotFoundError, tessera.UncommittedCheckpointError):
            outcomes.append("uncommitted")
            continue
        assert_tree_bit_equal(loaded, _state())
        assert tessera.verify(MemoryStorage(medium, "mem://ck")).ok
        outcomes.append("committed")
    first = outcomes.index("committed")
    assert "uncommitted" in outcomes and set(outcomes[first:]) == {"committed"}, outcomes


def test_the_power_cut_loses_exactly_the_unsynced_files() -> None:
    medium = Medium()
    storage = FaultyStorage(MemoryStorage(medium, "mem://x")).lose_unsynced()
    storage.claim(b'{"save_id": "s"}')
    storage.write_file("a", [b"1"])
    storage.sync()
    storage.write_file("b", [b"2"])
    storage.power_cut()
    assert sorted(MemoryStorage(medium, "mem://x").list("")) == sorted([CLAIM_FILE, "a"])
    with pytest.raises(tessera.StorageError, match="power went off"):
        storage.write_file("c", [b"3"])
