"""Asynchronous save (``tessera.save_async``, tessera.AsyncSaver, ``RunDirectory.save_async``).

The background save is held at its claim, before the writer reads any data, by a gate that the test
opens; so a test that mutates the state after ``save`` returns, or checks what is still in flight,
cannot pass by the background having been quick.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import tessera
import tessera.api.save_async
import torch
import torch.distributed as dist
from tessera import AsyncSave, AsyncSaver, CheckpointExistsError, RunDirectory, ShardedObject, ShardedTensor
from tessera.state.dtensor import sharded_from_dtensor
from tessera.storage.base import Storage
from tessera.storage.local import LocalStorage
from tessera.testing import StorageWrapper

from .conftest import assert_bit_equal, assert_tree_bit_equal, random_tensor
from .ranks import run_ranks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


class Gate:
    """Holds every save into a storage it wrapped at its claim (before any data is read) until
    ``open`` is called."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._open = threading.Event()

    def wrap(self, location: Path) -> Storage:
        """``location`` as a storage whose claim (and its children's) waits for the gate."""
        return _Gated(LocalStorage(location), self)

    def hold(self) -> None:
        self.reached.set()
        if not self._open.wait(60):
            raise TimeoutError("the test never opened the gate")

    def open(self) -> None:
        self._open.set()


class _Gated(StorageWrapper):
    def __init__(self, inner: Storage, gate: Gate) -> None:
        super().__init__(inner)
        self.gate = gate

    def wrap(self, inner: Storage) -> StorageWrapper:
        return _Gated(inner, self.gate)

    def claim(self, doc: bytes) -> None:
        self.gate.hold()
        super().claim(doc)


@pytest.fixture
def gate() -> Iterator[Gate]:
    held = Gate()
    yield held
    held.open()  # never leave a background save held


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[dict[Any, Any]]:
    """Every snapshot that a background save hands the writer."""
    seen: list[dict[Any, Any]] = []
    real = tessera.api.save_async.save

    def spy(state_dict: dict[Any, Any], path: Any, **options: Any) -> Any:
        seen.append(state_dict)
        return real(state_dict, path, **options)

    monkeypatch.setattr(tessera.api.save_async, "save", spy)
    return seen


def _state() -> dict[str, Any]:
    """Every kind of leaf, in containers of every kind; the same bits at every call."""
    return {
        "model": {
            "w": random_tensor("float32", (16, 8), seed=1),
            "b": random_tensor("bfloat16", (8,), seed=2),
            "t": random_tensor("int64", (5, 2), seed=3).t(),  # not contiguous
        },
        "np": np.arange(12, dtype=">i4").reshape(3, 4),  # big-endian
        "rows": ShardedTensor(random_tensor("float16", (6,), seed=4), (6,), (0,)),
        "flat": ShardedTensor(
            random_tensor("float32", (6,), seed=5), (2, 3), (0, 0), flat_range=(0, 6), box_shape=(2, 3)
        ),
        "rng": ShardedObject(random_tensor("uint8", (4,), seed=6), (1,), (0,)),
        "layers": [random_tensor("float64", (3,), seed=7), {"scale": random_tensor("float32", (2,), seed=8)}],
        "cfg": {"lr": 0.1, "betas": [0.9, 0.99]},
        "ordered": OrderedDict(b=1, a=torch.zeros(1)),
        "mapping": MappingProxyType({"walked": 1}),  # not a dict: walked, where a dict is one JSON leaf
        "blob": bytearray(b"abc"),
        "step": 7,
    }


def _mutate(state: dict[str, Any]) -> None:
    """What training does to its state once ``save`` has returned."""
    for t in (state["model"]["w"], state["model"]["b"], state["layers"][0], state["layers"][1]["scale"]):
        t.add_(1)
    state["model"]["t"].zero_()
    state["np"][...] = -1
    state["rows"].local.fill_(3)
    state["flat"].local.fill_(3)
    state["rng"].value.fill_(9)
    state["cfg"]["betas"].append(1.0)
    state["blob"][0] = 0
    state["step"] = 8


def test_snapshot_is_the_state_at_the_call(tmp_path: Path, gate: Gate) -> None:
    state, metadata = _state(), {"tokens": [1, 2]}
    with AsyncSaver() as saver:
        handle = saver.save(state, gate.wrap(tmp_path / "async"), metadata=metadata)
        assert gate.reached.wait(10) and not handle.done()
        _mutate(state)
        metadata["tokens"].append(3)
        gate.open()
        manifest = handle.wait()
    synchronous = tessera.save(_state(), tmp_path / "sync", metadata={"tokens": [1, 2]})
    assert isinstance(synchronous, tessera.Manifest)
    assert manifest.entries == synchronous.entries and manifest.lists == synchronous.lists
    assert manifest.metadata == {"tokens": [1, 2]}
    assert_tree_bit_equal(tessera.load(tmp_path / "async"), tessera.load(tmp_path / "sync"))


