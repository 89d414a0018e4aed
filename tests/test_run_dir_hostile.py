"""Run directories holding anything (§10, issue 15): hostile ``latest``, symlinked steps, leftovers.

Real FIFOs, symlinks, sparse files and subprocesses: every case is a clean
``TesseraError`` (or a ``TesseraWarning`` once a save has committed), never a
hang, never a read beyond the bound, never a file's content in a message, and
nothing outside the run directory is ever touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera import RunDirectory
from tessera.cli.main import main
from tessera.storage.base import FileMissingError, Storage
from tessera.storage.local import LocalStorage
from tessera.testing import FaultyStorage

from .conftest import assert_tree_bit_equal

SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.full((3,), float(step)), "step": step}


@pytest.fixture
def run(tmp_path: Path) -> RunDirectory:
    run = RunDirectory(tmp_path / "run", keep_last=1)
    run.save(_state(1), step=1)
    return run


def _replace_latest(run: RunDirectory, make: Callable[[Path], None]) -> None:
    (run.root / "latest").unlink()
    make(run.root / "latest")


def _secret_file(tmp_path: Path) -> Path:
    key = tmp_path / "id_ed25519"
    key.write_text(SECRET + "\n")
    return key


HOSTILE_LATEST: dict[str, Callable[[Path, Path], None]] = {
    "fifo": lambda latest, tmp: os.mkfifo(latest),
    "directory": lambda latest, tmp: latest.mkdir(),
    "symlink to a private key": lambda latest, tmp: latest.symlink_to(_secret_file(tmp)),
    "symlink to /dev/zero": lambda latest, tmp: latest.symlink_to("/dev/zero"),
    "symlink to a step": lambda latest, tmp: latest.symlink_to(latest.parent / "step-00000001"),
    "100 MB sparse file": lambda latest, tmp: os.truncate(latest.open("w").name, 100 << 20),
    "private key copied in": lambda latest, tmp: latest.write_text(SECRET + "\n"),
    "invalid UTF-8": lambda latest, tmp: latest.write_bytes(b"step-\xff\xfe\n"),
    "over-long name": lambda latest, tmp: latest.write_text("s" * 300 + "\n"),
    "a whole page of lines": lambda latest, tmp: latest.write_text("step-00000001\n" * 50),
}


@pytest.mark.parametrize("case", list(HOSTILE_LATEST))
def test_hostile_latest_is_bad_key_without_its_content_R10_2(
    run: RunDirectory, tmp_path: Path, case: str
) -> None:
    _replace_latest(run, lambda latest: HOSTILE_LATEST[case](latest, tmp_path))
    start = time.monotonic()
    with pytest.raises(tessera.InvalidKeyError) as info:
        run.latest()
    assert time.monotonic() - start < 5
    assert info.value.code == "bad_key"
    assert "BEGIN" not in str(info.value) and "\\xff" not in str(info.value)
    assert "latest" in str(info.value)
    # Listing still works (latest is just unusable), and nothing outside was touched.
    assert [(c.name, c.committed, c.latest) for c in run.checkpoints()] == [("step-00000001", True, False)]


def test_a_bounded_read_never_reads_past_its_bound(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(1 << 30)  # sparse: a read of it whole would take a GiB
    storage = LocalStorage(tmp_path)
    start = time.monotonic()
    with pytest.raises(tessera.LimitExceededError, match="over the limit of 256"):
        storage.read_file("big", 256)
    assert time.monotonic() - start < 1
    with pytest.raises(FileMissingError):
        storage.read_file("absent", 256)


def test_device_latest_is_bad_key_R10_2(run: RunDirectory) -> None:
    try:
        _replace_latest(run, lambda latest: os.mknod(latest, 0o600 | 0o020000, os.makedev(1, 5)))
    except PermissionError:
        pytest.skip("creating a device node needs privileges")
    with pytest.raises(tessera.InvalidKeyError, match="a device"):
        run.latest()


def test_latest_naming_a_symlink_out_of_the_run_is_bad_key_R10_2(run: RunDirectory, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    tessera.save(_state(7), outside)
    (run.root / "step-00000007").symlink_to(outside)
    (run.root / "latest").write_text("step-00000007\n")
    with pytest.raises(tessera.InvalidKeyError, match="symbolic link"):
        run.latest()


def test_overlong_run_directory_name_is_an_io_error(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / ("r" * 300))
    with pytest.raises(tessera.StorageError) as info:
        run.latest()
    assert info.value.code == "io_error"
    with pytest.raises(tessera.StorageError, match="File name too long"):
        run.checkpoints()
    with pytest.raises(tessera.StorageError, match="File name too long"):
        run.save(_state(1), step=1)


def test_a_nul_in_the_run_directory_path_is_a_value_error(tmp_path: Path) -> None:
    """An argument no file system accepts, refused as ``open()`` refuses it: not a format error."""
    with pytest.raises(ValueError, match="NUL") as info:
        RunDirectory(f"{tmp_path}/run\0x")
    assert not isinstance(info.value, tessera.TesseraError)


# -- symlinked steps ------------------------------------------------------------------------------


def test_retention_never_follows_a_symlinked_step_R10_6(tmp_path: Path) -> None:
    """The issue's data loss: a step symlinked to a checkpoint elsewhere lost its root zarr.json."""
    outside = tmp_path / "precious"
    tessera.save(_state(0), outside)
    run = RunDirectory(tmp_path / "run", keep_last=1)
    run.root.mkdir()
    (run.root / "step-00000000").symlink_to(outside)
    with pytest.warns(tessera.TesseraWarning, match="step-00000000 is a symbolic link; skipped"):
        for step in (1, 2, 3):
            run.save(_state(step), step=step)
        assert [c.step for c in run.checkpoints()] == [3]
    assert (run.root / "step-00000000").is_symlink()
    assert_tree_bit_equal(tessera.load(outside), _state(0))
    with pytest.raises(tessera.InvalidKeyError, match="symbolic link"):
        run.discard(0)
    with pytest.raises(tessera.InvalidKeyError, match="symbolic link"):
        run.save(_state(0), step=0)
    assert_tree_bit_equal(tessera.load(outside), _state(0))


