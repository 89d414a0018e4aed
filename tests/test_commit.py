"""The commit protocol (§9): claim, durable writes, root published last with link, first-wins.

The power-loss tests record every file-system call of a real save (traced with
``strace`` in a child process, see ``tests/syscalls.py``), replay them into a
model of a POSIX file system in which unsynced data and unsynced directory
entries are lost, and check the checkpoint that survives a power cut after
every single call. Failures of the medium come from a fault-injecting storage
(:class:`tessera.testing.FaultyStorage`) passed to the save.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tessera
import tessera.storage.local
import torch
from tessera.storage.base import Storage
from tessera.storage.local import LocalStorage
from tessera.testing import CHUNKS, FaultyStorage, RecordingStorage

from .conftest import assert_tree_bit_equal, random_tensor
from .syscalls import Syscall, traced_syscalls

# -- recording --------------------------------------------------------------------------------

Op = tuple[Any, ...]


def file_ops(calls: list[Syscall], under: Path) -> list[Op]:
    """The traced calls that change files under ``under``, as the model's operations, in order."""
    base = str(under)

    def inside(path: str | None) -> bool:
        return path is not None and (path == base or path.startswith(base + "/"))

    log: list[Op] = []
    for c in calls:
        if not c.ok:
            continue
        if c.name in ("openat", "open", "creat"):
            path = c.result_path()
            if "O_CREAT" in c.text and inside(path):
                log.append(("create", path))
        elif c.name in ("write", "pwrite64") and inside(c.fd_path):
            log.append(("write", c.fd_path, c.data()[: int(c.result)]))
        elif c.name in ("fsync", "fdatasync") and inside(c.fd_path):
            assert c.fd_path is not None
            log.append(("fsync_dir" if os.path.isdir(c.fd_path) else "fsync", c.fd_path))
        elif c.name in ("mkdir", "mkdirat") and inside(c.strings()[0]):
            log.append(("mkdir", c.strings()[0]))
        elif c.name in ("link", "linkat") and inside(c.strings()[1]):
            log.append(("link", *c.strings()[:2]))
        elif c.name in ("unlink", "unlinkat"):
            name = c.strings()[0]
            path = os.path.join(c.fd_path, name) if c.fd_path and not name.startswith("/") else name
            if inside(path):
                log.append(("unlink", path))
        elif c.name.startswith("rename") and inside(c.strings()[1]):
            log.append(("replace", *c.strings()[:2]))
    return log


SAVE = """
import os, tessera
from tessera.storage.local import LocalStorage
from tessera.testing import StorageWrapper
from tests.test_commit import _state
{setup}
tessera.save(_state(), {storage}, options=tessera.SaveOptions(chunk_bytes=24, threads=1))
"""


def _save_traced(root: Path, *, setup: str = "", storage: str = "{root!r}") -> list[Syscall]:
    """The system calls of ``tessera.save(_state(), root, ...)`` in a child process."""
    code = SAVE.format(setup=setup, storage=storage.format(root=str(root)))
    return traced_syscalls(code)


def _save_recorded(root: Path, **options: str) -> list[Op]:
    return file_ops(_save_traced(root, **options), root.parent)


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


# -- the order of calls -----------------------------------------------------------------------


def test_commit_order_R9_1_R9_8_R9_10(tmp_path: Path) -> None:
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


def test_every_file_is_created_exclusively_R9_5(tmp_path: Path) -> None:
    root = str(tmp_path / "c")
    calls = _save_traced(tmp_path / "c")
    creates = [c for c in calls if "O_CREAT" in c.text and (c.result_path() or "").startswith(root)]
    assert len(creates) > 10
    assert all("O_EXCL" in c.text for c in creates), [c.text for c in creates if "O_EXCL" not in c.text]


# -- power loss ---------------------------------------------------------------------------------


def test_power_loss_at_every_call_R9_8(tmp_path: Path) -> None:
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


NO_SYNC = """
class NoSync(StorageWrapper):  # a deliberately wrong storage: sync does nothing
    def sync(self):
        pass
"""


def test_power_loss_model_catches_missing_directory_fsync(tmp_path: Path) -> None:
    """The simulation is not vacuous: a writer that skips the directory fsyncs is caught."""
    root = tmp_path / "ckpt"
    log = _save_recorded(root, setup=NO_SYNC, storage="NoSync(LocalStorage({root!r}))")
    outcomes = replay(log, root, _state(), tmp_path / "cuts", scenarios=("synced", "root-leaks"))
    assert any(r.startswith("BROKEN") for r in outcomes["root-leaks"])
    assert any(r.startswith("BROKEN") for r in outcomes["synced"])


def test_power_loss_model_catches_missing_file_fsync(tmp_path: Path) -> None:
    """... and so is a writer that never fsyncs its files (it survives kill -9, not power loss):
    the log of a real save with its file fsyncs taken out."""
    root = tmp_path / "ckpt"
    log = [op for op in _save_recorded(root) if op[0] != "fsync"]
    assert tessera.verify(root).ok  # no crash, no problem
    outcomes = replay(log, root, _state(), tmp_path / "cuts", scenarios=("metadata-only",))
    assert outcomes["metadata-only"][-1].startswith("BROKEN")


