"""A real S3 server for the tests: ``moto_server`` on 127.0.0.1, once per test run.

moto 5.2.5 and newer enforce ``If-None-Match: *`` on PUT, which the claim and the root's
publication rely on (spec R9.3, R9.11). The fixture starts the server on a free port, waits
until it answers, creates a bucket, and stops the process on every path (a failed start too);
without moto installed, the tests that use it are skipped saying so.
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

import pytest

BUCKET = "tessera-tests"
START_TIMEOUT_S = 20.0


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _moto_server() -> list[str] | None:
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
    bucket, and stop the process on every way out; the benchmark (bench/bench_s3.py) uses it too.
    Raises ``RuntimeError`` where moto is not installed or does not start."""
    command = _moto_server()
    if command is None:
        raise RuntimeError(
            "moto_server is not installed (pip install 'moto[server]>=5.2.5', in the test extra)"
        )
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = log_path.open("wb")  # a file, not a pipe: the request log can never fill it and stall the server
    process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                err = log_path.read_text(errors="replace")
                raise RuntimeError(f"moto_server exited with {process.returncode}: {err[-2000:]}")
            try:
                _request(f"{endpoint}/moto-api/")
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not answer on {endpoint} in {START_TIMEOUT_S} s"
                    ) from exc
                time.sleep(0.05)
        status = _request(f"{endpoint}/{BUCKET}", method="PUT")
        assert status == 200, f"creating bucket {BUCKET} answered {status}"
        yield S3Server(endpoint, BUCKET)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if _moto_server() is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]>=5.2.5', in the test extra)")
    with running_moto_server(tmp_path_factory.mktemp("moto") / "moto_server.log") as server:
        yield server
