"""The load path: one open per file, checksums fused with the reads, metadata checked in parallel,
GPU destinations fed through a pool of pinned staging buffers (the GPU tests skip without CUDA)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tessera
import tessera.engine.read_strategies
import tessera.storage.local
import torch
from tessera.engine.array_checks import ArrayChecks
from tessera.engine.chunk_reads import ChunkFiles
from tessera.engine.device_copies import DeviceCopies
from tessera.engine.read_strategies import ChunkRead, StagedInPlace
from tessera.engine.read_targets import ReadTarget
from tessera.engine.staging import StagingPool
from tessera.storage.base import FileMissingError
from tessera.storage.local import LocalStorage
from tessera.testing import RecordingStorage, StorageWrapper

from .conftest import (
    assert_bit_equal,
    edit_json,
    flip_byte,
    forced_chunks,
    random_tensor,
    recorded,
    recording,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _state() -> dict[str, Any]:
    """Arrays of several chunks (with an edge chunk), a one-chunk array, a scalar, a JSON value."""
    return {
        "w": random_tensor("bfloat16", (37, 16), seed=1),  # 8 rows a chunk: 5 chunks, the last short
        "m": {"a": random_tensor("float32", (9, 5), seed=2), "b": random_tensor("int64", (3,), seed=3)},
        "s": torch.tensor(2.5),
        "step": 7,
    }


def _blank(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _blank(v) for k, v in tree.items()}
    return torch.full_like(tree, 0) if isinstance(tree, torch.Tensor) else tree


@pytest.fixture(params=[None, "zstd"], ids=["raw", "zstd"])
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    state = _state()
    with forced_chunks(lambda shape: tuple(min(8, s) for s in shape[:1]) + tuple(shape[1:])):
        tessera.save(
            state,
            tmp_path / "ck",
            options=tessera.SaveOptions(compression=tessera.Zstd() if request.param else None),
        )
    return tmp_path / "ck", state


def _opens(storage: RecordingStorage, start: int = 0) -> Counter[str]:
    """The files the storage was asked to open (each size, read_file and read_into opens one
    once, by the storage contract), as full paths, from call number ``start`` on."""
    opened = ("size", "read_file", "read_into")
    return Counter(f"{storage.location}/{c.path}" for c in storage.calls[start:] if c.op in opened)


def _data_files(root: Path) -> list[str]:
    """Every file a load reads past the root: each array's zarr.json and chunks."""
    arrays = [p.parent for p in root.rglob("zarr.json") if (p.parent / "c").exists()]
    files = [f for a in arrays for f in [a / "zarr.json", a / "c", *(a / "c").rglob("*")]]
    return sorted(str(f) for f in files if f.is_file())  # a 0-d array's one chunk is c itself


# -- one open per file ------------------------------------------------------------------------


