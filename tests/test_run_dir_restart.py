"""Restart safety (spec R10.10-R10.12, issue 17 item 6): kill -9 during a save or a retention
deletion, restart in a new process, save the same step again.

A saver process is frozen at a chosen call of its storage (a :class:`StorageWrapper` that
stops there, as a real process can stop anywhere), then killed with SIGKILL. While it is still
alive, a save of the same step from another process is refused with ``already_exists`` and
touches none of its files. After the kill, in every trial:

- the checkpoint ``latest`` names is committed and loads bit-exact;
- a new process saves the killed step again and commits it (or, where the killed save had
  already committed, is refused because it is committed, and that checkpoint loads bit-exact);
- its next save leaves no leftover, no lock file and no temporary pointer.

Then two live processes save the same steps into one run directory: one of them commits each
step, the other is refused, and neither ever loses a file to the other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pytest
import tessera
from tessera.storage.base import Buffer, Lock, Storage
from tessera.testing import StorageWrapper

from .conftest import assert_tree_bit_equal
from .test_run_dir_kill import state

T = TypeVar("T")
KEEP_LAST = 2
STEP = 3  # the step a killed process was saving

# (operation, n-th call, freeze before or after it, or "mid": a deletion that removed the root)
KILL_POINTS = [
    ("lock", 1, "after"),  # step lock taken, nothing written
    ("claim", 1, "after"),
    ("write_file", 1, "after"),
    ("write_file", 6, "before"),
    ("sync", 1, "before"),
    ("publish_root", 1, "before"),
    ("publish_root", 1, "after"),  # committed, latest not moved yet
    ("replace_file", 1, "before"),  # moving latest
    ("remove_checkpoint", 1, "before"),  # retention, step lock held
    ("remove_checkpoint", 1, "mid"),  # retention, root zarr.json gone, chunks left
]


class Freeze(StorageWrapper):
    """Stops the process for good at the ``nth`` call of ``op`` (its children's calls count
    too), after touching ``signal_file``, so that the test kills it exactly there: ``before``
    the call, ``after`` it, or (``remove_checkpoint`` only) ``mid``: after the root
    ``zarr.json`` is gone, as far as a deletion gets before it removes the chunks."""

    def __init__(self, inner: Storage, op: str, nth: int, when: str, signal_file: Path) -> None:
        super().__init__(inner)
        self.op, self.nth, self.when, self.signal_file = op, nth, when, signal_file
        self.seen = [0]

    def wrap(self, inner: Storage) -> Freeze:
        child = Freeze(inner, self.op, self.nth, self.when, self.signal_file)
        child.seen = self.seen  # one count for the run and its steps
        return child

    def _stop(self) -> None:
        self.signal_file.touch()
        time.sleep(600)

    def _call(self, op: str, forward: Callable[[], T], before: Callable[[], None] | None = None) -> T:
        if op != self.op:
            return forward()
        self.seen[0] += 1
        if self.seen[0] == self.nth and self.when != "after":
            if before is not None:
                before()
            self._stop()
        result = forward()
        if self.seen[0] == self.nth:
            self._stop()
        return result

    def lock(self, path: str | None, *, create: bool, wait: float) -> Lock | None:
        if path is None:  # the run's own lock, around moving latest: not a kill point here
            return self.inner.lock(path, create=create, wait=wait)
        return self._call("lock", lambda: self.inner.lock(path, create=create, wait=wait))

    def claim(self, doc: bytes) -> None:
        self._call("claim", lambda: self.inner.claim(doc))

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        self._call("write_file", lambda: self.inner.write_file(path, buffers))

    def sync(self) -> None:
        self._call("sync", self.inner.sync)

    def publish_root(self, data: bytes, save_id: str) -> None:
        self._call("publish_root", lambda: self.inner.publish_root(data, save_id))

    def replace_file(self, path: str, data: bytes) -> None:
        self._call("replace_file", lambda: self.inner.replace_file(path, data))

    def remove_checkpoint(self, path: str) -> None:
        def root_gone() -> None:
            if self.when == "mid":
                (Path(self.inner.location) / path / "zarr.json").unlink()

        self._call("remove_checkpoint", lambda: self.inner.remove_checkpoint(path), root_gone)


_KILLED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import tessera
    from tessera.storage.local import LocalStorage
    from tests.test_run_dir_restart import Freeze, KEEP_LAST, STEP, OPTIONS
    from tests.test_run_dir_kill import state

    root, frozen = Path(sys.argv[1]), Path(sys.argv[5])
    op, nth, when = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    for step in range(1, STEP):
        tessera.RunDirectory(root, keep_last=KEEP_LAST).save(state(step), step=step, options=OPTIONS)
    storage = Freeze(LocalStorage(root), op, nth, when, frozen)
    tessera.RunDirectory(storage, keep_last=KEEP_LAST).save(state(STEP), step=STEP, options=OPTIONS)
    print("not frozen", flush=True)
    """
)

