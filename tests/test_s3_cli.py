"""The ``tessera`` command on ``s3://`` locations, against the real ``moto_server``: ``inspect``
counts the bytes on the store from one listing (no request per object), ``verify`` passes a sound
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


def _object_bytes(server: S3Server, prefix: str) -> tuple[int, int]:
    """Total bytes and number of the objects under ``prefix/``, by a listing of our own."""
    store = make_store(server.bucket, _options(server))
    metas = [m for batch in obstore.list(store, prefix=f"{prefix}/") for m in batch]
    return sum(int(m["size"]) for m in metas), len(metas)


def test_inspect_counts_the_stored_bytes_from_one_listing(
    s3_env: S3Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"{s3_env.fresh_prefix()}/ckpt"
    tessera.save(STATE, f"s3://{s3_env.bucket}/{prefix}", options=OPTIONS)
    total, objects = _object_bytes(s3_env, prefix)
    assert objects > 10
    with FaultProxy(s3_env.endpoint, timeout=10) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert main(["inspect", "--json", f"s3://{s3_env.bucket}/{prefix}"]) == 0
        exchanges = proxy.exchanges
    doc = json.loads(capsys.readouterr().out)
    assert doc["sizes"]["total"]["disk_bytes"] == total
    heads = sorted(e.path for e in exchanges if e.method == "HEAD")
    chunks = sorted(f"/{s3_env.bucket}/{prefix}/w/c/{i}/0" for i in range(10)) + [
        f"/{s3_env.bucket}/{prefix}/b/c/0"
    ]
    # One HEAD per chunk (the per-array stored sizes), none for the disk usage (one listing's
    # sizes), and no chunk's data read.
    assert heads == sorted(chunks), exchanges
    assert not [e for e in exchanges if e.method == "GET" and "/c/" in e.path], exchanges


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
