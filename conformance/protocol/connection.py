"""A running backend: one request at a time, each answer checked (PROTOCOL.md §2, §5).

``SubprocessBackend`` speaks JSON lines over a child's stdin and stdout, as
bowtie does; ``InProcessBackend`` calls a Python object's ``handle``. Both
validate every request and answer against the schemas and turn a crash, a
timeout or a malformed answer into a :class:`ProtocolError`; the session
then discards the backend and starts a fresh one.

Call order: ``start()`` (sends ``hello`` and checks the claims, P10), then
any number of ``request()``, then ``close()``.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from .declaration import Declaration
from .messages import ProtocolError, check

__all__ = ["Backend", "InProcessBackend", "SubprocessBackend", "start_backend"]

_STDERR_TAIL = 4000


class Backend(abc.ABC):
    """One backend instance (one process, or one in-process object)."""

    def __init__(self, declaration: Declaration) -> None:
        self.declaration = declaration
        self._next_id = 0

    def start(self) -> None:
        """Greet the backend and check that it claims what its ``backend.json`` says (P10)."""
        answer = self.request({"op": "hello", "protocol": 1}, self.declaration.timeout_s)
        if not answer["ok"]:
            raise ProtocolError("P10", f"hello failed: {answer['error']['message']}")
        declared = self.declaration
        said: dict[str, Any] = {k: answer.get(k) for k in ("name", "version", "protocol", "claims")}
        want = {
            "name": declared.name,
            "version": declared.version,
            "protocol": 1,
            "claims": declared.claims.to_json(),
        }
        if isinstance(said["claims"], dict):
            said["claims"] = {k: sorted(v) for k, v in said["claims"].items()}
        if said != want:
            raise ProtocolError("P10", f"hello answered {said}, but backend.json declares {want}")

    def request(self, message: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """Send ``message`` (an ``id`` is added) and return the checked answer."""
        message = {**message, "id": self._next_id}
        self._next_id += 1
        check(message, "request", "P5", f"the harness's own {message['op']} request")
        answer = self._exchange(message, timeout_s or self.declaration.timeout_s)
        check(answer, "response", "P7", f"the answer to {message['op']}")
        if answer["id"] != message["id"]:
            raise ProtocolError("P7", f"answer id {answer['id']} to request id {message['id']}")
        return answer

    @abc.abstractmethod
    def _exchange(self, message: dict[str, Any], timeout_s: float) -> Any: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the backend; never raises."""

    def log_tail(self) -> str:
        """The end of what the backend wrote to stderr, for error reports."""
        return ""


class SubprocessBackend(Backend):
    """A backend process speaking JSON lines (P5-P9)."""

    def __init__(self, declaration: Declaration, log: Path) -> None:
        super().__init__(declaration)
        assert declaration.command is not None
        command = list(declaration.command)
        local = declaration.folder / command[0]
        if local.is_file():
            command[0] = str(local)
        env = {**os.environ, "TESSERA_CONFORMANCE_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
        self._log_path = log
        self._log = log.open("ab")
        try:
            self._process = subprocess.Popen(
                command,
                cwd=declaration.folder,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
            )
        except OSError as exc:
            self._log.close()
            raise ProtocolError("P2", f"cannot start {command}: {exc}") from None
        self._lines: queue.Queue[bytes] = queue.Queue()
        assert self._process.stdout is not None
        threading.Thread(target=self._pump, args=(self._process.stdout,), daemon=True).start()

    def _pump(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put(b"")  # end of file

    def _exchange(self, message: dict[str, Any], timeout_s: float) -> Any:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(message).encode() + b"\n")
            stdin.flush()
        except OSError:
            raise ProtocolError(
                "P8", f"the backend exited ({self._status()}) before reading a request"
            ) from None
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise ProtocolError("P8", f"no answer to {message['op']} within {timeout_s:g} s") from None
        if not line:
            raise ProtocolError(
                "P8", f"the backend exited ({self._status()}) without answering {message['op']}"
            )
        try:
            return json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ProtocolError("P6", f"the backend wrote a line that is not JSON: {line[:200]!r}") from None

    def _status(self) -> str:
        try:
            code = self._process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"exit status {code}"

    def close(self) -> None:
        try:
            if self._process.poll() is None and self._process.stdin is not None:
                self._process.stdin.close()
                self._process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._log.close()

    def log_tail(self) -> str:
        try:
            data = self._log_path.read_bytes()
        except OSError:
            return ""
        return data[-_STDERR_TAIL:].decode(errors="replace")


class InProcessBackend(Backend):
    """A Python class loaded into the harness's process (P20)."""

    def __init__(self, declaration: Declaration) -> None:
        super().__init__(declaration)
        assert declaration.python is not None
        file, _, name = declaration.python.partition(":")
        path = declaration.folder / file
        spec = importlib.util.spec_from_file_location(f"_conformance_backend_{declaration.name}", path)
        if spec is None or spec.loader is None:
            raise ProtocolError("P20", f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            self._impl = getattr(module, name)()
        except Exception as exc:
            raise ProtocolError(
                "P20", f"cannot load {declaration.python}: {type(exc).__name__}: {exc}"
            ) from exc

    def _exchange(self, message: dict[str, Any], timeout_s: float) -> Any:
        try:
            # A round trip through JSON, as over a pipe: the backend sees plain JSON values.
            return json.loads(json.dumps(self._impl.handle(json.loads(json.dumps(message)))))
        except Exception as exc:
            raise ProtocolError("P20", f"handle() raised {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        close = getattr(self._impl, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


def start_backend(declaration: Declaration, log: Path) -> Backend:
    """Start the backend a declaration describes and greet it."""
    backend: Backend = (
        InProcessBackend(declaration) if declaration.in_process else SubprocessBackend(declaration, log)
    )
    try:
        backend.start()
    except BaseException:
        backend.close()
        raise
    return backend