_RESTARTED = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("error")  # a restart over a dead save's leftovers warns of nothing
    from pathlib import Path
    import tessera
    from tests.test_run_dir_restart import STEP, KEEP_LAST, OPTIONS
    from tests.test_run_dir_kill import state

    run = tessera.RunDirectory(Path(sys.argv[1]), keep_last=KEEP_LAST)
    try:
        run.save(state(STEP), step=STEP, options=OPTIONS)
        print("saved", flush=True)
    except tessera.CheckpointExistsError as exc:
        # Only what the killed save committed; latest names it now (that save may have died first).
        assert "is committed already" in str(exc) and "names it now" in str(exc), exc
        assert run.latest() == run.root / run.name_of(STEP)
        print("committed before", flush=True)
    run.save(state(STEP + 1), step=STEP + 1, options=OPTIONS)
    """
)

OPTIONS = tessera.SaveOptions(chunk_bytes=2048, threads=1)


def _python(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_latest_loads(root: Path) -> int:
    run = tessera.RunDirectory(root)
    latest = run.latest()
    assert latest is not None
    step = int(Path(str(latest)).name[5:])
    assert_tree_bit_equal(tessera.load(latest), state(step))
    return step


@pytest.mark.parametrize(("op", "nth", "when"), KILL_POINTS)
def test_kill_9_then_the_restarted_job_saves_the_same_step(
    tmp_path: Path, op: str, nth: int, when: str
) -> None:
    root, frozen = tmp_path / "run", tmp_path / "frozen"
    killed = _python(_KILLED, root, op, nth, when, frozen)
    try:
        deadline = time.monotonic() + 120
        while not frozen.exists():
            assert killed.poll() is None, killed.communicate()
            assert time.monotonic() < deadline, "the saver never reached its kill point"
            time.sleep(0.01)
        # Alive: a save of its step from another process (this one) is refused and changes nothing.
        before = _files(root)
        with pytest.raises(tessera.CheckpointExistsError, match="another process") as refused:
            tessera.RunDirectory(root, keep_last=KEEP_LAST).save(state(STEP), step=STEP)
        assert refused.value.code == "already_exists"
        assert _files(root) == before, "a refused save touched the live save's files"
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert _assert_latest_loads(root) in (STEP - 1, STEP)

    restarted = _python(_RESTARTED, root)
    out, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err[-3000:]
    committed_before = op in ("replace_file", "remove_checkpoint") or (op, when) == ("publish_root", "after")
    expected = "committed before" if committed_before else "saved"
    assert out.strip() == expected, (out, err[-3000:])
    run = tessera.RunDirectory(root, keep_last=KEEP_LAST)
    assert [(c.step, c.committed) for c in run.checkpoints()] == [(STEP, True), (STEP + 1, True)]
    assert _assert_latest_loads(root) == STEP + 1
    assert_tree_bit_equal(tessera.load(root / run.name_of(STEP)), state(STEP))
    assert sorted(os.listdir(root)) == ["latest", "step-00000003", "step-00000004"]


_WRITER = textwrap.dedent(
    """
    import sys, time, warnings
    warnings.simplefilter("error")
    from pathlib import Path
    import tessera
    from tests.test_run_dir_restart import KEEP_LAST
    from tests.test_run_dir_kill import state

    root, steps, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    run = tessera.RunDirectory(root, keep_last=KEEP_LAST)
    (go.parent / f"ready-{sys.argv[4]}").touch()
    while not go.exists():
        time.sleep(0.002)
    for step in range(1, steps + 1):
        try:
            run.save(state(step), step=step, options=tessera.SaveOptions(chunk_bytes=2048, threads=2))
            print(f"committed {step}", flush=True)
        except tessera.CheckpointExistsError as exc:
            assert exc.code == "already_exists"
            print(f"refused {step}", flush=True)
    """
)


def test_two_live_writers_of_the_same_steps_never_delete_each_others_files(tmp_path: Path) -> None:
    """Both save steps 1..N into one run at once: where their saves of a step meet, one commits
    and the other is refused (the step's lock is held, or it is committed); no save fails
    otherwise or warns, as one would if the other had removed its live files as a leftover."""
    root, go, steps = tmp_path / "run", tmp_path / "go", 12
    writers = [_python(_WRITER, root, steps, go, n) for n in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in range(2)):
        assert all(w.poll() is None for w in writers), [w.communicate() for w in writers]
        assert time.monotonic() < deadline, "the writers never started"
        time.sleep(0.01)
    go.touch()
    outputs = []
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err[-3000:]
        assert not err, err[-3000:]
        outputs.append(out.split("\n"))
    refused = 0
    for step in range(1, steps + 1):
        results = sorted(line.split()[0] for out in outputs for line in out if line.endswith(f" {step}"))
        # Both commit a step only where one writer ran so far ahead that retention had deleted
        # the other's checkpoint of it already; two saves of a step never overlap.
        assert results in (["committed", "refused"], ["committed", "committed"]), (step, results)
        refused += results.count("refused")
    assert refused > 0, "the writers never met: nothing was tested"
    run = tessera.RunDirectory(root, keep_last=KEEP_LAST)
    assert [(c.step, c.committed) for c in run.checkpoints()] == [(steps - 1, True), (steps, True)]
    for step in (steps - 1, steps):
        assert_tree_bit_equal(tessera.load(root / run.name_of(step)), state(step))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _assert_latest_loads(root) == steps
    assert sorted(os.listdir(root)) == ["latest", "step-00000011", "step-00000012"]