REPLACE_PUBLISH = """
class ReplacePublish(StorageWrapper):  # a deliberately wrong storage: publishes with rename
    def publish_root(self, data, save_id):
        temporary = f"zarr.json.{save_id}.tmp"
        self.inner.write_file(temporary, [data])
        os.replace(os.path.join(self.location, temporary), os.path.join(self.location, "zarr.json"))
"""


def test_power_loss_model_catches_rename_publication(tmp_path: Path) -> None:
    """Publishing with os.replace is not first-wins (R9.10); the log shows it."""
    log = _save_recorded(
        tmp_path / "ckpt", setup=REPLACE_PUBLISH, storage="ReplacePublish(LocalStorage({root!r}))"
    )
    assert [op[0] for op in log if op[0] in ("replace", "link")] == ["replace"]


# -- failures during the save -------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_failed_save_removes_what_it_wrote_R9_7(tmp_path: Path, fail_at: int) -> None:
    root = tmp_path / "ckpt"
    full = FaultyStorage(LocalStorage(root)).fail_write(nth=fail_at, matching=CHUNKS)
    with pytest.raises(tessera.StorageError, match="injected fault") as info:
        tessera.save(_state(), full, options=tessera.SaveOptions(chunk_bytes=24, threads=1))
    assert info.value.code == "io_error"
    assert not root.exists(), "the failed save left its partial checkpoint behind"
    tessera.save(_state(), root)  # the path is free again
    assert_tree_bit_equal(tessera.load(root), _state())


def test_failed_save_removes_only_its_own_files_R9_7(tmp_path: Path) -> None:
    """A claim that is not the failed save's own (replaced meanwhile) is never cleaned up."""
    root = tmp_path / "ckpt"

    def rival_claims(inner: Storage, path: str) -> None:
        (root / ".tessera-claim.json").write_text('{"save_id": "someone-else"}')

    with pytest.raises(tessera.StorageError, match="injected fault"):
        tessera.save(
            _state(), FaultyStorage(LocalStorage(root)).fail_publish(before=rival_claims),
            options=tessera.SaveOptions(chunk_bytes=24),
        )
    assert (root / ".tessera-claim.json").read_text() == '{"save_id": "someone-else"}'
    assert (root / "model").is_dir()
    # A publication lost to a rival's committed root (already_exists) removes nothing either.
    other = tmp_path / "other"
    tessera.save(_state(), other)
    save_id = tessera.open(other).manifest.save_id
    LocalStorage(other).remove_unpublished(save_id)
    assert_tree_bit_equal(tessera.load(other), _state())


def test_failed_publication_is_an_io_error_R9_10(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    storage = RecordingStorage(FaultyStorage(LocalStorage(root)).fail_publish())
    with pytest.raises(tessera.StorageError) as info:
        tessera.save(_state(), storage)
    assert info.value.code == "io_error"
    assert "zarr.json" in str(info.value)
    assert [c.op for c in storage.ops("publish_root", "remove_unpublished")] == [
        "publish_root",
        "remove_unpublished",
    ]
    assert not root.exists(), "the failed save removed what it wrote (R9.7)"


def test_rival_root_wins_R9_9(tmp_path: Path) -> None:
    """A root that appears during the save is never overwritten: first wins."""
    root = tmp_path / "ckpt"
    rival = b'{"rival": true}'
    with pytest.raises(tessera.CheckpointExistsError, match="another writer committed first") as info:
        tessera.save(_state(), FaultyStorage(LocalStorage(root)).rival_publishes(rival))
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


def test_failed_save_keeps_the_previous_checkpoint_R10_3(tmp_path: Path) -> None:
    run = tessera.RunDirectory(tmp_path / "run", keep_last=1)
    first = _state()
    run.save(first, step=1, options=tessera.SaveOptions(chunk_bytes=24))
    full = tessera.RunDirectory(
        FaultyStorage(LocalStorage(tmp_path / "run")).fail_write(nth=2, matching=CHUNKS), keep_last=1
    )
    second = _state()
    second["lr"] = 0.2
    with pytest.raises(tessera.StorageError):
        full.save(second, step=2, options=tessera.SaveOptions(chunk_bytes=24, threads=1))
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
    from tessera.testing import StorageWrapper

    root, ready = sys.argv[1], sys.argv[2]
    written = [0]

    class Stall(StorageWrapper):  # the 20th chunk written, the save stops to be killed
        def write_file(self, path, buffers):
            super().write_file(path, buffers)
            if "/c/" in path:
                written[0] += 1
                if written[0] == 20:
                    open(ready, "w").close()
                    time.sleep(120)

    state = {"big": torch.arange(50_000, dtype=torch.float32)}
    tessera.save(state, Stall(LocalStorage(root)), options=tessera.SaveOptions(chunk_bytes=1024, threads=1))
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
