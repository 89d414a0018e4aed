"""Special files, symlinks and over-long names where a checkpoint's files should be (spec R11.3,
issue 15 point 1).

A FIFO or a device node where a regular file is expected used to block ``open``, ``load`` and
``verify`` forever. Every file is now opened without blocking and checked with ``fstat`` before
any byte is read, so each case is a ``bad_key`` error at once. Every call here runs under a
watchdog so that a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch

from .conftest import edit_manifest

STATE = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}}
WATCHDOG_S = 5.0


def _bounded(call: Callable[[], Any]) -> Any:
    """The result of ``call`` or the exception it raised; fails the test if it blocks."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WATCHDOG_S)
    assert not thread.is_alive(), f"blocked for more than {WATCHDOG_S} s"
    return outcome[0]


def _refused(call: Callable[[], Any], code: str) -> tessera.TesseraError:
    error = _bounded(call)
    assert isinstance(error, tessera.TesseraError), repr(error)
    assert error.code == code, error
    return error


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()
    make(path)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("creating a device node needs privileges")


def _socket(path: Path) -> None:
    if len(str(path)) > 100:
        pytest.skip("the path is too long for a UNIX socket")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays


SPECIALS = {"fifo": _fifo, "device": _device, "socket": _socket}
FILES = {
    "root zarr.json": "zarr.json",
    "array zarr.json": "model/w/zarr.json",
    "chunk": "model/w/c/0/0",
}


@pytest.fixture
def good(tmp_path: Path) -> Path:
    tessera.save(STATE, tmp_path / "ck")
    return tmp_path / "ck"


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", FILES)
def test_special_file_is_refused_unread(good: Path, where: str, special: str) -> None:
    """R11.3: a FIFO, device node or socket where a file is expected: ``bad_key``, at once,
    from load and from verify (which reports it and goes on)."""
    _replace(good / FILES[where], SPECIALS[special])
    error = _refused(lambda: tessera.load(good), "bad_key")
    assert "regular file" in str(error) or "socket" in str(error)
    report = _bounded(lambda: tessera.verify(good))
    assert "bad_key" in [p.code for p in report.problems], report.problems


@pytest.mark.parametrize("special", SPECIALS)
def test_special_claim_file_is_reported_by_verify(good: Path, special: str) -> None:
    _replace(good / ".tessera-claim.json", SPECIALS[special])
    report = _bounded(lambda: tessera.verify(good))
    assert [p.code for p in report.problems] == ["bad_key"], report.problems


def test_special_root_is_not_a_checkpoint(tmp_path: Path) -> None:
    """A root that is a FIFO, or a symlink to a device, is no checkpoint; nothing blocks."""
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/zero", tmp_path / "zero")
    for name in ("fifo", "zero"):
        _refused(lambda name=name: tessera.open(tmp_path / name), "not_found")
        _refused(lambda name=name: tessera.load(tmp_path / name), "not_found")
        report = _bounded(lambda name=name: tessera.verify(tmp_path / name))
        assert [p.code for p in report.problems] == ["not_found"]


def test_directory_where_a_chunk_should_be_is_a_missing_chunk(good: Path) -> None:
    _replace(good / "model/w/c/0/0", lambda p: p.mkdir())
    _refused(lambda: tessera.load(good), "missing_chunk")


def test_symlinked_chunk_and_directory_leaving_the_root_are_refused(good: Path, tmp_path: Path) -> None:
    """R11.3: a chunk that is a symlink, and an array directory that resolves outside the root."""
    outside = tmp_path / "outside"
    outside.mkdir()
    chunk = good / "model/b/c/0"
    (outside / "0").write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(outside / "0")
    _refused(lambda: tessera.load(good), "bad_key")
    chunk.unlink()
    (good / "model/b/c").rmdir()
    (good / "model/b/c").symlink_to(outside)
    _refused(lambda: tessera.load(good), "bad_key")
    report = _bounded(lambda: tessera.verify(good))
    assert "bad_key" in [p.code for p in report.problems]


def test_over_long_name_is_bad_key(good: Path) -> None:
    """A path component longer than the file system allows (ENAMETOOLONG): ``bad_key``."""
    long = "w" * 300

    def rename(manifest: dict[str, Any]) -> None:
        for entry in manifest["entries"]:
            if entry["path"] == "model/w":
                entry["path"] = f"model/{long}"
                entry["key"] = ["model", long]

    edit_manifest(good, rename)
    _refused(lambda: tessera.load(good), "bad_key")
    report = _bounded(lambda: tessera.verify(good))
    assert "bad_key" in [p.code for p in report.problems]


@pytest.mark.parametrize("root", ["with\x00nul", "x" * 5000], ids=["nul", "too-long"])
def test_unusable_root_path_is_bad_key(tmp_path: Path, root: str) -> None:
    """A root path no file system can name: ``bad_key``, never a bare ``ValueError``/``OSError``."""
    error = _refused(lambda: tessera.load(tmp_path / root), "bad_key")
    assert len(str(error)) < 400
