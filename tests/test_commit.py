"""The commit protocol (§9): claim, durable writes, root published last with link, first-wins.

The power-loss tests record every file-system call of a save (through a proxy
for the ``os`` module of ``tessera.storage.local`` and a wrapper of
``Path.mkdir``), replay them into a model of a POSIX file system in which
unsynced data and unsynced directory entries are lost, and check the
checkpoint that survives a power cut after every single call.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tessera
import tessera.storage.local
import torch
from tessera.storage.local import LocalStorage

from .conftest import assert_tree_bit_equal, random_tensor

# -- recording --------------------------------------------------------------------------------

Op = tuple[Any, ...]


class RecordingOS:
    """Delegates to the real ``os``; logs what matters for durability, in call order."""

    def __init__(self, log: list[Op], *, drop_file_fsync: bool = False) -> None:
        self._log = log
        self._fds: dict[int, tuple[str, bool]] = {}
        self._lock = threading.Lock()
        self._drop_file_fsync = drop_file_fsync

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        fd = os.open(path, flags, mode, **kwargs)
        p = os.fspath(path)
        with self._lock:
            self._fds[fd] = (p, bool(flags & os.O_DIRECTORY))
            if flags & os.O_CREAT:
                self._log.append(("create", p))
        return fd

    def write(self, fd: int, data: Any) -> int:
        n = os.write(fd, data)
        with self._lock:
            self._log.append(("write", self._fds[fd][0], bytes(memoryview(data).cast("B")[:n])))
        return n

    def fsync(self, fd: int) -> None:
        path, is_dir = self._fds[fd]
        if self._drop_file_fsync and not is_dir:
            return
        os.fsync(fd)
        with self._lock:
            self._log.append(("fsync_dir" if is_dir else "fsync", path))

    def close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
        os.close(fd)

    def link(self, src: Any, dst: Any, **kwargs: Any) -> None:
        os.link(src, dst, **kwargs)
        self._log.append(("link", os.fspath(src), os.fspath(dst)))

    def unlink(self, path: Any, **kwargs: Any) -> None:
        os.unlink(path, **kwargs)
        self._log.append(("unlink", os.fspath(path)))

    def replace(self, src: Any, dst: Any, **kwargs: Any) -> None:
        self._log.append(("replace", os.fspath(src), os.fspath(dst)))
        os.replace(src, dst, **kwargs)

    def rename(self, src: Any, dst: Any, **kwargs: Any) -> None:
        self._log.append(("rename", os.fspath(src), os.fspath(dst)))
        os.rename(src, dst, **kwargs)


@contextmanager
def recorded(**options: Any) -> Iterator[list[Op]]:
    log: list[Op] = []
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        existed = self.is_dir()
        real_mkdir(self, mode, parents, exist_ok)
        if not existed and ("mkdir", str(self)) not in log:
            log.append(("mkdir", str(self)))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tessera.storage.local, "os", RecordingOS(log, **options))
        mp.setattr(pathlib.Path, "mkdir", mkdir)
        yield log


# -- a model of a file system that loses power -----------------------------------------------


@dataclass
class Model:
    """Directory entries and file data, as the program sees them and as the disk holds them."""

    entries: dict[str, dict[str, tuple[str, Any]]] = field(default_factory=dict)
    durable_entries: dict[str, dict[str, tuple[str, Any]]] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    durable_data: dict[int, bytes] = field(default_factory=dict)
    inode_of: dict[str, int] = field(default_factory=dict)

    def existing_dir(self, path: str) -> None:
        """A directory that exists, durably, before the save (with no entries we care about)."""
        self.entries[path] = {}
        self.durable_entries[path] = {}

    def apply(self, op: Op) -> None:
        kind = op[0]
        if kind == "mkdir":
            parent, name = os.path.split(op[1])
            self.entries[parent][name] = ("dir", op[1])
            self.entries[op[1]] = {}
            self.durable_entries[op[1]] = {}
        elif kind == "create":
            parent, name = os.path.split(op[1])
            inode = len(self.data)
            self.data[inode] = b""
            self.inode_of[op[1]] = inode
            self.entries[parent][name] = ("file", inode)
        elif kind == "write":
            self.data[self.inode_of[op[1]]] += op[2]
        elif kind == "fsync":
            inode = self.inode_of[op[1]]
            self.durable_data[inode] = self.data[inode]
        elif kind == "fsync_dir":
            self.durable_entries[op[1]] = dict(self.entries[op[1]])
        elif kind == "link":
            src_parent, src_name = os.path.split(op[1])
            parent, name = os.path.split(op[2])
            self.entries[parent][name] = self.entries[src_parent][src_name]
            self.inode_of[op[2]] = self.inode_of[op[1]]
        elif kind == "unlink":
            parent, name = os.path.split(op[1])
            del self.entries[parent][name]
        elif kind in ("replace", "rename"):
            src_parent, src_name = os.path.split(op[1])
            parent, name = os.path.split(op[2])
            self.entries[parent][name] = self.entries[src_parent].pop(src_name)
            self.inode_of[op[2]] = self.inode_of[op[1]]
        else:  # pragma: no cover
            raise AssertionError(op)

    def view(self, scenario: str, root: str) -> Callable[[str], dict[str, tuple[str, Any]]]:
        """Which entries of a directory survive the power cut."""

        def entries(directory: str) -> dict[str, tuple[str, Any]]:
            if scenario == "synced":  # only what was fsynced
                return self.durable_entries.get(directory, {})
            if scenario == "root-leaks":  # ... but the root zarr.json entry reached the disk early
                found = dict(self.durable_entries.get(directory, {}))
                if directory == root and "zarr.json" in self.entries.get(directory, {}):
                    found["zarr.json"] = self.entries[directory]["zarr.json"]
                return found
            if scenario == "metadata-only":  # every entry survived, unsynced data did not
                return self.entries.get(directory, {})
            raise AssertionError(scenario)  # pragma: no cover

        return entries

    def materialize(self, scenario: str, root: str, out: Path) -> None:
        """Write the tree under ``root`` that survives, at ``out`` (absent if the root is lost)."""
        view = self.view(scenario, root)
        parent, name = os.path.split(root)
        if name not in view(parent):
            return

        def build(directory: str, target: Path) -> None:
            target.mkdir()
            for entry, (kind, ref) in view(directory).items():
                if kind == "dir":
                    build(ref, target / entry)
                else:
                    (target / entry).write_bytes(self.durable_data.get(ref, b""))

        build(root, out)


def replay(
    log: list[Op],
    root: Path,
    want: dict[str, Any],
    scratch: Path,
    scenarios: tuple[str, ...] = ("synced", "root-leaks", "metadata-only"),
) -> dict[str, list[str]]:
    """The outcome of a power cut after each call: "uncommitted", "committed", or a failure."""
    outcomes: dict[str, list[str]] = {s: [] for s in scenarios}
    scratch.mkdir(parents=True)
    for cut in range(len(log) + 1):
        model = Model()
        model.existing_dir(str(root.parent))
        for op in log[:cut]:
            model.apply(op)
        for scenario in scenarios:
            out = scratch / f"{scenario}-{cut}"
            model.materialize(scenario, str(root), out)
            try:
                loaded = tessera.load(out)
            except (tessera.UncommittedCheckpointError, tessera.CheckpointNotFoundError):
                outcomes[scenario].append("uncommitted")
                continue
            except tessera.TesseraError as exc:
                outcomes[scenario].append(f"BROKEN after {log[cut - 1][:2]}: {exc.code}: {exc}")
                continue
            try:
                assert_tree_bit_equal(loaded, want)
                report = tessera.verify(out)
                assert report.ok, report.problems
            except AssertionError as exc:
                outcomes[scenario].append(f"BROKEN after {log[cut - 1][:2]}: {exc}")
            else:
                outcomes[scenario].append("committed")
    return outcomes


def _state() -> dict[str, Any]:
    return {
        "model": {
            "w": random_tensor("float32", (3, 5), seed=1),
            "b": random_tensor("bfloat16", (5,), seed=2),
        },
        "opt": {0: {"step": torch.tensor(3.0)}},
        "rng": b"\x01\x02\x03",
        "lr": 0.1,
    }


def _save_recorded(root: Path, **options: Any) -> list[Op]:
    with recorded(**options) as log:
        tessera.save(_state(), root, options=tessera.SaveOptions(chunk_bytes=24, threads=1))
    return log


# -- the order of calls -----------------------------------------------------------------------


def test_commit_order_R9_1_R9_8_R9_10(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    log = _save_recorded(root)
    r = str(root)
    save_id = tessera.open(root).manifest.save_id
    temp = f"{r}/zarr.json.{save_id}.tmp"

    # R9.10: published with link, never rename/replace; exactly once.
    assert not [op for op in log if op[0] in ("replace", "rename")]
    links = [i for i, op in enumerate(log) if op[0] == "link"]
    assert [log[i][1:] for i in links] == [(temp, f"{r}/zarr.json")]
    link = links[0]

    # R9.1/R9.2: the claim is the first file; claim file and root directory fsynced before any other file.
    creates = [op[1] for op in log if op[0] == "create"]
    assert creates[0] == f"{r}/.tessera-claim.json"
    first_other = next(i for i, op in enumerate(log) if op[0] == "create" and op[1] != creates[0])
    assert ("fsync", creates[0]) in log[:first_other]
    assert ("fsync_dir", r) in log[:first_other]
    assert ("fsync_dir", str(tmp_path)) in log[:first_other], "the new root's entry in its parent"

    # R9.8: every file durable before the link (fsync after its last write).
    for path in creates:
        if path == temp:
            continue
        last_write = max(i for i, op in enumerate(log) if op[0] == "write" and op[1] == path)
        assert ("fsync", path) in log[last_write:link], f"{path} not fsynced before the commit"
    # ... and every created directory, and its parent, fsynced after its creation and before the link.
    for i, op in enumerate(log):
        if op[0] == "mkdir":
            assert ("fsync_dir", op[1]) in log[i:link], f"{op[1]} not fsynced"
            assert ("fsync_dir", os.path.dirname(op[1])) in log[i:link], f"parent of {op[1]} not fsynced"

    # R9.10: the temporary root is created exclusively, written and fsynced before the link.
    assert ("create", temp) in log[:link] and ("fsync", temp) in log[:link]
    # Nothing is created after the commit; then the temporary name goes and the root dir is synced.
    after = log[link + 1 :]
    assert not [op for op in after if op[0] in ("create", "mkdir", "write")]
    assert after.index(("unlink", temp)) < after.index(("fsync_dir", r))
    assert not (root / f"zarr.json.{save_id}.tmp").exists()


def test_every_file_is_created_exclusively_R9_5(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    flags: list[int] = []

    class Spy(RecordingOS):
        def open(self, path: Any, flag: int, mode: int = 0o777, **kwargs: Any) -> int:
            if flag & os.O_CREAT:
                flags.append(flag)
            return super().open(path, flag, mode, **kwargs)

    monkeypatch.setattr(tessera.storage.local, "os", Spy([]))
    tessera.save(_state(), tmp_path / "c", options=tessera.SaveOptions(chunk_bytes=24))
    assert len(flags) > 10
    assert all(f & os.O_EXCL for f in flags)


# -- power loss ---------------------------------------------------------------------------------


def test_power_loss_at_every_call_R9_8(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever call the power cut follows, the checkpoint is either uncommitted or complete."""
    root = tmp_path / "ckpt"
    log = _save_recorded(root)
    assert len(log) > 60
    outcomes = replay(log, root, _state(), tmp_path / "cuts")
    for scenario, results in outcomes.items():
        broken = [r for r in results if r.startswith("BROKEN")]
        assert not broken, f"{scenario}: {broken[:3]}"
        assert results[0] == "uncommitted"
        assert results[-1] == "committed", f"{scenario}: a finished save must survive a power cut"
        # Once committed, it stays committed.
        first = results.index("committed")
        assert set(results[first:]) == {"committed"}, scenario
    link = next(i for i, op in enumerate(log) if op[0] == "link")
    assert outcomes["root-leaks"].index("committed") == link + 1


