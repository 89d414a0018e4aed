"""``tessera.dcp``: PyTorch DCP's ``dcp.save``/``dcp.async_save``/``dcp.load`` through Tessera.

The must-show: an FSDP2 model and AdamW on 4 real gloo ranks, its ``get_state_dict`` saved
with ``TesseraStorageWriter`` (and, for comparison, DCP's own ``FileSystemWriter``), loaded
with ``TesseraStorageReader`` at 2 ranks and at 1: bit-exact, and the next optimizer step
identical to the run loaded from DCP's own files. The checkpoint is a standard Tessera one:
``tessera.verify`` passes, tensorstore reads it bit-exact, and no file holds a pickle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch
import torch.distributed.checkpoint as dcp
from tessera.dcp import TesseraLoadPlanner, TesseraStorageReader, TesseraStorageWriter
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from tests.conftest import assert_bit_equal
from tests.fsdp_training import fsdp_model, gathered, train_step
from tests.memory_storage import Medium, MemoryStorage
from tests.ranks import run_ranks

# dcp.save/dcp.load with no_dist warn that they run in one process, which these tests mean
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
SAVED = 4
PICKLE_HEADERS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def _save(rank: int, world: int, root: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = fsdp_model(world, seed=0)
    for n in range(2):
        train_step(model, optimizer, rank, world, n)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd, "step": 2}
    dcp.save(state, storage_writer=TesseraStorageWriter(f"{root}/tessera"))
    dcp.save(state, storage_writer=FileSystemWriter(f"{root}/dcp"))
    dcp.async_save(state, storage_writer=TesseraStorageWriter(f"{root}/async")).result()
    return {"saved": gathered(model, optimizer)}


def _load(rank: int, world: int, path: str, reader: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = fsdp_model(world, seed=1)  # other weights, an optimizer that never stepped
    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optim": osd, "step": 0}
    storage_reader = TesseraStorageReader(path) if reader == "tessera" else FileSystemReader(path)
    dcp.load(state, storage_reader=storage_reader)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert state["step"] == 2
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    loaded = gathered(model, optimizer)
    train_step(model, optimizer, rank, world, 2)
    return {"loaded": loaded, "next": gathered(model, optimizer)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("dcp")
    results = run_ranks(SAVED, _save, str(root))
    return root, results[0]["saved"]


@pytest.mark.parametrize("world", [2, 1])
def test_fsdp2_state_saved_at_4_ranks_loads_bit_exact_and_steps_like_dcp(
    saved: tuple[Path, dict[str, torch.Tensor]], world: int
) -> None:
    root, want = saved
    ours = run_ranks(world, _load, str(root / "tessera"), "tessera")[0]
    theirs = run_ranks(world, _load, str(root / "dcp"), "dcp")[0]
    assert set(ours["loaded"]) == set(want)
    for name, tensor in want.items():
        assert_bit_equal(ours["loaded"][name], tensor)
    for name, tensor in theirs["next"].items():
        assert_bit_equal(ours["next"][name], tensor)


def test_dcp_checkpoint_is_a_standard_tessera_checkpoint(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, want = saved
    for name in ("tessera", "async"):
        assert tessera.verify(root / name).problems == []
    stored = tessera.load(root / "tessera")
    assert stored["step"] == 2
    assert stored["optim"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert_bit_equal(stored["model"]["0.weight"], want["0.weight"])
    assert_bit_equal(stored["optim"]["state"]["2.bias"]["exp_avg_sq"], want["2.bias/exp_avg_sq"])
    background = tessera.load(root / "async")
    for key in ("0.weight", "2.bias"):
        assert_bit_equal(background["model"][key], stored["model"][key])


def test_tensorstore_reads_the_dcp_checkpoint_bit_exact(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    ts = pytest.importorskip("tensorstore")
    root, want = saved
    for key, name in (("model/0.weight", "0.weight"), ("optim/state/0.weight/exp_avg", "0.weight/exp_avg")):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / "tessera" / key)}}
        got = np.asarray(ts.open(spec, read=True).result().read().result())
        assert_bit_equal(got, want[name].detach().numpy())


def test_no_file_of_the_checkpoint_holds_a_pickle(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, _ = saved
    files = [p for name in ("tessera", "async") for p in (root / name).rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        head = path.read_bytes()[:4]
        assert not head.startswith(PICKLE_HEADERS) and not head.startswith(b"PK"), path
    # the control: DCP's own writer does pickle (its .metadata file, torch.save'd values)
    assert any(p.read_bytes()[:2] in PICKLE_HEADERS for p in (root / "dcp").iterdir())


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(5, 7),
        "nested": {"b": torch.arange(6, dtype=torch.int16)},
        "step": 3,
        "lr": [0.1, 0.2],
    }


def _empty() -> dict[str, Any]:
    return {
        "w": torch.zeros(5, 7),
        "nested": {"b": torch.zeros(6, dtype=torch.int16)},
        "step": 0,
        "lr": [0.0, 0.0],
    }


@pytest.mark.parametrize("planner", [TesseraLoadPlanner, None], ids=["tessera-planner", "default-planner"])
def test_dcp_loads_a_tessera_save_without_a_process_group(tmp_path: Path, planner: Any) -> None:
    want = _state()
    tessera.save(want, tmp_path / "ckpt", options=tessera.SaveOptions(chunk_bytes=64))
    got = _empty()
    dcp.load(
        got,
        storage_reader=TesseraStorageReader(tmp_path / "ckpt"),
        planner=planner and planner(),
        no_dist=True,
    )
    assert_bit_equal(got["w"], want["w"])
    assert_bit_equal(got["nested"]["b"], want["nested"]["b"])
    assert got["step"] == 3 and got["lr"] == [0.1, 0.2]


def test_dcp_save_without_a_process_group_writes_what_tessera_save_writes(tmp_path: Path) -> None:
    state = _state()
    writer = TesseraStorageWriter(tmp_path / "replaced")  # dcp.save's checkpoint_id names the location
    dcp.save(state, checkpoint_id=tmp_path / "dcp", storage_writer=writer, no_dist=True)
    assert not (tmp_path / "replaced").exists()
    tessera.save(state, tmp_path / "tessera")
    ours, theirs = tessera.open(tmp_path / "dcp").manifest, tessera.open(tmp_path / "tessera").manifest
    assert ours.entries == theirs.entries and ours.lists == theirs.lists
    for path in (p for p in (tmp_path / "tessera").rglob("*") if p.is_file() and "c" in p.parts):
        assert (tmp_path / "dcp" / path.relative_to(tmp_path / "tessera")).read_bytes() == path.read_bytes()


def test_a_value_that_is_not_json_is_an_error_naming_its_key(tmp_path: Path) -> None:
    state = {"w": torch.ones(2), "config": {"when": object()}}
    with pytest.raises(CheckpointException) as caught:
        dcp.save(state, storage_writer=TesseraStorageWriter(tmp_path / "ckpt"), no_dist=True)
    error = caught.value.failures[0][0]  # DCP keeps (exception, traceback) per rank
    assert isinstance(error, tessera.TesseraError) and "config" in str(error) and "when" in str(error)
    assert not (tmp_path / "ckpt" / "zarr.json").exists()


def test_tessera_inspect_still_reports_a_dcp_directory_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tessera.cli.main import main

    dcp.save(_state(), storage_writer=FileSystemWriter(tmp_path / "ckpt"), no_dist=True)
    assert main(["inspect", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera: error[") and "\n" not in err.strip()
    assert "not a committed Tessera checkpoint" in err


class _CountingStorage(MemoryStorage):
    """An in-memory storage that records which chunk files are read."""

    def __init__(self, medium: Medium, location: str) -> None:
        super().__init__(medium, location)
        self.chunks_read: list[str] = []

    def read_into(self, path: str, offset: int, fill: Any) -> None:
        if "/c/" in path:
            self.chunks_read.append(path)
        super().read_into(path, offset, fill)

    def read_file(self, path: str, max_bytes: int) -> bytes:
        if "/c/" in path:
            self.chunks_read.append(path)
        return super().read_file(path, max_bytes)


def test_a_shard_reads_only_the_chunks_it_overlaps() -> None:
    """DCP sees each array's chunk grid as its chunks and plans one read per overlapping chunk;
    the reader fetches those chunks and no other (a Storage object as the location)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    medium = Medium()
    want = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)
    options = tessera.SaveOptions(chunk_shapes={"w": (2, 16)})
    tessera.save({"w": want, "note": "x"}, _CountingStorage(medium, "mem/ckpt"), options=options)
    storage = _CountingStorage(medium, "mem/ckpt")
    reader = TesseraStorageReader(storage)
    metadata = reader.read_metadata()
    stored = metadata.state_dict_metadata["w"]
    assert [tuple(c.offsets) for c in stored.chunks] == [(0, 0), (2, 0), (4, 0), (6, 0)]
    assert all(tuple(c.sizes) == (2, 16) for c in stored.chunks)
    shard = torch.full((3, 16), float("nan"))  # rows 3..5: parts of two chunks
    planner = TesseraLoadPlanner()
    planner.set_up_planner({"w": shard}, metadata, True)
    reader.set_up_storage_reader(metadata, True)
    items = create_read_items_for_chunk_list(
        "w", stored, [ChunkStorageMetadata(torch.Size((3, 0)), torch.Size((3, 16)))]
    )
    # the shard is a plain tensor standing for rows 3..5 (a DTensor's local part would carry them)
    items = [dataclasses.replace(item, dest_index=MetadataIndex("w")) for item in items]
    reader.read_data(LoadPlan(items), planner).wait()
    assert_bit_equal(shard, want[3:6])
    assert sorted(storage.chunks_read) == ["w/c/1/0", "w/c/2/0"]