def test_each_file_is_opened_once_per_load(saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    storage = recorded(root)
    ck = tessera.open(storage)
    start = len(storage.calls)
    template = _blank(state)
    got = tessera.load(ck, template)
    assert_bit_equal(got["w"], state["w"])
    opens = _opens(storage, start)
    files = _data_files(root)
    assert {p: n for p, n in opens.items() if p in files} == dict.fromkeys(files, 1)
    assert set(opens) <= set(files), "no other file is opened (the root was, by tessera.open)"


def test_each_file_is_opened_once_into_a_new_dict(saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = saved
    storage = recorded(root)
    got = tessera.load(storage)
    assert_bit_equal(got["m"]["a"], state["m"]["a"])
    opens = _opens(storage)
    files = _data_files(root)
    assert {p: n for p, n in opens.items() if p in files} == dict.fromkeys(files, 1)
    assert opens[str(root / "zarr.json")] == 1


def test_regions_and_strided_destinations_open_each_chunk_once(saved: tuple[Path, dict[str, Any]]) -> None:
    """Chunks cut by the region, shared by two requests, or landing in a strided view."""
    root, state = saved
    storage = recorded(root)
    ck = tessera.open(storage)
    top = torch.zeros(10, 16, dtype=torch.bfloat16)
    rest = torch.zeros(16, 27, dtype=torch.bfloat16).t()  # strided
    ck.read_many([("w", top, [slice(0, 10)]), ("w", rest, [slice(10, 37)])])
    assert_bit_equal(top, state["w"][:10])
    assert_bit_equal(rest, state["w"][10:])
    opens = _opens(storage)
    chunks = [p for p in opens if "/w/c/" in p]
    assert len(chunks) == 5 and set(opens.values()) == {1}, opens  # w/zarr.json and the root too


def test_zarr_json_is_read_once_per_handle(saved: tuple[Path, dict[str, Any]]) -> None:
    root, _ = saved
    storage = recorded(root)
    ck = tessera.open(storage)
    with recording(storage) as first:
        ck.read("w", [slice(0, 4)])
    with recording(storage) as again:
        ck.read("w")
    assert ("read_file", "w/zarr.json") in first
    assert not [c for c in again if c[1].endswith("zarr.json")]


# -- the storage's read interface ---------------------------------------------------------------


def test_read_into_reports_the_size_before_reading(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(bytes(range(10)))
    storage = LocalStorage(tmp_path)
    seen: list[Any] = []

    def fill(size: int | None, read: Callable[[memoryview], None]) -> None:
        seen.append(size)
        if size is not None:
            first, second = bytearray(3), bytearray(4)
            read(memoryview(first))
            read(memoryview(second))
            seen.extend([bytes(first), bytes(second)])

    storage.read_into("f", 2, fill)
    assert seen == [10, bytes([2, 3, 4]), bytes([5, 6, 7, 8])]
    seen.clear()
    storage.read_into("missing", 0, fill)
    storage.read_into("d", 0, fill)  # a directory is no file
    assert seen == [None, None]
    with pytest.raises(tessera.StorageError, match="ended early"):
        storage.read_into("f", 8, lambda size, read: read(memoryview(bytearray(3))))
    with pytest.raises(FileMissingError):
        storage.read_file("d", 100)
    with pytest.raises(FileMissingError):
        storage.read_file("missing", 100)
    assert storage.read_file("f", 10) == bytes(range(10))
    with pytest.raises(tessera.LimitExceededError):
        storage.read_file("f", 9)


def test_read_into_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(tessera.InvalidKeyError, match="symbolic link"):
        LocalStorage(tmp_path).read_into("link", 0, lambda size, read: None)


def test_a_symlinked_chunk_directory_is_refused_after_its_siblings(tmp_path: Path) -> None:
    """Directories are resolved once per handle; one that is a link out is still refused when
    its parent and siblings were checked before."""
    t = random_tensor("int32", (6, 2), seed=14)
    tessera.save(
        {"t": t}, tmp_path / "ck", options=tessera.SaveOptions(chunk_bytes=8)
    )  # one row a chunk: t/c/0/0 ... t/c/5/0
    outside = tmp_path / "outside"
    (tmp_path / "ck" / "t" / "c" / "4").rename(outside)
    (tmp_path / "ck" / "t" / "c" / "4").symlink_to(outside, target_is_directory=True)
    ck = tessera.open(tmp_path / "ck")
    assert_bit_equal(ck.read("t", [slice(0, 4)]), t[:4])
    with pytest.raises(tessera.InvalidKeyError, match="outside the checkpoint"):
        ck.read("t")


# -- the checksum, fused with the reads --------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Blocks of 64 bytes, so that a small chunk is read and checksummed in many blocks."""
    monkeypatch.setattr(tessera.engine.read_strategies, "BLOCK_BYTES", 64)
    return 64


@pytest.mark.parametrize("where", ["first block", "later block", "padding", "stored crc"])
def test_a_flipped_byte_in_any_block_fails_the_chunk(tmp_path: Path, small_blocks: int, where: str) -> None:
    t = random_tensor("float32", (37, 16), seed=4)
    with forced_chunks(lambda shape: (8, 16)):
        tessera.save({"t": t}, tmp_path / "ck")
    chunk = tmp_path / "ck" / "t" / "c" / "4" / "0"  # rows 32..36 of 8: 320 bytes of data, then padding
    size = chunk.stat().st_size
    offset = {"first block": 3, "later block": 4 * small_blocks + 5, "padding": 400, "stored crc": size - 2}
    flip_byte(chunk, offset[where])
    out = torch.zeros(37, 16)
    with pytest.raises(tessera.ChecksumMismatchError, match=r"t chunk c/4/0"):
        tessera.open(tmp_path / "ck").read_into("t", out)
    # The other chunks are sound, and a region that avoids the damaged chunk reads.
    assert_bit_equal(tessera.open(tmp_path / "ck").read("t", [slice(0, 32)]), t[:32])


def test_a_flipped_byte_in_a_later_block_of_a_large_chunk(tmp_path: Path) -> None:
    """The real block size: a 20 MiB chunk is three blocks; the damage is in the third."""
    n = 5 * 2**20
    t = torch.arange(n, dtype=torch.float32)
    tessera.save({"t": t}, tmp_path / "ck", options=tessera.SaveOptions(chunk_bytes=4 * n))
    chunk = tmp_path / "ck" / "t" / "c" / "0"
    assert chunk.stat().st_size == 4 * n + 4
    assert 2 * tessera.engine.read_strategies.BLOCK_BYTES < 17 * 2**20 < 4 * n
    flip_byte(chunk, 17 * 2**20 + 11)
    with pytest.raises(tessera.ChecksumMismatchError, match="t chunk c/0"):
        tessera.load(tmp_path / "ck", {"t": torch.empty(n)})


@pytest.mark.parametrize("damage", ["short", "long", "missing", "directory"])
def test_the_size_is_checked_on_the_one_open(tmp_path: Path, small_blocks: int, damage: str) -> None:
    t = random_tensor("int32", (20,), seed=5)
    tessera.save({"t": t}, tmp_path / "ck", options=tessera.SaveOptions(chunk_bytes=40))
    chunk = tmp_path / "ck" / "t" / "c" / "1"
    if damage == "short":
        chunk.write_bytes(chunk.read_bytes()[:-1])
    elif damage == "long":
        chunk.write_bytes(chunk.read_bytes() + b"\0")
    else:
        chunk.unlink()
        if damage == "directory":
            chunk.mkdir()
    error = (
        tessera.MissingChunkError
        if damage in ("missing", "directory")
        else tessera.InconsistentCheckpointError
    )
    for read in (
        lambda ck: ck.read_into("t", torch.empty(20, dtype=torch.int32)),  # in place
        lambda ck: ck.read("t", [slice(11, 13)]),  # the chunk read whole
    ):
        with pytest.raises(error, match="t chunk c/1"):
            read(tessera.open(tmp_path / "ck"))


# -- metadata, checked in parallel with the chunks -----------------------------------------------


def _many_arrays(root: Path) -> dict[str, torch.Tensor]:
    state = {f"t{i}": random_tensor("float32", (4, 3), seed=i) for i in range(12)}
    tessera.save(state, root, options=tessera.SaveOptions(chunk_bytes=24))
    return state


@pytest.mark.parametrize("damage", ["shape", "fill_value", "missing"])
def test_a_mismatching_array_zarr_json_still_fails_the_load(tmp_path: Path, damage: str) -> None:
    state = _many_arrays(tmp_path / "ck")
    meta = tmp_path / "ck" / "t7" / "zarr.json"
    if damage == "shape":
        edit_json(meta, lambda doc: doc.update(shape=[4, 4]))
    elif damage == "fill_value":
        edit_json(meta, lambda doc: doc.update(fill_value=1.0))
    else:
        meta.unlink()
    template = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises(tessera.InconsistentCheckpointError, match="t7/zarr.json"):
        tessera.load(tmp_path / "ck", template)
    with pytest.raises(tessera.InconsistentCheckpointError, match="t7/zarr.json"):
        tessera.load(tmp_path / "ck")
    ck = tessera.open(tmp_path / "ck", threads=4)
    for _ in range(2):  # a failed check is not remembered as passed
        with pytest.raises(tessera.InconsistentCheckpointError, match="t7/zarr.json"):
            ck.read("t7", [0])
    assert_bit_equal(ck.read("t6"), state["t6"])


def test_metadata_is_checked_on_the_io_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _many_arrays(tmp_path / "ck")
    threads: set[str] = set()
    real = ArrayChecks.check

    def spy(self: ArrayChecks, entry: Any) -> None:
        threads.add(threading.current_thread().name)
        real(self, entry)

    monkeypatch.setattr(ArrayChecks, "check", spy)
    tessera.load(tessera.open(tmp_path / "ck", threads=4), {k: torch.zeros_like(v) for k, v in state.items()})
    assert threads and all(name.startswith("tessera-io") for name in threads), threads


def test_no_chunk_is_read_before_its_array_is_checked_R5_10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _many_arrays(tmp_path / "ck")
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_check = ArrayChecks.check

    def check(self: ArrayChecks, entry: Any) -> None:
        time.sleep(0.02)  # a slow disk: the threads reach the array's chunks before this is done
        real_check(self, entry)
        with lock:
            events.append(("checked", entry.path))

    class Logged(StorageWrapper):
        def read_into(self, path: str, *args: Any) -> None:
            with lock:
                events.append(("read", path.split("/")[0]))
            super().read_into(path, *args)

    monkeypatch.setattr(ArrayChecks, "check", check)
    ck = tessera.open(Logged(LocalStorage(tmp_path / "ck")), threads=8)
    tessera.load(ck, {k: torch.zeros_like(v) for k, v in state.items()})
    checked = {path: events.index(("checked", path)) for path in state}
    reads = [(i, path) for i, (what, path) in enumerate(events) if what == "read"]
    assert len(reads) == 2 * len(state)
    assert all(checked[path] < i for i, path in reads), events


def test_an_empty_region_still_checks_the_array(tmp_path: Path) -> None:
    _many_arrays(tmp_path / "ck")
    edit_json(tmp_path / "ck" / "t2" / "zarr.json", lambda doc: doc.update(shape=[5, 3]))
    with pytest.raises(tessera.InconsistentCheckpointError, match="t2/zarr.json"):
        tessera.open(tmp_path / "ck").read("t2", [slice(1, 1)])


# -- destinations ---------------------------------------------------------------------------------


def test_cpu_destinations_of_every_kind(saved: tuple[Path, dict[str, Any]], small_blocks: int) -> None:
    root, state = saved
    w = state["w"]
    ck = tessera.open(root)
    row = torch.zeros(16, dtype=torch.bfloat16)  # an int index drops a dimension
    ck.read_into("w", row, [9])
    assert_bit_equal(row, w[9])
    window = torch.zeros(40, 20, dtype=torch.bfloat16)
    ck.read_into("w", window[2:39, 3:19])
    assert_bit_equal(window[2:39, 3:19], w)
    assert not window[:2].any() and not window[:, :3].any() and not window[:, 19:].any()
    z = torch.complex(torch.arange(6.0), torch.ones(6)).reshape(2, 3)
    tessera.save({"z": z}, root.parent / "z")
    conj = torch.zeros(2, 3, dtype=torch.complex64).conj()
    tessera.open(root.parent / "z").read_into("z", conj)
    assert torch.equal(conj, z)


def test_an_expanded_destination_is_refused(saved: tuple[Path, dict[str, Any]]) -> None:
    root, _ = saved
    with pytest.raises(tessera.TensorMismatchError, match="repeats elements"):
        tessera.open(root).read_into("m/b", torch.zeros(1, dtype=torch.int64).expand(3))


# -- the staging pool -------------------------------------------------------------------------------


def test_staging_buffers_are_reused() -> None:
    pool = StagingPool(pinned=False, max_buffers=2)
    with pool.buffer(1000) as first:
        assert first.dtype == torch.uint8 and first.device.type == "cpu" and first.shape == (1000,)
        address = first.data_ptr()
    with pool.buffer(3000) as second:  # fits in the same buffer
        assert second.shape == (3000,) and second.data_ptr() == address
    with pool.buffer(10) as one, pool.buffer(10) as two:  # two lent at once: two buffers
        assert one.data_ptr() != two.data_ptr()
        assert {one.data_ptr(), two.data_ptr()} >= {address}
    with pool.buffer(0) as empty:
        assert empty.numel() == 0


def test_a_larger_request_replaces_a_free_buffer_at_the_cap() -> None:
    pool = StagingPool(pinned=False, max_buffers=1)
    with pool.buffer(10) as small:
        small.fill_(1)
    with pool.buffer(3 * 2**20) as large:
        assert large.numel() == 3 * 2**20
        large.fill_(2)
    with pool.buffer(100) as again:  # the large buffer now serves small requests too
        assert int(again[0]) == 2


def test_a_buffer_comes_back_after_an_exception() -> None:
    pool = StagingPool(pinned=False, max_buffers=1)
    with pytest.raises(RuntimeError, match="boom"), pool.buffer(64):
        raise RuntimeError("boom")
    done = threading.Event()

    def take() -> None:
        with pool.buffer(64):
            done.set()

    worker = threading.Thread(target=take)
    worker.start()
    worker.join(timeout=10)
    assert done.is_set(), "the buffer was not returned"


def test_a_full_pool_makes_the_next_request_wait() -> None:
    pool = StagingPool(pinned=False, max_buffers=2)
    order: list[str] = []
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with pool.buffer(8), pool.buffer(8):
            held.set()
            release.wait(10)
            order.append("released")

    def waiter() -> None:
        with pool.buffer(8):
            order.append("got")

    first = threading.Thread(target=holder)
    first.start()
    assert held.wait(10)
    second = threading.Thread(target=waiter)
    second.start()
    second.join(timeout=0.2)
    assert order == []  # still waiting: both buffers are lent
    release.set()
    first.join(10)
    second.join(10)
    assert order == ["released", "got"]


def test_staging_pool_arguments() -> None:
    assert not StagingPool(pinned=False).pinned
    assert StagingPool(pinned=True).pinned == torch.cuda.is_available()
    with pytest.raises(ValueError):
        StagingPool(max_buffers=0)
    pool = StagingPool(pinned=False)
    with pytest.raises(ValueError), pool.buffer(-1):
        pass
    with pool.buffer(5):
        pass
    pool.clear()
    with pool.buffer(5) as again:
        assert again.numel() == 5


def test_the_staged_block_path_runs_on_the_cpu_too(tmp_path: Path, small_blocks: int) -> None:
    """What a GPU destination gets (each block through a staging buffer, then copied on), run here
    with a CPU destination so that machines without CUDA test it as well."""
    t = random_tensor("float32", (37, 16), seed=13)
    with forced_chunks(lambda shape: (8, 16)):
        tessera.save({"t": t}, tmp_path / "ck")
    ck = tessera.open(tmp_path / "ck")
    entry = ck.entry("t")
    staged = StagedInPlace(ChunkFiles(ck.storage))
    copies = DeviceCopies(StagingPool(pinned=False, max_buffers=2))
    out = torch.zeros(37, 16)
    for index in entry.layout.chunk_indices():
        staged.task(ChunkRead.of([ReadTarget(entry, index, ((0, 37), (0, 16)), out, copies)]))()
    assert_bit_equal(out, t)
    flip_byte(tmp_path / "ck" / "t" / "c" / "2" / "0", 3 * small_blocks + 1)
    target = ReadTarget(entry, (2, 0), ((0, 37), (0, 16)), out, copies)
    with pytest.raises(tessera.ChecksumMismatchError, match="t chunk c/2/0"):
        staged.task(ChunkRead.of([target]))()


# -- GPU destinations (run where CUDA is) ------------------------------------------------------------


def _poisoned(like: torch.Tensor, device: str) -> torch.Tensor:
    """An uninitialized tensor like ``like`` on ``device``, all bytes 0xFF (NaN for floats)."""
    out = torch.empty_like(like, device=device)
    out.reshape(-1).view(torch.uint8).fill_(0xFF)
    return out


@pytest.fixture
def gpu_saved(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    state = {
        "w": random_tensor("bfloat16", (300, 1000), seed=6),
        "e": random_tensor("float8_e4m3fn", (77, 13), seed=7),
        "c": random_tensor("complex64", (5, 6), seed=8),
        "b": random_tensor("bool", (33,), seed=9),
        "s": random_tensor("float64", (), seed=10),
    }
    tessera.save(
        state, tmp_path / "ck", options=tessera.SaveOptions(chunk_bytes=100_000)
    )  # several chunks per array
    yield tmp_path / "ck", state


@CUDA
@pytest.mark.parametrize("block", [64, 8 * 2**20], ids=["small-blocks", "default-blocks"])
def test_load_into_cuda_tensors(
    gpu_saved: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(tessera.engine.read_strategies, "BLOCK_BYTES", block)
    root, state = gpu_saved
    template = {k: _poisoned(v, "cuda") for k, v in state.items()}
    got = tessera.load(root, template)
    for key, want in state.items():
        assert got[key] is template[key] and got[key].device.type == "cuda"
        assert_bit_equal(got[key].cpu(), want)  # right after the load: the copies have landed


@CUDA
def test_load_into_strided_and_region_cuda_destinations(gpu_saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = gpu_saved
    w = state["w"]
    ck = tessera.open(root)
    transposed = torch.zeros(1000, 300, dtype=torch.bfloat16, device="cuda").t()
    ck.read_into("w", transposed)
    assert_bit_equal(transposed.cpu(), w)
    big = torch.zeros(310, 1010, dtype=torch.bfloat16, device="cuda")
    ck.read_into("w", big[5:305, 7:1007])
    assert_bit_equal(big[5:305, 7:1007].cpu(), w)
    assert not big[:5].any() and not big[:, :7].any()
    row = torch.zeros(1000, dtype=torch.bfloat16, device="cuda")
    ck.read_into("w", row, [123])
    assert_bit_equal(row.cpu(), w[123])
    part = torch.zeros(50, 999, dtype=torch.bfloat16, device="cuda")
    ck.read_into("w", part, [slice(101, 151), slice(1, 1000)])
    assert_bit_equal(part.cpu(), w[101:151, 1:])
    conj = torch.zeros(5, 6, dtype=torch.complex64, device="cuda").conj()
    ck.read_into("c", conj)
    assert_bit_equal(conj.cpu().resolve_conj(), state["c"])


@CUDA
def test_zstd_and_shared_chunks_into_cuda(tmp_path: Path) -> None:
    w = random_tensor("float32", (64, 50), seed=11)
    tessera.save(
        {"w": w}, tmp_path / "ck", options=tessera.SaveOptions(compression=tessera.Zstd(), chunk_bytes=1000)
    )
    ck = tessera.open(tmp_path / "ck")
    top = torch.zeros(33, 50, device="cuda")
    rest = torch.zeros(31, 50, device="cuda")
    ck.read_many([("w", top, [slice(0, 33)]), ("w", rest, [slice(33, 64)])])
    assert_bit_equal(top.cpu(), w[:33])
    assert_bit_equal(rest.cpu(), w[33:])


@CUDA
def test_cuda_and_cpu_destinations_in_one_load(gpu_saved: tuple[Path, dict[str, Any]]) -> None:
    root, state = gpu_saved
    template = {k: _poisoned(v, "cuda" if k in ("w", "b") else "cpu") for k, v in state.items()}
    got = tessera.load(root, template)
    for key, want in state.items():
        assert_bit_equal(got[key].cpu(), want)


@CUDA
def test_the_load_waits_for_work_queued_on_the_destination(gpu_saved: tuple[Path, dict[str, Any]]) -> None:
    """Work the caller queued on its stream before the load (here: zeroing the destination) does
    not overwrite what the load copies in on the handle's own stream."""
    root, state = gpu_saved
    out = torch.empty(300, 1000, dtype=torch.bfloat16, device="cuda")
    torch.cuda._sleep(100_000_000)  # keep the caller's stream busy
    out.zero_()
    tessera.open(root).read_into("w", out)
    assert_bit_equal(out.cpu(), state["w"])


@CUDA
def test_a_corrupt_chunk_into_cuda_still_fails(tmp_path: Path) -> None:
    t = random_tensor("float32", (64, 64), seed=12)
    tessera.save({"t": t}, tmp_path / "ck", options=tessera.SaveOptions(chunk_bytes=4096))
    flip_byte(tmp_path / "ck" / "t" / "c" / "3" / "0", 100)
    with pytest.raises(tessera.ChecksumMismatchError, match="t chunk c/3/0"):
        tessera.load(tmp_path / "ck", {"t": torch.zeros(64, 64, device="cuda")})


@CUDA
def test_pinned_staging_buffers() -> None:
    pool = StagingPool(pinned=True, max_buffers=1)
    assert pool.pinned
    stream = torch.cuda.Stream()
    dst = torch.zeros(2**20, dtype=torch.uint8, device="cuda")
    for value in range(1, 4):
        with pool.buffer(2**20, stream) as host:
            assert host.is_pinned()
            host.fill_(value)  # waits for the previous copy out of this buffer
            with torch.cuda.stream(stream):
                dst.copy_(host, non_blocking=True)
        stream.synchronize()
        assert int(dst.min()) == int(dst.max()) == value
