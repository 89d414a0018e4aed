"""The ``tessera`` command on ``s3://`` locations, against the real ``moto_server``: ``inspect``
takes every size from listings (no request per object), ``verify`` passes a sound
checkpoint and fails one with a chunk overwritten on the server, ``ls`` lists a prefix of
``step-*`` checkpoints (reading needs no run-directory lock).
"""

from __future__ import annotations

import json

import pytest
import tessera
import torch
from tessera.cli.main import main
from tessera.testing.fault_proxy import FaultProxy

from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name
from .test_s3_storage import s3_env  # noqa: F401 - the fixture, used by name

obstore = pytest.importorskip("obstore", reason="S3 storage needs obstore (the s3 extra)")

from tessera.storage.s3 import S3Storage  # noqa: E402 - after the skip above
from tessera.storage.s3_client import make_store  # noqa: E402

from .test_s3_storage import _options  # noqa: E402

STATE = {
    "w": torch.arange(600, dtype=torch.float32).reshape(20, 30),
    "b": torch.ones(7, dtype=torch.bfloat16),
}
OPTIONS = tessera.SaveOptions(chunk_bytes=240)  # 2 rows of w a chunk: 10 chunks


def _store(server: S3Server) -> object:
    return make_store(server.bucket, _options(server))


def _object_bytes(server: S3Server, prefix: str) -> tuple[int, int]:
    """Total bytes and number of the objects under ``prefix/``, by a listing of our own."""
    metas = [m for batch in obstore.list(_store(server), prefix=f"{prefix}/") for m in batch]
    return sum(int(m["size"]) for m in metas), len(metas)


def test_inspect_takes_the_sizes_from_listings_and_reads_no_chunk(
    s3_env: S3Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"{s3_env.fresh_prefix()}/ckpt"
    url = f"s3://{s3_env.bucket}/{prefix}"
    tessera.save(STATE, url, options=OPTIONS)
    total, objects = _object_bytes(s3_env, prefix)
    assert objects == 15  # claim, root, two arrays' zarr.json, 11 chunks
    with FaultProxy(s3_env.endpoint, timeout=10) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert main(["inspect", "--json", url]) == 0
        exchanges = proxy.exchanges
    sizes = json.loads(capsys.readouterr().out)["sizes"]
    assert sizes["total"]["disk_bytes"] == total
    chunk_bytes = total - sum(len(obstore.get(_store(s3_env), f"{prefix}/{k}").bytes()) for k in _NOT_CHUNKS)
    assert sizes["total"]["stored_bytes"] == chunk_bytes and sizes["total"]["missing_chunks"] == 0
    # Listings and the metadata documents only: no HEAD per object, no chunk read.
    assert not [e for e in exchanges if e.method == "HEAD" or "/c/" in e.path], exchanges
    assert len(exchanges) < 12, exchanges

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    obstore.delete(_store(s3_env), f"{prefix}/w/c/4/0")
    assert main(["inspect", url]) == 0
    assert "1 chunk missing" in capsys.readouterr().err


_NOT_CHUNKS = (".tessera-claim.json", "zarr.json", "w/zarr.json", "b/zarr.json")


def test_verify_passes_a_sound_checkpoint_and_fails_an_overwritten_chunk(
    s3_env: S3Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = f"{s3_env.fresh_prefix()}/ckpt"
    url = f"s3://{s3_env.bucket}/{prefix}"
    tessera.save(STATE, url, options=OPTIONS)
    assert main(["verify", url]) == 0
    capsys.readouterr()
    storage = S3Storage(s3_env.bucket, prefix, _options(s3_env))
    key = f"{prefix}/w/c/2/0"
    data = bytearray(obstore.get(storage._store, key).bytes())
    data[0] ^= 0x80
    obstore.put(storage._store, key, bytes(data))
    assert main(["verify", url]) == 1
    out = capsys.readouterr()
    assert "checksum_mismatch" in out.out + out.err and "c/2/0" in out.out + out.err


def test_ls_lists_the_step_checkpoints_of_a_prefix(
    s3_env: S3Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = f"s3://{s3_env.bucket}/{s3_env.fresh_prefix()}/run"
    for step in (1, 20):
        tessera.save(STATE, f"{run}/step-{step:08d}", options=OPTIONS)
    assert main(["ls", "--json", run]) == 0
    doc = json.loads(capsys.readouterr().out)
    records = doc["checkpoints"]
    assert [(r["name"], r["step"], r["committed"], r["latest"]) for r in records] == [
        ("step-00000001", 1, True, False),
        ("step-00000020", 20, True, False),
    ]
    prefix = run.removeprefix(f"s3://{s3_env.bucket}/")
    want = [_object_bytes(s3_env, f"{prefix}/step-{step:08d}")[0] for step in (1, 20)]
    assert [r["bytes"] for r in records] == want
