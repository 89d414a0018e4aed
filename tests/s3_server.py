"""The tests' S3 server: one ``moto_server`` per test run (``tessera.testing.moto`` starts and
stops it), skipped saying so where moto is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tessera.testing.moto import NOT_INSTALLED, S3Server, moto_server_command, running_moto_server

__all__ = ["S3Server", "s3_server"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if moto_server_command() is None:
        pytest.skip(NOT_INSTALLED)
    with running_moto_server(tmp_path_factory.mktemp("moto") / "moto_server.log") as server:
        yield server
