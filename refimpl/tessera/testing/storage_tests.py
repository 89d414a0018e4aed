"""The test kit for :class:`~tessera.storage.base.Storage` implementations (pytest).

Subclass :class:`StorageTests` in a test module and give it the ``make_storage`` fixture: a
factory returning a fresh storage for a name (the same name twice is the same location, as two
processes would see it; nothing is there until written). pytest then runs every test below
against the implementation::

    class TestMyStorage(StorageTests):
        @pytest.fixture
        def make_storage(self, tmp_path):
            return lambda name: MyStorage(tmp_path / name)

The tests use only the interface, in the call order ``storage/base.py`` documents, and the
public API on top of it (``save``, ``load``, ``open``, ``verify``, ``RunDirectory``). What a
storage does not offer is skipped with the reason: the run-directory operations (set
``run_directories = False``, or leave them unimplemented: the defaults refuse) and device I/O
(a storage without :attr:`~tessera.storage.base.Storage.device_io`, or no CUDA).
What the interface cannot show (that ``sync`` survives a power cut) is the implementation's own
to test; :class:`~tessera.testing.wrappers.FaultyStorage` tests a caller's side of it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ..api.checkpoint import open_checkpoint
from ..api.load import load
from ..api.run_dir import RunDirectory
from ..api.save import save
from ..api.verify import verify
from ..errors import CheckpointExistsError, InvalidKeyError, LimitExceededError, StorageError, TesseraError
from ..planning.options import SaveOptions
from ..storage.base import CLAIM_FILE, ROOT_METADATA, FileMissingError, ReadNext, Storage

__all__ = ["MakeStorage", "StorageTests"]

MakeStorage = Callable[[str], Storage]
"""A fresh storage for a name; the same name gives the same location."""

BAD_PATHS = ["", "/abs", "../up", "a/../b", "a//b", "./a", "a\\b", "nul\x00"]


def _claim(storage: Storage, save_id: str = "save-1") -> None:
    storage.claim(json.dumps({"save_id": save_id}).encode())


def _read_all(storage: Storage, path: str, offset: int = 0, block: int = 3) -> tuple[int | None, bytes]:
    """``read_into`` in blocks of ``block`` bytes: the size it gave and the bytes read."""
    got = bytearray()
    seen: list[int | None] = []

    def fill(size: int | None, read: ReadNext) -> None:
        seen.append(size)
        if size is None:
            return
        left = size - offset
        while left > 0:
            out = bytearray(min(block, left))
            read(memoryview(out))
            got.extend(out)
            left -= len(out)

    storage.read_into(path, offset, fill)
    return seen[0], bytes(got)


def _state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(16)
    return {
        "model": {
            "w": torch.randn(7, 11, generator=generator),
            "b": torch.arange(13, dtype=torch.int64),
            "h": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        },
        "step": 7,
        "name": "kit",
    }


class StorageTests:
    """The contract of :class:`~tessera.storage.base.Storage`, as tests (see the module's doc)."""

    run_directories: bool = True
    """Whether the storage implements the run-directory operations (``child``, ``kind``, ...)."""

    @pytest.fixture
    def make_storage(self) -> MakeStorage:
        """Override: the factory of fresh storages (see the module's docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must define the make_storage fixture")

    @pytest.fixture
    def storage(self, make_storage: MakeStorage) -> Storage:
        return make_storage("checkpoint")

    def require_run_directories(self, storage: Storage) -> None:
        if not self.run_directories:
            pytest.skip(f"{type(storage).__name__} does not hold run directories")
        try:
            storage.kind("probe")
        except StorageError as exc:
            if "cannot hold a run directory" in str(exc):
                pytest.skip(f"{type(storage).__name__} does not hold run directories")
            raise

    # -- claim (spec §9) -------------------------------------------------------------------------

    def test_location_and_exists(self, storage: Storage) -> None:
        assert isinstance(storage.location, str) and storage.location
        assert not storage.exists()
        _claim(storage)
        assert storage.exists()

    def test_claim_is_exclusive(self, storage: Storage, make_storage: MakeStorage) -> None:
        _claim(storage)
        with pytest.raises(CheckpointExistsError):
            _claim(storage)
        with pytest.raises(CheckpointExistsError):  # another process's view of the same location
            _claim(make_storage("checkpoint"), "save-2")
        assert json.loads(storage.read_file(CLAIM_FILE, 1 << 16)) == {"save_id": "save-1"}

    def test_claim_race_has_one_winner(self, make_storage: MakeStorage) -> None:
        storages = [make_storage("raced") for _ in range(8)]
        results: list[str] = [""] * len(storages)
        barrier = threading.Barrier(len(storages))

        def claim(i: int) -> None:
            barrier.wait()
            try:
                _claim(storages[i], f"save-{i}")
                results[i] = "won"
            except CheckpointExistsError:
                results[i] = "lost"

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(storages))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == ["lost"] * (len(storages) - 1) + ["won"]

    def test_claim_refuses_a_committed_location(self, storage: Storage, make_storage: MakeStorage) -> None:
        _claim(storage)
        storage.sync()
        storage.publish_root(b"{}", "save-1")
        with pytest.raises(CheckpointExistsError):
            _claim(make_storage("checkpoint"), "save-2")

    # -- writing ---------------------------------------------------------------------------------

    def test_write_then_read(self, storage: Storage) -> None:
        _claim(storage)
        storage.write_file("a/b/c/0", [b"ab", bytearray(b"cd"), memoryview(b"efgh")[:2], b""])
        storage.write_file("empty", [])
        storage.sync()
        assert storage.read_file("a/b/c/0", 6) == b"abcdef"
        assert storage.size("a/b/c/0") == 6
        assert storage.read_file("empty", 0) == b"" and storage.size("empty") == 0

    def test_write_consumes_a_lazy_iterable_in_order(self, storage: Storage) -> None:
        _claim(storage)
        storage.write_file("lazy", (bytes([i]) * 1000 for i in range(10)))
        storage.sync()
        assert storage.read_file("lazy", 10_000) == b"".join(bytes([i]) * 1000 for i in range(10))

    def test_files_are_write_once(self, storage: Storage) -> None:
        _claim(storage)
        storage.write_file("x", [b"first"])
        with pytest.raises(StorageError):
            storage.write_file("x", [b"second"])
        storage.sync()
        assert storage.read_file("x", 100) == b"first"

    def test_concurrent_writes(self, storage: Storage) -> None:
        _claim(storage)
        paths = [f"t/c/{i}/{j}" for i in range(4) for j in range(8)]
        threads = [threading.Thread(target=storage.write_file, args=(p, [p.encode() * 100])) for p in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        storage.sync()
        for p in paths:
            assert storage.read_file(p, 10_000) == p.encode() * 100

    @pytest.mark.parametrize("path", BAD_PATHS)
    def test_paths_that_leave_the_root_are_refused(self, storage: Storage, path: str) -> None:
        _claim(storage)
        with pytest.raises(InvalidKeyError):
            storage.write_file(path, [b"x"])
        with pytest.raises(InvalidKeyError):
            storage.read_file(path, 100)

    # -- reading ---------------------------------------------------------------------------------

    def test_missing_files(self, storage: Storage) -> None:
        _claim(storage)
        storage.write_file("dir/file", [b"x"])
        storage.sync()
        for path in ("absent", "dir/absent", "absent/deeper", "dir"):
            assert storage.size(path) is None, path
            with pytest.raises(FileMissingError):
                storage.read_file(path, 100)
            assert _read_all(storage, path) == (None, b""), path

    def test_read_into_a_missing_file_refuses_to_read(self, storage: Storage) -> None:
        _claim(storage)

        def fill(size: int | None, read: ReadNext) -> None:
            assert size is None
            read(memoryview(bytearray(1)))

        with pytest.raises(FileMissingError):
            storage.read_into("absent", 0, fill)

    def test_read_file_limit(self, storage: Storage) -> None:
        _claim(storage)
        storage.write_file("doc", [b"0123456789"])
        storage.sync()
        assert storage.read_file("doc", 10) == b"0123456789"
        with pytest.raises(LimitExceededError):
            storage.read_file("doc", 9)

    @pytest.mark.parametrize("offset", [0, 1, 7])
    def test_read_into_blocks_from_an_offset(self, storage: Storage, offset: int) -> None:
        data = bytes(range(256)) * 3
        _claim(storage)
        storage.write_file("chunk", [data])
        storage.sync()
        assert _read_all(storage, "chunk", offset, block=100) == (len(data), data[offset:])

    def test_read_into_past_the_end_is_a_short_file(self, storage: Storage) -> None:
        _claim(storage)
        storage.write_file("short", [b"12345"])
        storage.sync()

        def fill(size: int | None, read: ReadNext) -> None:
            assert size == 5
            read(memoryview(bytearray(8)))

        with pytest.raises(StorageError):
            storage.read_into("short", 0, fill)

    def test_read_into_lets_the_callers_error_through(self, storage: Storage) -> None:
        _claim(storage)
        storage.write_file("f", [b"abc"])
        storage.sync()

        class Stop(Exception):
            pass

        def fill(size: int | None, read: ReadNext) -> None:
            read(memoryview(bytearray(1)))
            raise Stop

        with pytest.raises(Stop):
            storage.read_into("f", 0, fill)

    def test_list(self, storage: Storage) -> None:
        assert storage.list("") == []
        _claim(storage)
        for path in ("b/c/0", "b/c/1", "a", "b/zarr.json"):
            storage.write_file(path, [b"x"])
        storage.sync()
        assert sorted(storage.list("")) == sorted([CLAIM_FILE, "a", "b"])
        assert sorted(storage.list("b")) == ["c", "zarr.json"]
        assert sorted(storage.list("b/c")) == ["0", "1"]
        assert storage.list("absent") == []

    def test_present_and_stored_bytes(self, storage: Storage) -> None:
        """What ``tessera ls`` and ``inspect`` count: every file's bytes, nested ones too."""
        _claim(storage)
        claimed = storage.stored_bytes()
        assert storage.present() and claimed == storage.size(CLAIM_FILE)
        for path, data in (("a", b"xyz"), ("b/c/0", b"12345"), ("b/zarr.json", b"{}")):
            storage.write_file(path, [data])
        storage.sync()
        assert storage.stored_bytes() == claimed + 10

    # -- commit (spec §9) ------------------------------------------------------------------------

    def test_publish_root_is_first_wins(self, storage: Storage, make_storage: MakeStorage) -> None:
        _claim(storage)
        storage.write_file("a/zarr.json", [b"{}"])
        storage.sync()
        storage.publish_root(b'{"first": true}', "save-1")
        assert storage.read_file(ROOT_METADATA, 100) == b'{"first": true}'
        with pytest.raises(CheckpointExistsError):
            make_storage("checkpoint").publish_root(b'{"second": true}', "save-2")
        assert storage.read_file(ROOT_METADATA, 100) == b'{"first": true}'
        assert not [n for n in storage.list("") if n.startswith(ROOT_METADATA + ".")], "temporary left"

    def test_remove_unpublished_R9_7(self, storage: Storage) -> None:
        _claim(storage, "mine")
        storage.write_file("m/c/0", [b"x"])
        storage.write_file("m/zarr.json", [b"{}"])
        storage.sync()
        storage.remove_unpublished("someone-else")  # not its claim: nothing goes
        assert storage.read_file("m/c/0", 10) == b"x"
        storage.remove_unpublished("mine")
        assert not storage.exists()
        assert storage.list("") == []

    def test_remove_unpublished_spares_a_committed_checkpoint(self, storage: Storage) -> None:
        _claim(storage, "mine")
        storage.write_file("m/c/0", [b"x"])
        storage.sync()
        storage.publish_root(b"{}", "mine")
        storage.remove_unpublished("mine")
        assert storage.read_file("m/c/0", 10) == b"x"
        assert storage.read_file(ROOT_METADATA, 10) == b"{}"

    # -- device I/O ------------------------------------------------------------------------------

    def test_device_io(self, storage: Storage) -> None:
        if storage.device_io is None:
            pytest.skip(f"{type(storage).__name__} has no device I/O")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        data = torch.arange(4096, dtype=torch.uint8, device="cuda")
        _claim(storage)
        storage.write_file("gpu", [b"head", data, b"tail"])
        storage.sync()
        expected = b"head" + data.cpu().numpy().tobytes() + b"tail"
        assert storage.read_file("gpu", 10_000) == expected
        out = torch.empty(4096, dtype=torch.uint8, device="cuda")

        def fill(size: int | None, read: ReadNext) -> None:
            assert size == len(expected)
            read(memoryview(bytearray(4)))
            read(out)

        storage.read_into("gpu", 0, fill)
        assert torch.equal(out, data)

    # -- a checkpoint through the API ------------------------------------------------------------

    def test_checkpoint_round_trip(self, storage: Storage) -> None:
        state = _state()
        save(state, storage, options=SaveOptions(chunk_bytes=64), metadata={"kit": True})
        loaded = load(storage)
        assert set(loaded) == set(state)
        for key in ("w", "b", "h"):
            assert torch.equal(loaded["model"][key], state["model"][key]), key
        assert loaded["step"] == 7 and loaded["name"] == "kit"
        report = verify(storage)
        assert report.ok, report.problems
        checkpoint = open_checkpoint(storage)
        assert checkpoint.metadata == {"kit": True}
        # A region across chunk boundaries, as a rank of another layout reads it.
        part = checkpoint.read("model/w", (slice(2, 6), slice(3, 10)))
        assert torch.equal(torch.as_tensor(part), state["model"]["w"][2:6, 3:10])
        with pytest.raises(CheckpointExistsError):
            save(state, storage)

    def test_failed_save_leaves_nothing(self, storage: Storage) -> None:
        with pytest.raises(TesseraError):
            save({"bad": object()}, storage)
        assert not storage.exists()

    # -- run directories (spec §10) --------------------------------------------------------------

    def test_child_kind_entries(self, make_storage: MakeStorage) -> None:
        run = make_storage("run")
        self.require_run_directories(run)
        assert run.kind("step") is None and run.entries() == []
        step = run.child("step")
        _claim(step)
        step.write_file("a/0", [b"x"])
        step.sync()
        assert run.kind("step") == "dir" and run.kind("step/a/0") == "file"
        assert run.kind("step/a") == "dir" and run.kind("absent") is None
        assert run.child("step").read_file("a/0", 10) == b"x"
        assert dict(run.entries()) == {"step": "dir"}
        assert dict(run.entries("step")) == {CLAIM_FILE: "file", "a": "dir"}
        assert run.entries("absent") == []

    def test_replace_file(self, make_storage: MakeStorage) -> None:
        run = make_storage("run")
        self.require_run_directories(run)
        lock = run.lock(".run.lock", create=True, wait=0.0)  # creates the root
        assert lock is not None
        lock.release()
        held = run.lock(None, create=False, wait=1.0)
        assert held is not None
        try:
            run.replace_file("latest", b"step-1\n")
            assert run.read_file("latest", 100) == b"step-1\n"
            run.replace_file("latest", b"step-22\n")
            assert run.read_file("latest", 100) == b"step-22\n"
        finally:
            held.release()
        assert sorted(n for n, _ in run.entries()) == ["latest"], "temporary files left"

    def test_locks_are_exclusive(self, make_storage: MakeStorage) -> None:
        run = make_storage("run")
        self.require_run_directories(run)
        assert run.lock(".s.lock", create=False, wait=0.0) is None  # no marker yet
        first = run.lock(".s.lock", create=True, wait=0.0)
        assert first is not None and first.created
        assert run.kind(".s.lock") is not None
        assert make_storage("run").lock(".s.lock", create=True, wait=0.0) is None
        first.release(keep_marker=True)
        again = run.lock(".s.lock", create=False, wait=0.0)
        assert again is not None and not again.created
        again.release()
        assert run.kind(".s.lock") is None
        whole = run.lock(None, create=False, wait=0.0)
        assert whole is not None
        assert make_storage("run").lock(None, create=False, wait=0.05) is None
        whole.release()
        assert make_storage("run").lock(None, create=False, wait=0.0) is not None

    def test_remove_checkpoint(self, make_storage: MakeStorage) -> None:
        run = make_storage("run")
        self.require_run_directories(run)
        step = run.child("step-1")
        save(_state(), step, options=SaveOptions(chunk_bytes=64))
        run.remove_checkpoint("step-1")
        assert run.kind("step-1") is None
        run.remove_checkpoint("step-1")  # already gone: no error
        assert run.entries() == []

    def test_run_directory(self, make_storage: MakeStorage) -> None:
        root = make_storage("run")
        self.require_run_directories(root)
        run = RunDirectory(root, keep_last=2)
        assert run.latest() is None
        for step in (1, 2, 3):
            run.save({"w": torch.full((4,), float(step))}, step=step)
        assert [(c.step, c.committed, c.latest) for c in run.checkpoints()] == [
            (2, True, False),
            (3, True, True),
        ]
        latest = run.latest()
        assert latest is not None
        assert torch.equal(load(latest)["w"], torch.full((4,), 3.0))
        assert root.read_file("latest", 100) == b"step-00000003\n"
