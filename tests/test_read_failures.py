"""A failed read ends, promptly, with the first error (issue 15, point 3).

A checkpoint of 1,500 tensors with one flipped or one deleted chunk made ``load`` hang
forever in about one trial in six: on the first error the thread pool's
``shutdown(cancel_futures=True)`` drained its queue while the workers still took items
from it, so it could cancel an array's queued ``zarr.json`` check while a worker took the
array's next chunk read, which then waited in ``_Gate.run`` for that check forever, and the
shutdown joined that worker forever. Every trial here runs under a watchdog, so that a
regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tessera
import torch
from tessera.util.parallel import run_all

TENSORS = 1500
TRIALS = int(os.environ.get("TESSERA_DEADLOCK_TRIALS", "17"))
"""Trials of each of the six CPU cases (a flipped chunk, a deleted chunk or an altered array
``zarr.json``; with or without a template): 102 loads in all, 30-40 s on 2 shared cores
(before the fix, 12 of 40 such loads hung). ``TESSERA_DEADLOCK_TRIALS=100`` runs the issue's
100 trials of each case for a release check."""
WATCHDOG_S = 5.0


def _state() -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.full((4,), float(i)) for i in range(TENSORS)}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 1,500-tensor checkpoint three times: one chunk flipped, one chunk deleted, one
    array ``zarr.json`` altered (the damaged array in the middle, where checks and chunk reads
    of other arrays interleave)."""
    base = tmp_path_factory.mktemp("many")
    tessera.save(_state(), base / "good")
    out = {}
    for kind in ("flip", "delete", "document"):
        path = base / kind
        shutil.copytree(base / "good", path)
        array = path / f"layer{TENSORS // 2}.weight"
        chunk = array / "c" / "0"
        if kind == "document":
            doc = json.loads((array / "zarr.json").read_text())
            doc["fill_value"] = 1.0
            (array / "zarr.json").write_text(json.dumps(doc))
        elif kind == "flip":
            data = bytearray(chunk.read_bytes())
            data[1] ^= 0x10
            chunk.write_bytes(bytes(data))
        else:
            chunk.unlink()
        out[kind] = path
    return out


def _within_watchdog(call: Callable[[], None]) -> BaseException | None:
    """Run ``call`` in a thread; fail the test (with every thread's stack) if it outlives the watchdog."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WATCHDOG_S)
    if thread.is_alive():
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"the load did not end within {WATCHDOG_S} s (a hang)")
    return outcome[0]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "template",
    [None, "cpu", pytest.param("cuda", marks=CUDA)],
    ids=["new-dict", "template", "cuda-template"],
)
@pytest.mark.parametrize(
    ("kind", "code"),
    [("flip", "checksum_mismatch"), ("delete", "missing_chunk"), ("document", "inconsistent")],
)
def test_damaged_load_fails_within_bound_every_trial(
    damaged: dict[str, Path], kind: str, code: str, template: str | None
) -> None:
    """Issue 15: 1,500 tensors, one damaged chunk: every trial raises the chunk's error in 5 s
    (into a new dict, into CPU tensors, and into GPU tensors through the staging copies)."""
    path = damaged[kind]
    names = list(_state())
    for _ in range(TRIALS):

        def load() -> None:
            tessera.load(path, {n: torch.empty(4, device=template) for n in names} if template else None)

        error = _within_watchdog(load)
        assert isinstance(error, tessera.TesseraError), error
        assert error.code == code
        assert f"layer{TENSORS // 2}.weight" in str(error)


def test_run_all_stops_taking_tasks_after_a_failure() -> None:
    """The first failure ends the pass after at most one more task per thread; the tasks come
    lazily, so an endless supply of them is no problem (issue 15, point 2)."""
    started: list[int] = []
    lock = threading.Lock()

    def tasks() -> Iterator[Callable[[], None]]:
        n = 0
        while True:
            n += 1

            def task(n: int = n) -> None:
                with lock:
                    started.append(n)
                if n == 10:
                    raise tessera.MissingChunkError("chunk 10 is missing")

            yield task

    with pytest.raises(tessera.MissingChunkError, match="chunk 10"):
        run_all(tasks(), threads=4)
    assert len(started) <= 10 + 4


def test_run_all_waits_on_running_work_only() -> None:
    """A task waiting for work another running task does ends with the pass when that one
    fails: a failing pass never leaves a thread waiting (the shape of the issue-15 hang)."""
    release = threading.Event()

    def failing() -> None:
        release.set()
        raise tessera.ChecksumMismatchError("bad chunk")

    def waiting() -> None:
        assert release.wait(WATCHDOG_S)

    def run() -> None:
        run_all([waiting, failing, *[waiting] * 50], threads=3)

    error = _within_watchdog(run)
    assert isinstance(error, tessera.ChecksumMismatchError)


def test_run_all_raises_an_error_of_the_task_iterable() -> None:
    def tasks() -> Iterator[Callable[[], None]]:
        yield lambda: None
        raise tessera.LimitExceededError("too many chunks")

    with pytest.raises(tessera.LimitExceededError):
        run_all(tasks(), threads=2)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    tessera.save({"w": torch.arange(8.0), "g": {"b": torch.ones(3)}}, tmp_path / "ck")
    return tmp_path / "ck"


def test_checkpoint_deleted_while_read_says_so(small: Path) -> None:
    """A checkpoint deleted under an open handle (retention, another process): ``not_found``
    naming the deletion, not ``missing_chunk`` (issue 15, spec §13)."""
    ck = tessera.open(small)
    shutil.rmtree(small)
    with pytest.raises(tessera.CheckpointDeletedError, match="deleted while being read") as info:
        ck.read("w")
    assert info.value.code == "not_found"
    assert isinstance(info.value, tessera.CheckpointNotFoundError)


def test_array_document_gone_with_the_root_is_a_deletion(small: Path) -> None:
    """Deletion order does not matter: the array's zarr.json gone with the root, chunks left."""
    ck = tessera.open(small)
    (small / "zarr.json").unlink()
    (small / "g" / "b" / "zarr.json").unlink()
    with pytest.raises(tessera.CheckpointDeletedError):
        ck.read("g/b")


def test_chunk_missing_with_the_root_present_is_still_a_missing_chunk(small: Path) -> None:
    ck = tessera.open(small)
    (small / "w" / "c" / "0").unlink()
    with pytest.raises(tessera.MissingChunkError):
        ck.read("w")
