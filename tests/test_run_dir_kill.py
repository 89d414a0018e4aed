"""kill -9 during saves of two processes sharing one run directory (§10, R10.7-R10.10, issue 15).

Two real processes save interleaved steps (one the odd, one the even) into
one run directory with retention on; one or both are killed with SIGKILL at a
random moment (during a save, a move of ``latest``, a retention deletion).
Then the invariants:

- the checkpoint ``latest`` names is committed, loads, and equals what was
  saved; ``latest`` is at or above every step whose save returned (it only
  moves forward);
- every committed checkpoint loads equal to what was saved for its step;
- a checkpoint whose save returned is missing only if retention was allowed
  to delete it: at least ``keep_last`` committed checkpoints of higher steps
  remain;
- a survivor finishes all its saves (no leftover or lock of the killed one
  blocks it, no collision on temporary names), with no warning;
- one more save afterwards removes every leftover of the killed saves
  (R10.10), and no temporary pointer file remains.

``TESSERA_KILL_TRIALS`` sets the number of trials (default 4, 20-30 s
here; release checks run hundreds).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import tessera
import torch

from .conftest import assert_tree_bit_equal

TRIALS = int(os.environ.get("TESSERA_KILL_TRIALS", "4"))
KEEP_LAST = 2
STEPS_PER_PROCESS = 12


def state(step: int) -> dict[str, Any]:
    """What step ``step`` saves: enough chunks that a kill often lands inside a save. Odd steps are
    three times larger, so the two savers drift apart and commit out of step order (R10.8)."""
    generator = torch.Generator().manual_seed(step)
    return {
        "w": torch.rand(30_000 if step % 2 else 10_000, generator=generator),
        "b": torch.full((7,), float(step)),
        "step": step,
    }


_CHILD = textwrap.dedent(
    """
    import sys, time, warnings
    warnings.simplefilter("error")  # a survivor must see no warning at all
    from pathlib import Path
    import tessera
    from tests.test_run_dir_kill import state, KEEP_LAST

    root, first, count, done = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    run = tessera.RunDirectory(root, keep_last=KEEP_LAST)
    (done / f"ready-{first}").touch()
    while not (done / "go").exists():  # both start saving together
        time.sleep(0.002)
    for step in range(first, first + 2 * count, 2):
        (done / f"start-{step}").touch()
        run.save(state(step), step=step, options=tessera.SaveOptions(chunk_bytes=2048, threads=2))
        (done / f"step-{step}").touch()  # the save returned: committed, latest moved, retention ran
    """
)


class _LatestWatch:
    """Reads ``latest`` over and over while the savers run: it must never name a lower step (R10.8)."""

    def __init__(self, pointer: Path) -> None:
        self.pointer = pointer
        self.seen = -1

    def poll(self) -> None:
        try:
            step = int(self.pointer.read_text()[5:])
        except FileNotFoundError:
            return
        assert step >= self.seen, f"latest moved back from step {self.seen} to step {step}"
        self.seen = step
        time.sleep(0.001)


def _start(root: Path, first: int, done: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), str(first), str(STEPS_PER_PROCESS), str(done)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )


def _trial(tmp: Path, rng: random.Random) -> str:
    root, done = tmp / "run", tmp / "done"
    done.mkdir()
    procs = {1: _start(root, 1, done), 2: _start(root, 2, done)}
    try:
        deadline = time.monotonic() + 120
        while not all((done / f"ready-{first}").exists() for first in procs):
            for proc in procs.values():
                assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the savers never started"
            time.sleep(0.02)
        (done / "go").touch()
        victims = rng.choice([[1], [2], [1, 2]])
        watch = _LatestWatch(root / "latest")
        # Kill after the victim's k-th save returned and a fraction of a save's time more.
        mark = done / f"step-{victims[0] + 2 * rng.randrange(STEPS_PER_PROCESS - 2)}"
        while not mark.exists() and procs[victims[0]].poll() is None:
            watch.poll()
        kill_at = time.monotonic() + rng.uniform(0, 0.1)
        while time.monotonic() < kill_at:
            watch.poll()
        for first in victims:
            os.kill(procs[first].pid, signal.SIGKILL)
        while any(proc.poll() is None for proc in procs.values()):
            watch.poll()
            assert time.monotonic() < deadline + 300, "a saver hangs"
        for first, proc in procs.items():
            _, err = proc.communicate(timeout=60)
            if first in victims:
                assert proc.returncode in (-signal.SIGKILL, 0), err.decode()[-3000:]
            else:
                assert proc.returncode == 0, f"the survivor failed: {err.decode()[-3000:]}"
                assert not err, err.decode()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    returned, leftovers = _check(root, done)
    started = {p.name[6:] for p in done.glob("start-*")}
    cut = sorted(started - {p.name[5:] for p in done.glob("step-*")})
    return f"killed {victims}: {returned} saves returned, cut short: {cut}, leftovers at the end: {leftovers}"


def _check(root: Path, done: Path) -> tuple[int, int]:
    returned = sorted(int(p.name[5:]) for p in done.glob("step-*"))
    run = tessera.RunDirectory(root, keep_last=KEEP_LAST)
    infos = run.checkpoints()
    committed = [c.step for c in infos if c.committed]
    latest = run.latest()
    if returned:
        assert latest is not None, "saves returned but there is no latest"
    if latest is not None:
        latest_step = int(latest.name[5:])
        assert latest.name in {c.name for c in infos if c.committed}
        assert not returned or latest_step >= max(returned), "latest moved backwards"
        assert_tree_bit_equal(tessera.load(latest), state(latest_step))
    for step in committed:
        assert_tree_bit_equal(tessera.load(root / run.name_of(step)), state(step))
    for step in returned:
        if step not in committed:
            higher = [s for s in committed if s > step]
            assert len(higher) >= KEEP_LAST, f"step {step} was deleted outside retention's rules"
    # One more save: the killed saves' leftovers below latest go, and no temporary file stays.
    before = sum(not c.committed for c in infos)
    final = 2 * STEPS_PER_PROCESS + 10
    run.save(state(final), step=final)
    leftovers = [c.name for c in run.checkpoints() if not c.committed]
    assert leftovers == [], f"leftovers of the killed saves remain: {leftovers}"
    assert not [n for n in os.listdir(root) if n.startswith(".latest.")], os.listdir(root)
    assert [c.step for c in run.checkpoints()][-1] == final
    return len(returned), before


def test_kill_9_two_processes_sharing_a_run_directory(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("TESSERA_KILL_SEED", "15")))
    outcomes = []
    for trial in range(TRIALS):
        trial_dir = tmp_path / f"trial-{trial}"
        trial_dir.mkdir()
        outcomes.append(_trial(trial_dir, rng))
    print("\n".join(outcomes))
    assert len(outcomes) == TRIALS
