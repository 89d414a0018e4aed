"""How many requests a load costs on S3, and reads that stay one object's bytes (issue 18).

On an object store every request is a round trip, so the load path's request count is its
speed (bench/bench_s3.py). The counts are taken through a :class:`FaultProxy` with no rule,
which records every exchange between obstore and a real ``moto_server``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import tessera
import torch
from tessera.errors import StorageError
from tessera.storage.base import ReadNext

from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name
from .test_s3_storage import _options

obstore = pytest.importorskip("obstore", reason="S3 storage needs obstore (the s3 extra)")

from tessera.storage.s3 import S3_CONCURRENCY, S3Options, S3Storage  # noqa: E402 - after the skip
from tessera.testing.fault_proxy import FaultProxy  # noqa: E402


def _through(proxy: FaultProxy, server: S3Server) -> S3Options:
    options = _options(server)
    options.endpoint_url = proxy.url
    return options


def _kinds(proxy: FaultProxy) -> Counter[str]:
    """``METHOD name`` per exchange, the chunk keys as ``chunk``."""
    out: Counter[str] = Counter()
    for e in proxy.exchanges:
        path = e.path.split("?")[0]
        name = path.rsplit("/", 1)[-1]
        out[f"{e.method} {'zarr.json' if name == 'zarr.json' else 'chunk'}"] += 1
    return out


def test_a_load_is_one_get_per_document_and_chunk(s3_server: S3Server) -> None:  # noqa: F811
    """The root, each array's ``zarr.json`` (checked before its chunks, R5.10) and each chunk:
    one GET each; no HEAD for a chunk's size, no listing, no ranged GET per block."""
    state = {f"w{i}": torch.randn(32, 16) for i in range(5)}
    prefix = s3_server.fresh_prefix()
    with FaultProxy(s3_server.endpoint) as proxy:
        storage = S3Storage(s3_server.bucket, prefix, _through(proxy, s3_server))
        tessera.save(state, storage)
        proxy.set_rules([])
        loaded = tessera.load(S3Storage(s3_server.bucket, prefix, _through(proxy, s3_server)))
        assert _kinds(proxy) == {"GET zarr.json": 1 + 5, "GET chunk": 5}
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_ranged_read_is_pinned_to_the_first_etag(s3_server: S3Server) -> None:  # noqa: F811
    """Reads from an offset are ranged GETs with ``If-Match``: an object replaced between two
    blocks is a StorageError naming it, never the old bytes followed by the new."""
    storage = S3Storage(s3_server.bucket, s3_server.fresh_prefix(), _options(s3_server))
    storage.write_file("f", [bytes(range(100))])
    key = storage.location.split("/", 3)[3] + "/f"
    first = bytearray(10)

    def fill(size: int | None, read: ReadNext) -> None:
        assert size == 100
        read(memoryview(first))
        obstore.put(storage._store, key, bytes(100))  # replaced between two blocks
        read(memoryview(bytearray(10)))

    with pytest.raises(StorageError, match="s3://.*/f .*replaced while being read"):
        storage.read_into("f", 5, fill)
    assert bytes(first) == bytes(range(5, 15))


def test_a_whole_read_streams_one_get_into_the_blocks(s3_server: S3Server) -> None:  # noqa: F811
    """A read from the start is one GET whose body fills the caller's blocks in order, however
    they split it; a block past the end is an error, before anything is copied."""
    data = bytes(range(256)) * 40
    prefix = s3_server.fresh_prefix()
    with FaultProxy(s3_server.endpoint) as proxy:
        storage = S3Storage(s3_server.bucket, prefix, _through(proxy, s3_server))
        storage.write_file("f", [data])
        proxy.set_rules([])
        blocks = [bytearray(n) for n in (1, 4000, 6239)]

        def fill(size: int | None, read: ReadNext) -> None:
            assert size == len(data)
            for block in blocks:
                read(memoryview(block))
            with pytest.raises(StorageError, match="ended early"):
                read(memoryview(bytearray(1)))

        storage.read_into("f", 0, fill)
        assert [(e.method, e.path.split("?")[0].endswith("/f")) for e in proxy.exchanges] == [("GET", True)]
    assert b"".join(blocks) == data


def test_s3_asks_for_more_requests_in_flight_than_a_disk(s3_server: S3Server) -> None:  # noqa: F811
    storage = S3Storage(s3_server.bucket, s3_server.fresh_prefix(), _options(s3_server))
    assert storage.concurrency == S3_CONCURRENCY == storage.child("x").concurrency
    tessera.save({"w": torch.ones(4)}, storage)
    assert tessera.open(storage)._engine.threads == S3_CONCURRENCY
