"""``tessera.Preemption``: a scheduler's stop signal noted, and every rank stopping at the same step.

Real signals (``os.kill``) to this process and to real gloo ranks (``tests/ranks.py``): a
SIGTERM sent to one rank's pid makes every rank stop at the same step and exit normally,
where SIGTERM's default action would have killed that rank mid-loop.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import tessera
import torch.distributed as dist
from tessera import Preemption, TesseraWarning

from .ranks import run_ranks

MAX_STEPS = 2000
"""The most steps a rank loops over waiting for the signal: far more than it needs (each step sleeps)."""


def _noted(seen: list[int]) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    return handler


def test_a_signal_to_this_process_is_noted_and_stop_is_requested() -> None:
    """Without torch.distributed the answer is this process's own note, with no collective."""
    assert not dist.is_initialized()
    with Preemption() as preemption:
        assert signal.getsignal(signal.SIGUSR1) == preemption._handle
        assert not preemption.stop_requested() and preemption.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.received is signal.SIGUSR1
        assert preemption.stop_requested()
        # A second signal, and another of the handled ones: still requested, the first kept, alive.
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.received is signal.SIGUSR1 and preemption.stop_requested()


def test_the_previous_handlers_come_back_on_exit_and_uninstall_twice_is_harmless() -> None:
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR1, _noted(seen))
    try:
        mine = signal.getsignal(signal.SIGUSR1)
        term = signal.getsignal(signal.SIGTERM)
        preemption = Preemption()
        with preemption:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == []  # replaced while installed: the previous handler was not called
        assert signal.getsignal(signal.SIGUSR1) is mine and signal.getsignal(signal.SIGTERM) == term
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # the restored handler is the one that runs
        preemption.uninstall()
        preemption.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is mine
        # The request noted while installed stays; asking needs the handlers installed again.
        assert preemption.received is signal.SIGUSR1 and not preemption.installed
        with pytest.raises(RuntimeError, match="not installed"):
            preemption.stop_requested()
        with preemption:
            assert preemption.stop_requested()
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_handler_replaced_after_install_is_left_in_place_with_a_warning() -> None:
    seen: list[int] = []
    preemption = Preemption([signal.SIGUSR1])
    preemption.install()
    try:
        signal.signal(signal.SIGUSR1, _noted(seen))
        with pytest.warns(TesseraWarning, match="SIGUSR1 was replaced after install"):
            preemption.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_install_outside_the_main_thread_is_refused_and_changes_nothing() -> None:
    preemption = Preemption()
    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def install() -> None:
        try:
            preemption.install()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=install, name="loader")
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert "thread 'loader'" in str(errors[0]) and "main thread" in str(errors[0])
    assert not preemption.installed and signal.getsignal(signal.SIGTERM) == before


def test_bad_arguments_and_a_second_install_are_refused() -> None:
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        Preemption([signal.SIGKILL])
    with pytest.raises(ValueError, match="no signal to handle"):
        Preemption([])
    with pytest.raises(TypeError, match="must be a signal.Signals"):
        Preemption(["SIGTERM"])  # type: ignore[list-item]
    assert Preemption([signal.SIGTERM, signal.SIGTERM, 10]).signals == (signal.SIGTERM, signal.SIGUSR1)
    with Preemption() as preemption, pytest.raises(RuntimeError, match="already installed"):
        preemption.install()


def test_a_process_forked_after_install_keeps_the_default_action() -> None:
    """A data loader's worker forked from a rank still ends on ``terminate()`` (SIGTERM)."""
    ready, started = os.pipe()
    with Preemption():
        pid = os.fork()
        if pid == 0:  # the child: wait to be terminated; exit 0 only if the signal was swallowed
            os.write(started, b"!")  # after fork() returned: a signal before it would be dropped by Python
            time.sleep(10)
            os._exit(0)
        assert os.read(ready, 1) == b"!"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    os.close(ready)
    os.close(started)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def _loop(rank: int, world_size: int, steps: int, pid_file: Path | None) -> tuple[int | None, str | None]:
    """Loop over steps asking at each boundary; rank 1 publishes its pid once in the loop."""
    with tessera.Preemption() as preemption:
        for step in range(steps):
            time.sleep(0.005)  # the step's work
            if pid_file is not None and rank == 1 and step == 3:
                pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
                pid_file.with_suffix(".tmp").rename(pid_file)
            if preemption.stop_requested():
                received = preemption.received
                return step, None if received is None else received.name
    return None, None


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    pid_file = tmp_path / "rank1.pid"
    with ThreadPoolExecutor(1) as pool:
        ranks = pool.submit(run_ranks, 3, _loop, MAX_STEPS, pid_file)
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert not ranks.done() and time.monotonic() < deadline, ranks.result()
            time.sleep(0.005)
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        results = ranks.result()
    # Every rank returned (a rank killed by SIGTERM would have failed run_ranks), at one step.
    steps = {step for step, _ in results}
    assert len(results) == 3 and len(steps) == 1, results
    (stopped,) = steps
    assert stopped is not None and 3 <= stopped < MAX_STEPS
    assert [received for _, received in results] == [None, "SIGTERM", None]


def test_without_a_signal_every_rank_runs_every_step() -> None:
    assert run_ranks(3, _loop, 20, None) == [(None, None)] * 3