# -- failures after the commit --------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_committed_save_succeeds_when_latest_cannot_move_R10_3(
    run: RunDirectory, asynchronous: bool
) -> None:
    full = RunDirectory(FaultyStorage(LocalStorage(run.root)).fail_replace(), keep_last=1)
    with pytest.warns(tessera.TesseraWarning, match="step-00000002 is committed, but could not move latest"):
        manifest = full.save_async(_state(2), step=2).wait() if asynchronous else full.save(_state(2), step=2)
    assert manifest.metadata == {"step": 2}
    assert run.latest() == run.root / "step-00000001"  # still the previous one, still loadable
    assert_tree_bit_equal(tessera.load(run.root / "step-00000002"), _state(2))
    run.save(_state(3), step=3)
    assert run.latest() == run.root / "step-00000003"
    assert [c.step for c in run.checkpoints()] == [3]


def test_latest_only_moves_forward_R10_8(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.save(_state(5), step=5)
    run.save(_state(3), step=3)  # a late save of an older step: committed, latest stays
    assert run.latest() == run.root / "step-00000005"
    assert [(c.step, c.latest) for c in run.checkpoints()] == [(3, False), (5, True)]
    # A latest naming a higher step that is not committed any more is replaced.
    (run.root / "latest").write_text("step-00000009\n")
    run.save(_state(6), step=6)
    assert run.latest() == run.root / "step-00000006"


# -- leftovers ------------------------------------------------------------------------------------


def _leftover(run: RunDirectory, step: int, *, lock_file: bool) -> Path:
    """What a killed save leaves: a claimed directory with some files, and its lock file."""
    path = run.root / run.name_of(step)
    (path / "w" / "c").mkdir(parents=True)
    (path / ".tessera-claim.json").write_text('{"save_id": "dead"}')
    (path / "w" / "c" / "0").write_bytes(b"\0" * 64)
    if lock_file:
        (run.root / f".{path.name}.lock").touch()
    return path


def test_saving_over_a_leftover_says_how_to_clear_it(run: RunDirectory) -> None:
    path = _leftover(run, 2, lock_file=False)
    with pytest.raises(tessera.CheckpointExistsError, match=r"RunDirectory.discard\(2\)"):
        run.save(_state(2), step=2)
    # The refused save did not mark the plain save's directory as a run-directory leftover.
    assert not (run.root / ".step-00000002.lock").exists()
    run.save(_state(3), step=3)
    assert path.exists(), "retention deleted an unmarked uncommitted directory"
    run.discard(2)
    assert not path.exists()
    run.save(_state(2), step=2)
    assert run.latest() == run.root / "step-00000003"
    with pytest.raises(tessera.CheckpointExistsError, match="is committed"):
        run.discard(2)
    with pytest.raises(tessera.CheckpointNotFoundError):
        run.discard(99)
    assert_tree_bit_equal(tessera.load(path), _state(2))


_HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def lock_holder() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def hold(path: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_retention_removes_dead_leftovers_below_latest_only_R10_10(
    run: RunDirectory, lock_holder: Callable[[Path], subprocess.Popen[str]]
) -> None:
    foreign = _leftover(run, 2, lock_file=False)  # a plain save's, maybe live: never deleted
    live = _leftover(run, 3, lock_file=True)  # its saver is alive (holds the lock)
    dead = _leftover(run, 4, lock_file=True)  # its saver was killed
    newer = _leftover(run, 9, lock_file=True)  # above latest: may be the newest save, in flight
    holder = lock_holder(run.root / ".step-00000003.lock")
    run.save(_state(5), step=5)
    assert [(c.step, c.committed) for c in run.checkpoints()] == [
        (2, False),
        (3, False),
        (5, True),
        (9, False),
    ]
    assert not dead.exists() and not (run.root / ".step-00000004.lock").exists()
    assert foreign.exists() and live.exists() and newer.exists()
    holder.kill()
    holder.wait()
    assert run.apply_retention() == ["step-00000003"]
    assert foreign.exists() and newer.exists()
    with pytest.raises(tessera.CheckpointExistsError, match="another process"):
        lock_holder(run.root / ".step-00000009.lock") and run.discard(9)
    assert newer.exists()


def test_a_step_being_saved_elsewhere_is_refused(
    run: RunDirectory, lock_holder: Callable[[Path], subprocess.Popen[str]]
) -> None:
    lock_holder(run.root / ".step-00000002.lock")
    with pytest.raises(tessera.CheckpointExistsError, match="being saved or deleted by another process"):
        run.save(_state(2), step=2)
    assert run.latest() == run.root / "step-00000001"


def test_saving_over_a_dead_saves_leftover_removes_it_R10_11(
    run: RunDirectory, lock_holder: Callable[[Path], subprocess.Popen[str]]
) -> None:
    """A killed run-directory save left its directory and lock file: saving the step again
    removes the leftover (nothing of it stays) and commits; while another process holds the
    lock, the save is refused and the leftover untouched."""
    path = _leftover(run, 2, lock_file=True)
    (path / "opt" / "c").mkdir(parents=True)
    (path / "opt" / "c" / "0").write_bytes(b"\1" * 64)  # an array the new save does not have
    holder = lock_holder(run.root / ".step-00000002.lock")  # a live saver of step 2
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(tessera.CheckpointExistsError, match="another process") as refused:
        run.save(_state(2), step=2)
    assert refused.value.code == "already_exists"
    assert sorted(p.name for p in path.rglob("*")) == before
    holder.kill()
    holder.wait()  # the saver is gone: its lock can be taken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.save(_state(2), step=2)
    assert run.latest() == path
    assert_tree_bit_equal(tessera.load(path), _state(2))
    fresh = run.root.parent / "fresh"
    tessera.save(_state(2), fresh)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    assert files == sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*")), "a leftover file stayed"
    assert sorted(os.listdir(run.root)) == ["latest", "step-00000002"]


def test_a_committed_step_whose_saver_died_becomes_latest_R10_11(run: RunDirectory) -> None:
    """A save killed after its commit, before moving latest: saving the step again is refused
    (checkpoints are never overwritten) and latest moves forward to it; without a lock file
    (a plain save committed it) latest stays."""
    tessera.save(_state(2), run.root / "step-00000002")
    with pytest.raises(tessera.CheckpointExistsError, match="load it, or save another step"):
        run.save(_state(2), step=2)
    assert run.latest() == run.root / "step-00000001"
    tessera.save(_state(3), run.root / "step-00000003")
    (run.root / ".step-00000003.lock").touch()  # its saver was killed holding the lock
    with pytest.raises(tessera.CheckpointExistsError, match="names it now: resume from it") as refused:
        run.save(_state(3), step=3)
    assert refused.value.code == "already_exists"
    assert run.latest() == run.root / "step-00000003"
    assert not (run.root / ".step-00000003.lock").exists()
    assert_tree_bit_equal(tessera.load(run.latest()), _state(3))


def test_retention_skips_a_checkpoint_already_deleted(run: RunDirectory) -> None:
    """Another process deleted it between the listing and the deletion: not an error."""
    run.keep_last = None
    run.save(_state(2), step=2)
    run.save(_state(3), step=3)

    def racing(inner: Storage, name: str) -> None:
        import shutil

        shutil.rmtree(Path(inner.location) / name)  # the other process wins the race

    raced = RunDirectory(FaultyStorage(LocalStorage(run.root)).before_remove(racing), keep_last=1)
    assert raced.apply_retention() == ["step-00000001", "step-00000002"]
    assert [c.step for c in run.checkpoints()] == [3]


# -- the command line -----------------------------------------------------------------------------

COMMANDS = [["ls"], ["inspect"], ["verify"], ["verify", "--all"], ["ls", "--json"], ["verify", "--json"]]


@pytest.mark.parametrize("case", list(HOSTILE_LATEST))
def test_cli_on_a_hostile_latest_prints_one_line(
    run: RunDirectory, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _replace_latest(run, lambda latest: HOSTILE_LATEST[case](latest, tmp_path))
    for command in COMMANDS:
        status = main([*command, str(run.root)])
        out, err = capsys.readouterr()
        assert SECRET[:20] not in out + err and "Traceback" not in err, command
        if command[0] in ("inspect",) or command == ["verify"] or command == ["verify", "--json"]:
            assert status == 2, (command, out, err)
            assert err.startswith("tessera: error[bad_key]: ") and err.count("\n") == 1, (command, err)


def test_cli_never_prints_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Special files, missing paths, over-long names, symlinked steps: one line, never a traceback."""
    run = RunDirectory(tmp_path / "run")
    run.save(_state(1), step=1)
    (run.root / "step-00000002").symlink_to(tmp_path / "nowhere")
    os.mkfifo(run.root / "step-00000003")
    (run.root / "latest").unlink()
    (run.root / "latest").symlink_to(_secret_file(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = [run.root, tmp_path / "absent", tmp_path / ("n" * 300), fifo, run.root / "step-00000002"]
    for path in paths:
        for command in COMMANDS:
            status = main([*command, str(path)])
            out, err = capsys.readouterr()
            assert SECRET[:20] not in out + err
            if status == 2:  # an error: exactly one line (warnings aside), with its code
                lines = [line for line in err.splitlines() if not line.startswith("tessera: warning")]
                assert len(lines) == 1 and lines[0].startswith("tessera"), (command, path, err)
                assert "error[internal]" not in err, (command, path, err)
    # And through the real program (two runs: a Python start costs a second or two here).
    for command in (["ls"], ["verify", "--all"]):
        proc = subprocess.run(
            [sys.executable, "-m", "tessera.cli", *command, str(run.root)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Traceback" not in proc.stderr and SECRET[:20] not in proc.stdout + proc.stderr
        assert "step-00000002 is a symbolic link; skipped" in proc.stderr
