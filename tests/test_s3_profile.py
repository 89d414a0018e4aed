"""Named AWS profiles for ``s3://`` locations (storage/s3_profile.py), against the real
``moto_server``: the profile's credentials through boto3, its region and S3 endpoint.

The profile files are temporary (``AWS_CONFIG_FILE``, ``AWS_SHARED_CREDENTIALS_FILE``) and the
environment holds no keys and no endpoint, so a save that did not use the profile would not
find the server at all; the instance metadata service, the client's last resort for keys, is
pointed at a closed port so that it fails at once rather than reaching the network.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tessera
import torch
from tessera.errors import StorageError
from tessera.storage.resolve import storage_for

from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name

obstore = pytest.importorskip("obstore", reason="S3 storage needs obstore (the s3 extra)")
pytest.importorskip("boto3", reason="AWS profiles are read through boto3")

from tessera.storage.s3 import S3Options, S3Storage  # noqa: E402 - after the skip above

CLEARED = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@pytest.fixture
def profiles(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Server:  # noqa: F811
    """Profile ``moto`` (keys in the credentials file, region and an S3 endpoint by a
    ``services`` section in the config file) and ``flat`` (everything in the config file, the
    endpoint as a plain ``endpoint_url``); an environment with no keys, region or endpoint."""
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config").write_text(
        "[profile moto]\nregion = eu-west-3\nservices = moto-s3\n\n"
        f"[services moto-s3]\ns3 =\n  endpoint_url = {s3_server.endpoint}\n\n"
        "[profile flat]\nregion = eu-west-1\n"
        f"endpoint_url = {s3_server.endpoint}\n"
        "aws_access_key_id = flat-key\naws_secret_access_key = flat-secret\n"
    )
    (tmp_path / "credentials").write_text(
        "[moto]\naws_access_key_id = profile-key\naws_secret_access_key = s\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


def _round_trip(location: str | S3Storage) -> None:
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 2}
    tessera.save(state, location)
    loaded = tessera.load(location)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 2


def _key_id(storage: S3Storage) -> str:
    provider = storage._store.credential_provider
    assert provider is not None, "no credential provider: the profile was not used"
    return str(provider()["access_key_id"])


def test_aws_profile_gives_credentials_region_and_endpoint(
    profiles: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{profiles.bucket}/{profiles.fresh_prefix()}/ckpt"
    monkeypatch.setenv("AWS_PROFILE", "moto")
    storage = storage_for(url)
    assert isinstance(storage, S3Storage)
    assert storage._store.config["endpoint"] == profiles.endpoint  # from the services section
    assert storage._store.config["region"] == "eu-west-3"
    assert _key_id(storage) == "profile-key"
    _round_trip(url)


def test_the_environment_wins_over_the_profile_settings_but_not_over_options(
    profiles: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "flat")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    from_env = S3Storage(profiles.bucket, profiles.fresh_prefix())
    assert from_env._store.config["region"] == "ap-south-1"
    assert from_env._store.config["endpoint"] == profiles.endpoint  # the env sets none: the profile's
    assert _key_id(from_env) == "env-key"  # AWS_PROFILE yields to keys in the environment, as in the AWS CLI
    explicit = S3Storage(
        profiles.bucket, profiles.fresh_prefix(), S3Options(profile="flat", region="us-east-1")
    )
    assert explicit._store.config["region"] == "us-east-1"
    assert _key_id(explicit) == "flat-key"  # a profile named in the options wins over the env's keys
    _round_trip(explicit)


def test_an_unknown_profile_is_named(profiles: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{profiles.bucket}/{profiles.fresh_prefix()}/ckpt"
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(StorageError, match="no AWS profile named 'no-such-profile'") as caught:
        tessera.save({"w": torch.ones(2)}, url)
    assert "AWS_CONFIG_FILE" in str(caught.value) and profiles.bucket in str(caught.value)
    with pytest.raises(StorageError, match="no AWS profile named 'other'"):
        S3Storage(profiles.bucket, "p", S3Options(profile="other"))


def test_a_profile_without_boto3_says_to_install_it(
    profiles: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "obstore.auth.boto3", None)  # import fails as if boto3 were missing
    monkeypatch.setenv("AWS_PROFILE", "moto")
    with pytest.raises(StorageError, match="pip install boto3, or set AWS_ACCESS_KEY_ID"):
        tessera.save({"w": torch.ones(2)}, f"s3://{profiles.bucket}/{profiles.fresh_prefix()}")
