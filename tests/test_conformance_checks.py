"""The conformance harness's writer checks (``conformance/checks``): silent on sound checkpoints, and
each one names its rule on a checkpoint broken the way it looks for (PROTOCOL.md P21).

Sound checkpoints come from ``tessera.save`` (one process, and two gloo ranks); broken ones are
copies with one fault each. The commit-order watch is also fed by a small hand-written writer
that copies a sound checkpoint file by file in a chosen order.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch
from tessera.format.digest import reseal_root
from tessera.format.dtypes import dtype_of_torch
from tessera.state import ShardedTensor

from conformance.checks import commit_order
from conformance.checks.commit_order import WriteWatch
from conformance.checks.expected import (
    ExpectedCheckpoint,
    ExpectedObject,
    ExpectedTensor,
    ExpectedValue,
    Key,
)
from conformance.checks.written import check_written
from conformance.generator.damage import write_chunk
from conformance.protocol.arrays import storage_dtype

from .ranks import run_ranks

needs_inotify = pytest.mark.skipif(not commit_order.inotify.available(), reason="needs inotify (Linux)")

CHUNKS = {"model/w": (2, 3), "model/bf": (4,)}


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(5, 7, generator=g),  # chunks of [2, 3]: edge chunks overhang in both dimensions
            "bf": torch.randn(9, generator=g).to(torch.bfloat16),
            "layers": [{"b": torch.tensor([True, False, True])}, {"b": torch.tensor([False, True, True])}],
        },
        "c": torch.randn(3, 2, dtype=torch.complex64, generator=g),
        "s": torch.tensor(2.5),
        "z": torch.zeros(0, 4),
        "rng": b"\x01\x02\x03",
        "step": 100,
        "scale": math.inf,
        "n": np.arange(6, dtype=np.int16),
    }


def _tensor(
    key: Key, value: torch.Tensor | np.ndarray, chunk_shape: tuple[int, ...] | None = None
) -> ExpectedTensor:
    t = torch.as_tensor(value).contiguous()
    name = dtype_of_torch(t.dtype, str(key)).name
    bits = t.reshape(-1).view(torch.uint8).numpy().view(storage_dtype(name)).reshape(tuple(t.shape))
    return ExpectedTensor(key, name, bits, chunk_shape)


def _expected(state: dict[str, Any], compression: dict[str, Any] | None = None) -> ExpectedCheckpoint:
    model = state["model"]
    return ExpectedCheckpoint(
        entries=(
            _tensor(("model", "w"), model["w"], CHUNKS["model/w"]),
            _tensor(("model", "bf"), model["bf"], CHUNKS["model/bf"]),
            _tensor(("model", "layers", 0, "b"), model["layers"][0]["b"]),
            _tensor(("model", "layers", 1, "b"), model["layers"][1]["b"]),
            _tensor(("c",), state["c"]),
            _tensor(("s",), state["s"]),
            _tensor(("z",), state["z"]),
            ExpectedObject(("rng",), state["rng"]),
            ExpectedValue(("step",), "json", 100),
            ExpectedValue(("scale",), "float", "Infinity"),
            _tensor(("n",), state["n"]),
        ),
        lists=(("model", "layers"),),
        metadata={"step": 100},
        compression=compression,
    )


def _reported(watch: WriteWatch) -> list[Any]:
    """What a watch found, and what it noted where it had inotify (without, it notes that it had not)."""
    return [*watch.findings(), *(watch.notes if commit_order.inotify.available() else [])]


def _save(root: Path, compression: str | None = None) -> list[Any]:
    """Save the state at ``root`` under a watch; what the watch reported."""
    with WriteWatch(root) as watch:
        tessera.save(
            _state(),
            root,
            options=tessera.SaveOptions(
                compression=tessera.Zstd() if compression else None, chunk_shapes=CHUNKS
            ),
            metadata={"step": 100},
        )
    return _reported(watch)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("good") / "ckpt"
    root.mkdir()  # as the harness does before most writes
    assert _save(root) == []
    return root


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Path:
    """A fresh copy of the sound checkpoint, to break."""
    return Path(shutil.copytree(good, tmp_path / "ckpt", symlinks=True))


def _rules(root: Path, expected: ExpectedCheckpoint | None = None) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for finding in check_written(root, expected or _expected(_state())):
        found.setdefault(finding.rule, []).append(finding.message)
    return found


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Edit a document; a root document is sealed again (R3.20), so that only the edit is wrong."""
    doc = json.loads(path.read_bytes())
    path.write_bytes(reseal_root(json.dumps(edit(doc) or doc).encode()))


