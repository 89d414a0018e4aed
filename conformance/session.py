"""The backends a run keeps alive, and each case's scratch folder (cases/model.py ``Session``).

One process serves the single-process cases, one per rank the multi-rank
cases (P5): starting a Python backend costs about a second of imports, so
processes are reused across cases. After a case ends in an error (P8) every
process is discarded, so that the next case starts from a clean backend.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
from pathlib import Path

from .cases.model import Session
from .protocol.connection import Backend, start_backend
from .protocol.declaration import Claims, Declaration
from .protocol.messages import ProtocolError

__all__ = ["RunSession"]


class RunSession(Session):
    """Owns the backend processes of one ``conformance run``; ``close()`` stops them all."""

    def __init__(self, declaration: Declaration, workdir: Path) -> None:
        self.declaration = declaration
        self.workdir = workdir
        self._logs = workdir / "logs"
        self._logs.mkdir(parents=True, exist_ok=True)
        self._single: Backend | None = None
        self._ranks: list[Backend] = []
        self._scratch: Path | None = None
        self._started = 0
        self._cannot_start: ProtocolError | None = None

    # -- the runner's side -----------------------------------------------------------------

    def begin(self, number: int, case_id: str) -> None:
        """Give the next case a fresh scratch folder named after it."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id)
        self._scratch = self.workdir / f"{number:04d}-{name}"
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch.mkdir(parents=True)

    def end(self, keep: bool) -> None:
        """Remove the case's scratch folder unless it is kept for inspection."""
        if self._scratch is not None and not keep:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None

    def discard_backends(self) -> None:
        """Stop every process, after an error, so that the next case starts afresh."""
        for backend in self._running():
            backend.close()
        self._single, self._ranks = None, []

    def close(self) -> None:
        for backend in self._running():
            with contextlib.suppress(ProtocolError):
                backend.request({"op": "stop"}, timeout_s=10)
        self.discard_backends()

    def _running(self) -> list[Backend]:
        return [*([self._single] if self._single is not None else []), *self._ranks]

    def log_tail(self) -> str:
        """The end of the stderr logs of the processes of the last case."""
        logs = sorted(self._logs.glob("*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text(errors="replace")[-2000:] if logs else ""

    # -- the case's side -------------------------------------------------------------------

    @property
    def claims(self) -> Claims:
        return self.declaration.claims

    def scratch(self) -> Path:
        assert self._scratch is not None, "scratch() outside a case"
        return self._scratch

    def backend(self) -> Backend:
        if self._single is None:
            self._single = self._start()
        return self._single

    def ranks(self, world_size: int) -> list[Backend]:
        if len(self._ranks) != world_size:
            for backend in self._ranks:
                backend.close()
            self._ranks = []
            for _ in range(world_size):
                self._ranks.append(self._start())
        return list(self._ranks)

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def _start(self) -> Backend:
        """Start one more process; a backend that cannot start at all is not retried for every case."""
        if self._cannot_start is not None:
            raise self._cannot_start
        self._started += 1
        try:
            return start_backend(self.declaration, self._logs / f"backend-{self._started:03d}.log")
        except ProtocolError as exc:
            if self._started == 1:
                self._cannot_start = exc
            raise