def test_power_loss_model_catches_missing_directory_fsync(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The simulation is not vacuous: a writer that skips the directory fsyncs is caught."""
    monkeypatch.setattr(LocalStorage, "sync", lambda self: None)
    root = tmp_path / "ckpt"
    log = _save_recorded(root)
    outcomes = replay(log, root, _state(), tmp_path / "cuts", scenarios=("synced", "root-leaks"))
    assert any(r.startswith("BROKEN") for r in outcomes["root-leaks"])
    assert any(r.startswith("BROKEN") for r in outcomes["synced"])


def test_power_loss_model_catches_missing_file_fsync(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """... and so is a writer that never fsyncs its files (it survives kill -9, not power loss)."""
    root = tmp_path / "ckpt"
    log = _save_recorded(root, drop_file_fsync=True)
    assert tessera.verify(root).ok  # no crash, no problem
    outcomes = replay(log, root, _state(), tmp_path / "cuts", scenarios=("metadata-only",))
    assert outcomes["metadata-only"][-1].startswith("BROKEN")


def test_power_loss_model_catches_rename_publication(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Publishing with os.replace is not first-wins (R9.10); the log shows it."""

    def publish_with_replace(self: LocalStorage, data: bytes, save_id: str) -> None:
        temporary = f"zarr.json.{save_id}.tmp"
        self.write_file(temporary, [data])
        tessera.storage.local.os.replace(Path(self.location) / temporary, Path(self.location) / "zarr.json")

    monkeypatch.setattr(LocalStorage, "publish_root", publish_with_replace)
    log = _save_recorded(tmp_path / "ckpt")
    assert [op[0] for op in log if op[0] in ("replace", "link")] == ["replace"]


# -- failures during the save -------------------------------------------------------------------


def _failing_write_file(fail_at: int) -> Callable[..., None]:
    real = LocalStorage.write_file
    count = {"chunks": 0}

    def write_file(self: LocalStorage, path: str, buffers: Any) -> None:
        if "/c/" in path or path.endswith("/c"):
            count["chunks"] += 1
            if count["chunks"] == fail_at:
                raise tessera.StorageError(f"cannot write {path}: the disk is full (simulated)")
        real(self, path, buffers)

    return write_file


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_failed_save_removes_what_it_wrote_R9_7(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail_at: int
) -> None:
    root = tmp_path / "ckpt"
    monkeypatch.setattr(LocalStorage, "write_file", _failing_write_file(fail_at))
    with pytest.raises(tessera.StorageError, match="simulated") as info:
        tessera.save(_state(), root, options=tessera.SaveOptions(chunk_bytes=24, threads=1))
    assert info.value.code == "io_error"
    assert not root.exists(), "the failed save left its partial checkpoint behind"
    monkeypatch.undo()
    tessera.save(_state(), root)  # the path is free again
    assert_tree_bit_equal(tessera.load(root), _state())


def test_failed_save_removes_only_its_own_files_R9_7(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A claim that is not the failed save's own (replaced meanwhile) is never cleaned up."""
    root = tmp_path / "ckpt"
    real = LocalStorage.publish_root

    def rival_then_fail(self: LocalStorage, data: bytes, save_id: str) -> None:
        (root / ".tessera-claim.json").write_text('{"save_id": "someone-else"}')
        raise tessera.StorageError("cannot publish (simulated)")

    monkeypatch.setattr(LocalStorage, "publish_root", rival_then_fail)
    with pytest.raises(tessera.StorageError, match="simulated"):
        tessera.save(_state(), root, options=tessera.SaveOptions(chunk_bytes=24))
    assert (root / ".tessera-claim.json").read_text() == '{"save_id": "someone-else"}'
    assert (root / "model").is_dir()
    # A publication lost to a rival's committed root (already_exists) removes nothing either.
    monkeypatch.setattr(LocalStorage, "publish_root", real)
    other = tmp_path / "other"
    tessera.save(_state(), other)
    from tessera.storage.run_files import remove_unpublished

    save_id = tessera.open(other).manifest.save_id
    remove_unpublished(other, save_id)
    assert_tree_bit_equal(tessera.load(other), _state())


def test_failed_link_is_an_io_error_R9_10(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"

    class NoLink(RecordingOS):
        def link(self, src: Any, dst: Any, **kwargs: Any) -> None:
            raise PermissionError(1, "Operation not permitted", os.fspath(dst))

    monkeypatch.setattr(tessera.storage.local, "os", NoLink([]))
    with pytest.raises(tessera.StorageError) as info:
        tessera.save(_state(), root)
    assert info.value.code == "io_error"
    assert "zarr.json" in str(info.value)
    assert not (root / "zarr.json").exists()
    assert not list(root.glob("zarr.json.*.tmp")), "the temporary root is removed whatever the outcome"


def test_rival_root_wins_R9_9(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A root that appears during the save is never overwritten: first wins."""
    root = tmp_path / "ckpt"
    rival = b'{"rival": true}'
    real = LocalStorage.publish_root

    def publish(self: LocalStorage, data: bytes, save_id: str) -> None:
        (root / "zarr.json").write_bytes(rival)
        real(self, data, save_id)

    monkeypatch.setattr(LocalStorage, "publish_root", publish)
    with pytest.raises(tessera.CheckpointExistsError, match="another writer committed first") as info:
        tessera.save(_state(), root)
    assert info.value.code == "already_exists"
    assert (root / "zarr.json").read_bytes() == rival
    assert not list(root.glob("zarr.json.*.tmp"))


def test_concurrent_saves_one_winner_R9_4(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    states = [{"w": torch.full((64,), float(i)), "who": i} for i in range(6)]
    results: list[Any] = [None] * len(states)
    barrier = threading.Barrier(len(states))

    def run(i: int) -> None:
        barrier.wait()
        try:
            tessera.save(states[i], root, options=tessera.SaveOptions(chunk_bytes=32, threads=1))
            results[i] = "ok"
        except tessera.TesseraError as exc:
            results[i] = exc.code

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(states))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1, results
    assert set(results) == {"ok", "already_exists"}
    winner = results.index("ok")
    loaded = tessera.load(root)
    assert loaded["who"] == winner
    assert torch.equal(loaded["w"], states[winner]["w"])
    assert tessera.verify(root).ok


def test_failed_save_keeps_the_previous_checkpoint_R10_3(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = tessera.RunDirectory(tmp_path / "run", keep_last=1)
    first = _state()
    run.save(first, step=1, options=tessera.SaveOptions(chunk_bytes=24))
    monkeypatch.setattr(LocalStorage, "write_file", _failing_write_file(2))
    second = _state()
    second["lr"] = 0.2
    with pytest.raises(tessera.StorageError):
        run.save(second, step=2, options=tessera.SaveOptions(chunk_bytes=24, threads=1))
    monkeypatch.undo()
    assert run.latest() == tmp_path / "run" / "step-00000001"
    assert (tmp_path / "run" / "latest").read_text() == "step-00000001\n"
    assert_tree_bit_equal(tessera.load(run.latest()), first)
    # The failed save removed what it wrote (R9.7); retention had nothing to do.
    infos = {c.name: (c.committed, c.latest) for c in run.checkpoints()}
    assert infos == {"step-00000001": (True, True)}
    assert run.apply_retention() == []
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000001"]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, tessera
    from tessera.storage.local import LocalStorage

    root, ready = sys.argv[1], sys.argv[2]
    real = LocalStorage.write_file
    written = [0]

    def write_file(self, path, buffers):
        real(self, path, buffers)
        if "/c/" in path:
            written[0] += 1
            if written[0] == 20:
                open(ready, "w").close()
                time.sleep(120)

    LocalStorage.write_file = write_file
    options = tessera.SaveOptions(chunk_bytes=1024, threads=1)
    tessera.save({"big": torch.arange(50_000, dtype=torch.float32)}, root, options=options)
    """
)


def test_kill_9_during_save_leaves_it_uncommitted_R9_7(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(root), str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the save never got going"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(list((root / "big" / "c").iterdir())) >= 20
    with pytest.raises(tessera.UncommittedCheckpointError, match="claimed"):
        tessera.load(root)
    assert [p.code for p in tessera.verify(root).problems] == ["uncommitted"]
    with pytest.raises(tessera.CheckpointExistsError):
        tessera.save({"x": torch.ones(1)}, root)
