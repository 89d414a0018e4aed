"""Named AWS profiles (``~/.aws/credentials``, ``~/.aws/config``) for the S3 storage, through boto3.

Many users configure S3 with profiles rather than ``AWS_*`` keys, but obstore reads only the
environment. Where a profile is named (``S3Options(profile=...)``, or ``AWS_PROFILE``), its
credentials come from a botocore session, so every kind of profile boto3 understands works (static
keys, ``credential_process``, SSO, assume-role) and is refreshed as boto3 refreshes it; its
``region`` and S3 ``endpoint_url`` apply where neither the options nor the environment set them.

Precedence is the AWS command line's: an explicit profile beats ``AWS_ACCESS_KEY_ID`` in the
environment (botocore drops the environment's keys for an explicitly named profile), while
``AWS_PROFILE`` yields to those keys, as it does for ``aws --profile`` versus the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import StorageError

__all__ = ["Profile", "load_profile"]


@dataclass(frozen=True, slots=True)
class Profile:
    """What a named profile contributes to the S3 client."""

    name: str
    credential_provider: Any
    """An ``obstore.auth.boto3.Boto3CredentialProvider`` over the profile's session."""
    region: str | None
    endpoint_url: str | None


def load_profile(bucket: str, name: str, *, explicit: bool) -> Profile:
    """The profile ``name`` for ``s3://bucket``; ``explicit`` when the options name it (it then
    wins over keys in the environment), not when it comes from ``AWS_PROFILE``.

    Raises :class:`StorageError` without boto3, for a profile no file defines, and for one that
    holds no credentials, saying which files were read."""
    try:
        import botocore.exceptions
        import botocore.session
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise StorageError(
            f"s3://{bucket}: the AWS profile {name!r} is read through boto3, which is not installed:"
            " pip install boto3, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
        ) from None
    session = botocore.session.Session(profile=name) if explicit else botocore.session.Session()
    try:
        scoped = session.get_scoped_config()
        credentials = session.get_credentials()
        region = session.get_config_variable("region")
    except botocore.exceptions.ProfileNotFound:
        raise StorageError(
            f"s3://{bucket}: no AWS profile named {name!r} in {_files()}"
            " (check the name in AWS_PROFILE or S3Options(profile=...), AWS_CONFIG_FILE and"
            " AWS_SHARED_CREDENTIALS_FILE)"
        ) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageError(f"s3://{bucket}: cannot read the AWS profile {name!r}: {exc}") from None
    if credentials is None:
        raise StorageError(
            f"s3://{bucket}: the AWS profile {name!r} in {_files()} gives no credentials"
            " (add aws_access_key_id and aws_secret_access_key to it, or set them in the environment)"
        )
    return Profile(name, Boto3CredentialProvider(session), region, _endpoint(session, scoped))


def _endpoint(session: Any, scoped: dict[str, Any]) -> str | None:
    """The profile's S3 endpoint: its ``services`` section's ``s3 = endpoint_url = ...`` first,
    then its own ``endpoint_url`` (the AWS configuration files' two spellings)."""
    services = session.full_config.get("services", {}).get(scoped.get("services", ""), {})
    found = services.get("s3", {}).get("endpoint_url") or scoped.get("endpoint_url")
    return str(found) if found else None


def _files() -> str:
    config = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
    credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    return f"{config} or {credentials}"