def test_the_tessera_planners_never_pickle(tmp_path: Path) -> None:
    """With Tessera's writer and reader they change nothing; with DCP's own, whose non-tensor
    values are pickles, they refuse naming the key instead of pickling or unpickling."""
    from tessera.dcp import TesseraSavePlanner

    dcp.save(
        _state(),
        storage_writer=TesseraStorageWriter(tmp_path / "t"),
        planner=TesseraSavePlanner(),
        no_dist=True,
    )
    assert tessera.load(tmp_path / "t")["lr"] == [0.1, 0.2]
    with pytest.raises(CheckpointException) as caught:
        dcp.save(
            _state(),
            storage_writer=FileSystemWriter(tmp_path / "fs"),
            planner=TesseraSavePlanner(),
            no_dist=True,
        )
    error = caught.value.failures[0][0]
    assert isinstance(error, tessera.UnsafeEncodingError) and error.args[0].startswith("step: ")
    dcp.save(_state(), storage_writer=FileSystemWriter(tmp_path / "fs"), no_dist=True)
    with pytest.raises(CheckpointException) as caught:
        dcp.load(
            _empty(),
            storage_reader=FileSystemReader(tmp_path / "fs"),
            planner=TesseraLoadPlanner(),
            no_dist=True,
        )
    error = caught.value.failures[0][0]
    assert isinstance(error, tessera.UnsafeEncodingError) and "TesseraLoadPlanner does not unpickle" in str(
        error
    )