def _manifest(root: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    _edit_json(root / "zarr.json", lambda doc: edit(doc["attributes"]["tessera"]))


def _rewrite_chunk(path: Path, edit: Callable[[bytearray], None]) -> None:
    """Change a chunk's bytes ``Z`` and store a matching CRC, listed in the chunk list (R3.19), so
    that only the change is wrong."""
    body = bytearray(path.read_bytes()[:-4])
    edit(body)
    write_chunk(path, bytes(body))


# -- sound checkpoints ---------------------------------------------------------------------------


def test_sound_checkpoint_has_no_findings(good: Path) -> None:
    assert check_written(good, _expected(_state())) == []


def test_sound_compressed_checkpoint_has_no_findings(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"  # not made beforehand: the watch sees the root appear
    assert _save(root, "zstd") == []
    assert check_written(root, _expected(_state(), {"name": "zstd", "level": 3})) == []


def _rank_state(rank: int) -> dict[str, Any]:
    whole = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "w": ShardedTensor(whole[2 * rank : 2 * rank + 2].clone(), (4, 6), (2 * rank, 0)),
        "b": torch.tensor([1.5, -0.0, math.nan]),
        "rng": b"\x07" * 5,
        "step": 7,
    }


def _save_rank(rank: int, world_size: int, root: Path) -> None:
    tessera.save(_rank_state(rank), root, metadata={"run": 1})


def test_sound_checkpoint_of_two_ranks_has_no_findings(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    with WriteWatch(root) as watch:
        run_ranks(2, _save_rank, root)
    assert _reported(watch) == []
    expected = ExpectedCheckpoint(
        entries=(
            _tensor(("w",), torch.arange(24, dtype=torch.float32).reshape(4, 6)),
            _tensor(("b",), _rank_state(0)["b"]),
            ExpectedObject(("rng",), b"\x07" * 5),
            ExpectedValue(("step",), "json", 7),
        ),
        lists=(),
        metadata={"run": 1},
        world_size=2,
    )
    assert check_written(root, expected) == []
    assert "R16.8" in _rules(root, ExpectedCheckpoint(expected.entries, (), {"run": 1}, world_size=3))


# -- one fault each ------------------------------------------------------------------------------


def _flip(root: Path) -> None:
    path = root / "model/w/c/0/0"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x10
    path.write_bytes(bytes(data))


def _reorder(manifest: dict[str, Any]) -> None:
    manifest["entries"][0], manifest["entries"][1] = manifest["entries"][1], manifest["entries"][0]


def _overhang(body: bytearray) -> None:
    body[12:16] = bytes(4)  # chunk c/2/0 of a [5, 7] array in [2, 3] chunks: its second row lies outside


def _values(root: Path) -> None:
    """Chunk bytes that decode and pass their CRC, but are not the case's data."""
    _rewrite_chunk(root / "model/w/c/0/0", lambda body: body.__setitem__(slice(0, 4), struct.pack("<f", 9.0)))


def _swap_chunks(root: Path) -> None:
    """Two valid chunks of one array exchanged: each intact, neither where the chunk list says."""
    a, b = root / "model/w/c/0/0", root / "model/w/c/0/1"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def _stale_digest(root: Path) -> None:
    """The root rewritten (members spaced out) without its digest recomputed."""
    path = root / "zarr.json"
    path.write_text(json.dumps(json.loads(path.read_bytes()), indent=1))


MUTATIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "chunks swapped": (_swap_chunks, "R3.19", "model/w/c/0/0 stores CRC-32C"),
    "stale manifest digest": (_stale_digest, "R3.20", "manifest_digest is sha256:"),
    "flipped chunk byte": (_flip, "R6.4", "model/w/c/0/0"),
    "deleted chunk": (lambda r: (r / "model/w/c/1/2").unlink(), "R5.7", "c/1/2"),
    "extra file": (lambda r: (r / "model/notes.txt").write_text("hi"), "R2.5", "model/notes.txt"),
    "empty directory": (lambda r: (r / "staging/rank1").mkdir(parents=True), "R2.5", "staging/rank1"),
    "leftover tmp": (lambda r: (r / f"zarr.json.{'0' * 8}.tmp").write_text("{}"), "R2.5", "temporary root"),
    "symlink": (lambda r: (r / "model/link").symlink_to(r / "rng/c/0"), "R2.5", "symbolic link"),
    "chunk outside the grid": (lambda r: (r / "model/w/c/0/3").write_bytes(b"x"), "R2.5", "model/w/c/0/3"),
    "wrong group document": (
        lambda r: _edit_json(r / "model/zarr.json", lambda d: d["attributes"].update(a=1)),
        "R2.4",
        "model/zarr.json",
    ),
    "group document at a value": (
        lambda r: shutil.copytree(r / "model/layers/~0", r / "step", ignore=lambda d, n: ["b"]),
        "R2.4",
        "step/zarr.json",
    ),
    "array zarr.json with an extra member": (
        lambda r: _edit_json(r / "model/bf/zarr.json", lambda d: d.update(dimension_names=None)),
        "R5.8",
        "dimension_names",
    ),
    "array zarr.json missing": (lambda r: (r / "n/zarr.json").unlink(), "R2.3", "n/zarr.json"),
    "wrong fill value": (
        lambda r: _edit_json(r / "model/w/zarr.json", lambda d: d.update(fill_value=0)),
        "R5.9",
        "fill_value",
    ),
    "entries reordered": (lambda r: _manifest(r, _reorder), "R3.9", "model/bf"),
    "world_size wrong": (lambda r: _manifest(r, lambda m: m["provenance"].update(world_size=2)), "R3.5", "2"),
    "integer written as a float": (
        lambda r: _manifest(r, lambda m: m["provenance"].update(world_size=1.0)),
        "R3.7",
        "world_size",
    ),
    "array shape written as floats": (
        lambda r: _edit_json(r / "n/zarr.json", lambda d: d.update(shape=[6.0])),
        "R3.7",
        "shape [6.0]",
    ),
    "root zarr_format written as a float": (
        lambda r: (r / "zarr.json").write_bytes((r / "zarr.json").read_bytes().replace(b":3,", b":3.0,", 1)),
        "R3.7",
        "zarr_format 3.0",
    ),
    "claim missing": (lambda r: (r / ".tessera-claim.json").unlink(), "R9.1", "missing"),
    "metadata changed": (lambda r: _manifest(r, lambda m: m["metadata"].update(step=101)), "R3.6", "101"),
    "lists lacks a list": (lambda r: _manifest(r, lambda m: m["lists"].clear()), "R3.8", "model/layers"),
    "value changed": (lambda r: _manifest(r, lambda m: m["entries"][8].update(value=99)), "R8.1", "99"),
    "not a v4 save id": (
        lambda r: _manifest(r, lambda m: m.update(save_id=m["save_id"][:14] + "1" + m["save_id"][15:])),
        "R3.3",
        "version 4",
    ),
    "extra root member": (lambda r: _edit_json(r / "zarr.json", lambda d: d.update(x=1)), "R3.1", "'x'"),
    "claim of another save": (
        lambda r: _edit_json(
            r / ".tessera-claim.json", lambda d: d.update(save_id="0" * 8 + d["save_id"][8:])
        ),
        "R9.12",
        "save_id",
    ),
    "overhang not fill": (lambda r: _rewrite_chunk(r / "model/w/c/2/0", _overhang), "R5.4", "00 00 c0 7f"),
    "bool byte 2": (
        lambda r: _rewrite_chunk(r / "model/layers/~0/b/c/0", lambda b: b.__setitem__(0, 2)),
        "R7.2",
        "neither 00 nor 01",
    ),
    "chunk of the wrong size": (
        lambda r: _rewrite_chunk(r / "n/c/0", lambda b: b.extend(b"\0\0")),
        "R6.5",
        "is 18 bytes",
    ),
    "chunk of another value": (_values, "R2.3", "the reference reader reads model/w"),
    "root missing": (lambda r: (r / "zarr.json").unlink(), "R2.2", "never committed"),
    "byte-order mark": (
        lambda r: (r / "model/zarr.json").write_bytes(b"\xef\xbb\xbf" + (r / "model/zarr.json").read_bytes()),
        "R2.8",
        "byte-order mark",
    ),
    "root not strict JSON": (
        lambda r: (r / "zarr.json").write_text('{"a": 1, "a": 2}'),
        "R11.4",
        "duplicate",
    ),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_fault_is_found_with_its_rule(copy: Path, name: str) -> None:
    mutate, rule, seen = MUTATIONS[name]
    mutate(copy)
    found = _rules(copy)
    assert rule in found, found
    assert any(seen in message for message in found[rule]), found[rule]


def test_stock_readers_see_chunks_that_are_not_the_data(copy: Path) -> None:
    _values(copy)
    messages = _rules(copy)["R2.1"]
    assert any(m.startswith("zarr-python reads model/w with 1 of 35") for m in messages), messages
    assert any(m.startswith("tensorstore reads model/w with 1 of 35") for m in messages), messages


def test_one_fault_gives_one_finding(copy: Path) -> None:
    """A corrupt chunk is reported by the byte check only, not again by each of the three readers."""
    _flip(copy)
    assert [f.rule for f in check_written(copy, _expected(_state()))] == ["R6.4"]


def test_zstd_chunk_of_two_frames_R6_3(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    tessera.save(_state(), root, options=tessera.SaveOptions(compression=tessera.Zstd(), chunk_shapes=CHUNKS))
    _rewrite_chunk(root / "model/w/c/0/0", lambda body: body.extend(bytes(body)))
    found = _rules(root, _expected(_state(), {"name": "zstd", "level": 3}))
    assert any("after its first zstd frame" in m for m in found["R6.3"]), found


def test_compression_not_asked_for_P12(good: Path) -> None:
    found = _rules(good, _expected(_state(), {"name": "zstd", "level": 3}))
    assert set(found) == {"P12"} and len(found["P12"]) == 9, found


def test_findings_are_bounded_per_rule(copy: Path) -> None:
    for n in range(30):
        (copy / f"junk{n}").write_text("x")
    messages = _rules(copy)["R2.5"]
    assert len(messages) == 21 and messages[-1] == "... and 10 more findings of this rule"


# -- the commit order ----------------------------------------------------------------------------


def _replay(src: Path, dst: Path, order: Callable[[list[str]], list[str]], pause: float = 0.0) -> None:
    """Write ``src``'s files into ``dst`` in ``order`` as a writer does: each created exclusively,
    written and fsynced; the root through a temporary file, linked, then unlinked (R9.10)."""
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    save_id = json.loads((src / "zarr.json").read_bytes())["attributes"]["tessera"]["save_id"]
    for rel in order(files):
        name = f"zarr.json.{save_id}.tmp" if rel == "zarr.json" else rel
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dst / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, (src / rel).read_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        if rel == "zarr.json":
            os.link(dst / name, dst / rel)
            os.unlink(dst / name)
            time.sleep(pause)


def _claim_first(files: list[str]) -> list[str]:
    rest = [f for f in files if f not in (".tessera-claim.json", "zarr.json")]
    return [".tessera-claim.json", *rest, "zarr.json"]


def _watched(root: Path, write: Callable[[Path], None]) -> dict[str, list[str]]:
    with WriteWatch(root) as watch:
        write(root)
    found: dict[str, list[str]] = {}
    for finding in watch.findings():
        found.setdefault(finding.rule, []).append(finding.message)
    return found


@needs_inotify
@pytest.mark.parametrize("made", [True, False], ids=["root made before", "root made by the writer"])
def test_a_sound_order_has_no_findings(good: Path, tmp_path: Path, made: bool) -> None:
    root = tmp_path / "ckpt"
    if made:
        root.mkdir()
    assert _watched(root, lambda r: _replay(good, r, _claim_first)) == {}


@needs_inotify
def test_root_published_before_the_data_R9_9(good: Path, tmp_path: Path) -> None:
    def root_first(files: list[str]) -> list[str]:
        order = _claim_first(files)
        return [order[0], order[-1], *order[1:-1]]

    found = _watched(tmp_path, lambda r: _replay(good, r, root_first))
    assert set(found) == {"R9.9"}, found
    assert re.fullmatch(
        r"the root zarr.json appeared at event \d+, before c was created at event \d+: .*", found["R9.9"][0]
    )


@needs_inotify
def test_claim_after_the_data_R9_1(good: Path, tmp_path: Path) -> None:
    def claim_late(files: list[str]) -> list[str]:
        order = _claim_first(files)
        return [*order[1:-1], order[0], order[-1]]

    found = _watched(tmp_path, lambda r: _replay(good, r, claim_late))
    assert set(found) == {"R9.1"}, found


@needs_inotify
def test_root_copied_first_R9_1_R9_9_R9_10(good: Path, tmp_path: Path) -> None:
    """A writer that copies a finished checkpoint with its root first breaks every commit rule."""

    def copy_root_first(root: Path) -> None:
        shutil.copy(good / "zarr.json", root / "zarr.json")
        shutil.copytree(
            good, root, dirs_exist_ok=True, ignore=lambda d, names: ["zarr.json"] if d == str(good) else []
        )

    found = _watched(tmp_path, copy_root_first)
    assert {"R9.1", "R9.9", "R9.10"} <= set(found), found
    assert any("written in place" in m for m in found["R9.10"])


@needs_inotify
def test_changes_after_the_commit_R9_6_R9_9(good: Path, tmp_path: Path) -> None:
    def change_after(root: Path) -> None:
        _replay(good, root, _claim_first)
        (root / ".tessera-claim.json").unlink()
        (root / "late").write_text("x")

    found = _watched(tmp_path, change_after)
    assert set(found) == {"R9.6", "R9.9"}, found
    assert ".tessera-claim.json was deleted" in found["R9.6"][0]
    assert "before late was closed after writing" in found["R9.9"][0]


@needs_inotify
def test_transient_and_replaced_files_R2_5_R9_5(good: Path, tmp_path: Path) -> None:
    # Made before the watch, so that it is watched from the start: a directory made during the
    # write may be filled before its watch is added, and what is in it then has no events.
    (tmp_path / "model").mkdir()

    def staged(root: Path) -> None:
        shutil.copy(good / ".tessera-claim.json", root)
        (root / "model/zarr.json").write_text("{}")
        shutil.copy(good / "model/zarr.json", root / "model/zarr.json.partial")
        os.rename(root / "model/zarr.json.partial", root / "model/zarr.json")

    found = _watched(tmp_path, staged)
    assert set(found) == {"R2.5", "R9.5"}, found
    assert "model/zarr.json.partial was moved away" in found["R2.5"][0]
    assert "model/zarr.json was replaced by a rename" in found["R9.5"][0]


def test_without_inotify_times_are_compared(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commit_order.inotify, "available", lambda: False)

    def root_first(files: list[str]) -> list[str]:
        order = _claim_first(files)
        return [order[0], order[-1], *order[1:-1]]

    (tmp_path / "a").mkdir()
    with WriteWatch(tmp_path / "a") as sound:
        _replay(good, tmp_path / "a", _claim_first)
    assert sound.findings() == [] and "modification times" in sound.notes[0]
    with WriteWatch(tmp_path / "b") as late:
        _replay(good, tmp_path / "b", root_first, pause=0.05)  # a tick of the file system's clock
    assert {f.rule for f in late.findings()} == {"R9.9"}
