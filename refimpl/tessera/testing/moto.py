"""A real S3-compatible server for tests and benchmarks: ``moto_server`` (PyPI ``moto[server]``)
on 127.0.0.1, on a free port.

Why moto: it runs anywhere pip does, with no network, and 5.2.5 and newer enforce
``If-None-Match: *`` and ``If-Match`` on PUT, which the claim, the commit and run-directory
leases rely on (spec R9.3, R9.11, R10.12). :func:`running_moto_server` waits until the server
answers, creates a bucket, and stops the process on every way out (a failed start too), so no
test leaves a server behind. Tessera's own tests wrap it in a session fixture; a storage written
for another S3-compatible service can do the same with :class:`~tessera.testing.StorageTests`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import StorageError

__all__ = ["BUCKET", "S3Server", "moto_server_command", "running_moto_server"]

BUCKET = "tessera-tests"
START_TIMEOUT_S = 20.0
NOT_INSTALLED = "moto_server is not installed (pip install 'moto[server]>=5.2.5', in the test extra)"


@dataclass(frozen=True)
class S3Server:
    """Where the server listens, and a bucket it holds."""

    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }

    def fresh_prefix(self) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"

    def create_bucket(self, name: str) -> None:
        """Create the bucket ``name`` (moto takes an unsigned PUT); one that exists is kept."""
        status = _request(f"{self.endpoint}/{name}", method="PUT")
        if status not in (200, 409):
            raise StorageError(f"{self.endpoint}: creating the bucket {name} answered HTTP {status}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def moto_server_command() -> list[str] | None:
    """How to start ``moto_server``: the one beside this Python, else on PATH; ``None`` if neither."""
    beside = Path(sys.executable).with_name("moto_server")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("moto_server")
    return [found] if found else None


def _request(url: str, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@contextmanager
def running_moto_server(log_path: Path) -> Iterator[S3Server]:
    """Start ``moto_server`` on a free port of 127.0.0.1 (its log in ``log_path``), create the
    bucket :data:`BUCKET`, and stop the process on every way out. Raises :class:`StorageError`
    where moto is not installed or does not start."""
    command = moto_server_command()
    if command is None:
        raise StorageError(NOT_INSTALLED)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = log_path.open("wb")  # a file, not a pipe: the request log can never fill it and stall the server
    process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                err = log_path.read_text(errors="replace")
                raise StorageError(f"moto_server exited with {process.returncode}: {err[-2000:]}")
            try:
                _request(f"{endpoint}/moto-api/")
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"moto_server did not answer on {endpoint} in {START_TIMEOUT_S} s"
                    ) from exc
                time.sleep(0.05)
        server = S3Server(endpoint, BUCKET)
        server.create_bucket(BUCKET)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