def test_tessera_save_async_returns_a_handle(tmp_path: Path) -> None:
    state = {"w": torch.arange(10, dtype=torch.float32), "n": np.zeros(3, np.int16), "step": 1}
    handle = tessera.save_async(state, tmp_path / "ckpt", metadata={"a": 1})
    assert isinstance(handle, AsyncSave)
    assert handle.location == str(tmp_path / "ckpt")
    assert handle.staged_bytes == 40 + 6
    assert handle.blocked_seconds >= handle.waited_seconds >= 0
    manifest = handle.wait()
    assert handle.done() and handle.observed
    assert manifest.metadata == {"a": 1}
    assert_tree_bit_equal(tessera.load(tmp_path / "ckpt"), state)


def _pointer(x: Any) -> int:
    return int(x.data_ptr()) if isinstance(x, torch.Tensor) else int(x.__array_interface__["data"][0])


def test_buffers_are_reused_and_reallocated_when_a_shape_or_dtype_changes(
    tmp_path: Path, staged: list[dict[Any, Any]]
) -> None:
    def state(rows: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        return {"w": torch.full((rows, 4), float(rows), dtype=dtype), "n": np.arange(3.0) + rows}

    with AsyncSaver() as saver:
        for i, (rows, dtype) in enumerate(
            [(2, torch.float32), (3, torch.float32), (3, torch.float32), (3, torch.float64)]
        ):
            saver.save(state(rows, dtype), tmp_path / f"c{i}").wait()
    ptrs = [(_pointer(s["w"]), _pointer(s["n"])) for s in staged]
    assert ptrs[1][1] == ptrs[0][1] and ptrs[2] == ptrs[1]  # same key, shape and dtype: the same buffer
    assert ptrs[1][0] != ptrs[0][0] and ptrs[3][0] != ptrs[2][0]  # shape, then dtype changed: a new one
    assert staged[3]["w"].dtype == torch.float64
    for i, (rows, dtype) in enumerate(
        [(2, torch.float32), (3, torch.float32), (3, torch.float32), (3, torch.float64)]
    ):
        assert_tree_bit_equal(tessera.load(tmp_path / f"c{i}"), state(rows, dtype))


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def test_at_most_one_save_in_flight(tmp_path: Path, gate: Gate) -> None:
    with AsyncSaver() as saver:
        first = saver.save({"w": torch.ones(3)}, gate.wrap(tmp_path / "a"))
        assert gate.reached.wait(10)
        thread, second = _in_thread(lambda: saver.save({"w": torch.zeros(3)}, gate.wrap(tmp_path / "b")))
        thread.join(0.5)
        assert thread.is_alive() and not first.done()  # the second save waits for the first
        gate.open()
        thread.join(10)
        assert not thread.is_alive() and first.done()
        assert second[0].waited_seconds > 0.4
        second[0].wait()
    assert_tree_bit_equal(tessera.load(tmp_path / "b"), {"w": torch.zeros(3)})


def test_max_in_flight_two_uses_two_buffer_sets(
    tmp_path: Path, gate: Gate, staged: list[dict[Any, Any]]
) -> None:
    with AsyncSaver(max_in_flight=2) as saver:
        handles = [
            saver.save({"w": torch.full((3,), float(i))}, gate.wrap(tmp_path / f"c{i}")) for i in range(2)
        ]
        assert gate.reached.wait(10) and not any(h.done() for h in handles)
        thread, third = _in_thread(
            lambda: saver.save({"w": torch.full((3,), 2.0)}, gate.wrap(tmp_path / "c2"))
        )
        thread.join(0.5)
        assert thread.is_alive()
        gate.open()
        thread.join(10)
        third[0].wait()
    ptrs = [_pointer(s["w"]) for s in staged]
    assert ptrs[0] != ptrs[1] and ptrs[2] == ptrs[0]  # the third save took the first one's slot
    for i in range(3):
        assert_tree_bit_equal(tessera.load(tmp_path / f"c{i}"), {"w": torch.full((3,), float(i))})


@pytest.fixture
def committed(tmp_path: Path) -> Path:
    path = tmp_path / "committed"
    tessera.save({"w": torch.arange(4)}, path)
    return path


def test_failure_is_raised_by_wait_and_the_committed_checkpoint_stays(
    tmp_path: Path, committed: Path
) -> None:
    with AsyncSaver() as saver:
        handle = saver.save({"w": torch.zeros(2)}, committed)
        with pytest.raises(CheckpointExistsError):
            handle.wait()
        saver.save({"w": torch.zeros(2)}, tmp_path / "next").wait()  # seen: the next save does not raise it
    assert_tree_bit_equal(tessera.load(committed), {"w": torch.arange(4)})


def test_unwaited_failure_is_raised_by_the_next_save_once(tmp_path: Path, committed: Path) -> None:
    with AsyncSaver() as saver:
        failed = saver.save({"w": torch.zeros(2)}, committed)
        with pytest.raises(CheckpointExistsError) as info:
            saver.save({"w": torch.zeros(2)}, tmp_path / "next")
        assert not (tmp_path / "next").exists()  # the call that raised started nothing
        assert any(str(committed) in note for note in info.value.__notes__)
        saver.save({"w": torch.zeros(2)}, tmp_path / "next").wait()  # raised once only
    with pytest.raises(CheckpointExistsError):
        failed.wait()  # a handle's wait always gives its outcome
    assert_tree_bit_equal(tessera.load(committed), {"w": torch.arange(4)})


def test_close_waits_and_raises_an_unseen_failure(tmp_path: Path, committed: Path, gate: Gate) -> None:
    saver = AsyncSaver()
    handle = saver.save({"w": torch.ones(2)}, gate.wrap(tmp_path / "a"))
    assert gate.reached.wait(10)
    thread, _ = _in_thread(saver.close)
    thread.join(0.5)
    assert thread.is_alive()
    gate.open()
    thread.join(10)
    assert handle.done() and (tmp_path / "a" / "zarr.json").is_file()
    with pytest.raises(RuntimeError, match="closed"):
        saver.save({"w": torch.ones(2)}, tmp_path / "b")

    saver = AsyncSaver()
    saver.save({"w": torch.ones(2)}, committed)
    with pytest.raises(CheckpointExistsError):
        saver.close()
    saver.close()  # raised once


def test_errors_of_the_call_are_raised_at_once(tmp_path: Path) -> None:
    with AsyncSaver() as saver:
        with pytest.raises(TypeError, match="chunk_byte"):
            saver.save({"w": torch.ones(1)}, tmp_path / "a", chunk_byte=4)
        with pytest.raises(TypeError, match="process group"):
            saver.save({"w": torch.ones(1)}, tmp_path / "a", process_group=None)
        with pytest.raises(TypeError, match="a state dict must be a dict"):
            saver.save([torch.ones(1)], tmp_path / "a")  # type: ignore[arg-type]
        refused = saver.save({"o": object()}, tmp_path / "a")  # the writer refuses it, in the background
        with pytest.raises(tessera.UnsafeEncodingError):
            refused.wait()
    assert not (tmp_path / "a").exists()


def test_run_directory_moves_latest_after_the_commit(tmp_path: Path, gate: Gate) -> None:
    run = RunDirectory(tmp_path / "run", keep_last=1)
    run.save({"w": torch.zeros(2)}, 1)
    held = RunDirectory(gate.wrap(tmp_path / "run"), keep_last=1)  # the same run, saves held at the claim
    state = {"w": torch.ones(2)}
    handle = held.save_async(state, 2, metadata={"loss": 0.5})
    assert gate.reached.wait(10)
    state["w"].zero_()
    assert run.latest() == tmp_path / "run" / "step-00000001"
    gate.open()
    assert handle.wait().metadata == {"step": 2, "loss": 0.5}
    assert run.latest() == tmp_path / "run" / "step-00000002"
    assert [c.name for c in run.checkpoints()] == ["step-00000002"]  # retention, after the commit
    assert_tree_bit_equal(tessera.load(run.latest()), {"w": torch.ones(2)})

    run.save_async({"w": torch.ones(2)}, 2)  # already committed: fails in the background
    with pytest.raises(CheckpointExistsError):
        run.wait()
    run.wait()  # raised once
    assert run.latest() == tmp_path / "run" / "step-00000002"


# -- many ranks ----------------------------------------------------------------------------------


def _full(name: str) -> torch.Tensor:
    shapes = {"rows": ("float32", (4, 3)), "rep": ("int32", (5,)), "even": ("bfloat16", (4, 3))}
    shapes |= {"first_only": ("float32", (1, 4)), "strided": ("int32", (6, 2))}
    dtype, shape = shapes[name]
    return random_tensor(dtype, shape, seed=len(name))


def _held_save(saver: AsyncSaver, state: dict[str, Any], path: Path, then: Callable[[], None]) -> None:
    """Save, run ``then`` while the coordinator's background save is held at its claim, then finish."""
    gate = Gate()
    handle = saver.save(state, gate.wrap(path))
    then()
    gate.open()
    handle.wait()


def _async_rank(rank: int, world_size: int, root: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    rows = _full("rows").chunk(world_size)[rank].clone()
    state = {
        "rows": ShardedTensor.from_rank_offsets(rows, (0, rank, world_size)),
        "rep": _full("rep").clone(),
        "rng": ShardedObject(torch.tensor([rank], dtype=torch.uint8), (world_size,), (rank,)),
    }

    def train() -> None:
        rows.add_(100)
        state["rep"].zero_()
        # The training's group is free while the save is held: the save has a group of its own.
        total = torch.ones(1)
        dist.all_reduce(total)
        assert total.item() == world_size

    mesh = init_device_mesh("cpu", (world_size,))
    dtensors = {
        "even": distribute_tensor(_full("even"), mesh, [Shard(0)]),
        "first_only": distribute_tensor(_full("first_only"), mesh, [Shard(0)]),  # rank 1 holds none
        "replicated": distribute_tensor(_full("rep"), mesh, [Replicate()]),
    }
    try:
        # Two boxes on each rank (split factors that match no shard order); redistribute lays it out.
        dtensors["strided"] = distribute_tensor(_full("strided"), mesh, [Replicate()]).redistribute(
            mesh, [_StridedShard(0, split_factor=2)]
        )
    except ValueError as exc:  # some torch versions (2.11) cannot build it; the other cases still run
        assert "shard_order" in str(exc), exc
    else:
        assert len(sharded_from_dtensor(dtensors["strided"])) == 2
    with AsyncSaver() as saver:
        _held_save(saver, state, root / "sharded", train)
        _held_save(
            saver, dtensors, root / "dtensors", lambda: [t.to_local().zero_() for t in dtensors.values()]
        )
        # Rank 1's next save fails before it starts, so the ranks' next background saves are not the
        # same save: both fail, and nothing is committed.
        ok = {"w": torch.ones(2)}
        if rank == 0:
            saver.save(ok, root / "skewed")
            with pytest.raises(tessera.CollectiveError, match="same order"):
                saver.save(ok, root / "skewed-2")  # raises the failure of the save before it
        else:
            with pytest.raises(TypeError, match="a state dict must be a dict"):
                saver.save([], root / "skewed")  # type: ignore[arg-type]
            with pytest.raises(tessera.CollectiveError, match="same order"):
                saver.save(ok, root / "skewed-2").wait()


def test_ranks_save_asynchronously_on_their_own_group(tmp_path: Path) -> None:
    run_ranks(2, _async_rank, tmp_path)
    ck = tessera.open(tmp_path / "sharded")
    assert_bit_equal(ck.read("rows"), _full("rows"))
    assert_bit_equal(ck.read("rep"), _full("rep"))
    assert [ck.read(f"rng/~{r}").tolist() for r in range(2)] == [[0], [1]]
    ck = tessera.open(tmp_path / "dtensors")
    for name in ("even", "first_only", "strided"):
        if name in ck:
            assert_bit_equal(ck.read(name), _full(name))
    assert_bit_equal(ck.read("replicated"), _full("rep"))
    assert not (tmp_path / "skewed" / "zarr.json").exists()
    assert not (tmp_path / "skewed-2" / "zarr.json").exists()


# -- GPU -------------------------------------------------------------------------------------------


@needs_cuda
def test_gpu_tensors_are_staged_in_pinned_buffers(
    tmp_path: Path, gate: Gate, staged: list[dict[Any, Any]]
) -> None:
    source = random_tensor("bfloat16", (1024, 1024), seed=1).cuda()
    want = source.cpu()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with AsyncSaver() as saver:
        with torch.cuda.stream(side):
            handle = saver.save({"w": source}, gate.wrap(tmp_path / "a"))
            source.add_(1)  # queued on the stream that the copy was issued on, after it
        gate.open()
        handle.wait()
        torch.cuda.current_stream().wait_stream(side)
        saver.save({"w": source}, tmp_path / "b").wait()
    assert staged[0]["w"].is_pinned() and staged[0]["w"].device.type == "cpu"
    assert _pointer(staged[0]["w"]) == _pointer(staged[1]["w"])
    assert_bit_equal(tessera.load(tmp_path / "a")["w"], want)


def _cuda_dtensor_rank(rank: int, world_size: int, root: Path) -> None:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    torch.cuda.set_device(rank)
    nccl = dist.new_group(backend="nccl")
    mesh = DeviceMesh.from_group(nccl, "cuda")
    local = _full("rows").chunk(world_size)[rank].cuda()
    weight = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    with AsyncSaver(process_group=nccl) as saver:
        handle = saver.save({"rows": weight}, root / "dtensor")
        local.add_(1)
        total = torch.ones(1, device="cuda")
        dist.all_reduce(total, group=nccl)  # the training's NCCL group, while the save runs on gloo
        handle.wait()
    assert total.item() == world_size


@needs_cuda
@pytest.mark.parametrize("world_size", [1, 2])
def test_gpu_dtensors_save_asynchronously(tmp_path: Path, world_size: int) -> None:
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    run_ranks(world_size, _cuda_dtensor_rank, tmp_path)
    assert_bit_equal(tessera.open(tmp_path / "dtensor").read("rows"), _full("rows"))
