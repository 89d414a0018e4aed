"""The S3 storage against a real ``moto_server`` (tests/s3_server.py): the storage kit, and
save / load / open through ``s3://bucket/prefix`` URLs configured by the ``AWS_*`` variables.
Run directories on S3 (leases, restart safety) are tested in tests/test_s3_run_dir.py.
"""

from __future__ import annotations

import threading

import pytest
import tessera
import torch
from tessera.cli.main import main
from tessera.errors import CheckpointExistsError, StorageError
from tessera.storage.resolve import storage_for
from tessera.testing.storage_tests import MakeStorage, StorageTests

from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name

obstore = pytest.importorskip("obstore", reason="S3 storage needs obstore (the s3 extra)")

from tessera.storage.s3 import S3Options, S3Storage  # noqa: E402 - after the skip above


def _options(server: S3Server) -> S3Options:
    env = server.env()
    return S3Options(
        endpoint_url=server.endpoint,
        config={"access_key_id": env["AWS_ACCESS_KEY_ID"], "secret_access_key": env["AWS_SECRET_ACCESS_KEY"]},
        timeout_s=10.0,
        max_retries=2,
    )


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:  # noqa: F811
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


class TestS3Storage(StorageTests):
    @pytest.fixture
    def make_storage(self, s3_server: S3Server) -> MakeStorage:  # noqa: F811
        prefix = s3_server.fresh_prefix()
        options = _options(s3_server)
        return lambda name: S3Storage(s3_server.bucket, f"{prefix}/{name}", options)


def _state() -> dict[str, object]:
    generator = torch.Generator().manual_seed(18)
    return {
        "w": torch.randn(33, 17, generator=generator),
        "b": torch.randn(40, generator=generator).to(torch.bfloat16),
        "i": torch.arange(100, dtype=torch.int32).reshape(10, 10),
        "step": 3,
    }


def test_save_load_open_by_url(s3_env: S3Server) -> None:
    url = f"s3://{s3_env.bucket}/{s3_env.fresh_prefix()}/ckpt"
    assert isinstance(storage_for(url), S3Storage)
    state = _state()
    tessera.save(state, url, options=tessera.SaveOptions(chunk_bytes=256))
    loaded = tessera.load(url)
    for key in ("w", "b", "i"):
        assert loaded[key].dtype == state[key].dtype  # type: ignore[union-attr]
        assert loaded[key].view(torch.uint8).equal(state[key].view(torch.uint8)), key  # type: ignore[union-attr]
    assert loaded["step"] == 3
    part = tessera.open(url).read("w", (slice(5, 20), slice(2, 9)))
    assert torch.equal(torch.as_tensor(part), state["w"][5:20, 2:9])  # type: ignore[index]
    with pytest.raises(CheckpointExistsError):
        tessera.save(state, url)
    assert tessera.verify(url).ok


def test_cli_inspects_and_verifies_by_url(s3_env: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{s3_env.bucket}/{s3_env.fresh_prefix()}/ckpt"
    tessera.save(_state(), url)
    assert main(["inspect", url]) == 0
    assert "w" in capsys.readouterr().out
    assert main(["verify", url]) == 0


def test_a_missing_bucket_fails_before_anything_is_written(s3_env: S3Server) -> None:
    url = f"s3://no-such-bucket-{s3_env.fresh_prefix()}/ckpt"
    with pytest.raises(StorageError, match="no-such-bucket") as caught:
        tessera.save(_state(), url)
    assert "NoSuchBucket" in str(caught.value) and "create the bucket" in str(caught.value)


def test_a_foreign_object_under_the_prefix_is_refused(s3_server: S3Server) -> None:  # noqa: F811
    storage = S3Storage(s3_server.bucket, s3_server.fresh_prefix(), _options(s3_server))
    obstore.put(storage._store, f"{storage.location.split('/', 3)[3]}/notes.txt", b"mine")
    with pytest.raises(CheckpointExistsError, match="not empty"):
        tessera.save(_state(), storage)


def test_missing_credentials_are_named(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # The client falls back to the instance metadata service: point it at a closed port, so
    # that the test neither waits for nor depends on the machine's network.
    options = S3Options(
        endpoint_url=s3_server.endpoint, config={"metadata_endpoint": "http://127.0.0.1:9"}, max_retries=0
    )
    storage = S3Storage(s3_server.bucket, s3_server.fresh_prefix(), options)
    with pytest.raises(StorageError, match="no AWS credentials found") as caught:
        tessera.save(_state(), storage)
    assert storage.location in str(caught.value) and "AWS_ACCESS_KEY_ID" in str(caught.value)


def test_large_files_go_up_as_multipart_uploads(s3_server: S3Server) -> None:  # noqa: F811
    options = _options(s3_server)
    options.multipart_bytes = 1 << 20
    storage = S3Storage(s3_server.bucket, s3_server.fresh_prefix(), options)
    data = bytes(range(256)) * (6 << 12)  # 6 MiB: one part over the threshold
    storage.claim(b'{"save_id": "s"}')
    storage.write_file("big", [data[:100], memoryview(data)[100:]])
    assert storage.size("big") == len(data)
    assert storage.read_file("big", len(data)) == data


def test_concurrent_savers_to_one_prefix_have_one_winner(s3_server: S3Server) -> None:  # noqa: F811
    """16 savers race for one prefix: exactly one commits, every other gets
    CheckpointExistsError, and the committed checkpoint loads bit-exact."""
    prefix, options = s3_server.fresh_prefix(), _options(s3_server)
    states = [{"w": torch.full((8, 8), float(i)), "i": i} for i in range(16)]
    outcomes: list[str] = [""] * len(states)
    barrier = threading.Barrier(len(states))

    def saver(i: int) -> None:
        storage = S3Storage(s3_server.bucket, prefix, options)
        barrier.wait()
        try:
            tessera.save(states[i], storage)
            outcomes[i] = "won"
        except CheckpointExistsError:
            outcomes[i] = "lost"
        except Exception as exc:  # noqa: BLE001 - shown in the assertion below
            outcomes[i] = repr(exc)

    threads = [threading.Thread(target=saver, args=(i,)) for i in range(len(states))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost"] * 15 + ["won"], outcomes
    loaded = tessera.load(S3Storage(s3_server.bucket, prefix, options))
    assert torch.equal(loaded["w"], states[outcomes.index("won")]["w"])
