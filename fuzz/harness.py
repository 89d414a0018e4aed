"""The parent's side of a fuzz worker: a child process, timed per request, killed when it hangs.

A request that gets no answer within its time limit is a hang: the child is killed (with every
thread it started) and a fresh one is started for the next request. While waiting the parent also
watches the child's resident memory and kills it past a hard cap, so that a runaway allocation
cannot take the machine down before its answer would have said so.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Worker", "REPO"]

REPO = Path(__file__).resolve().parent.parent
HARD_CAP_MIB = 1024
"""Memory growth at which the parent kills the child outright (the limit tests assert is lower)."""


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


class Worker:
    """One ``python -m fuzz.worker`` child; :meth:`ask` sends a request and waits for its answer."""

    def __init__(self, startup_timeout: float = 120.0) -> None:
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[str] | None = None
        self.restarts = 0

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        process = subprocess.Popen(
            [sys.executable, "-m", "fuzz.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        line = self._read_line(process, self.startup_timeout)
        if line is None:
            self._kill(process)
            raise RuntimeError("the fuzz worker did not start")
        self.baseline_mib = _rss_mib(process.pid)
        return process

    @staticmethod
    def _read_line(process: subprocess.Popen[str], timeout: float, cap_mib: float = 0.0) -> str | None:
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([process.stdout], [], [], min(left, 0.02))
            if ready:
                line = process.stdout.readline()
                return line or ""
            if cap_mib and _rss_mib(process.pid) > cap_mib:
                return "over-memory"

    @staticmethod
    def _kill(process: subprocess.Popen[str]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The worker's answer, or ``{"outcome": "hang"}`` / ``"over-memory"`` / ``"died"``."""
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        started = time.monotonic()
        line = self._read_line(self.process, timeout, self.baseline_mib + HARD_CAP_MIB)
        if line and line != "over-memory":
            answer: dict[str, Any] = json.loads(line)
            return answer
        self._kill(self.process)
        self.process = None
        self.restarts += 1
        outcome = {None: "hang", "": "died", "over-memory": "over-memory"}[line]
        return {
            "outcome": outcome,
            "code": None,
            "text": "",
            "seconds": round(time.monotonic() - started, 3),
            "memory_mib": HARD_CAP_MIB if outcome == "over-memory" else 0.0,
        }

    def close(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill(self.process)
            self.process = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
