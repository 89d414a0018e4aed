"""Building the obstore S3 client for a ``s3://bucket/prefix`` location, and turning its errors
into Tessera's.

Configuration is what S3 users already have: the standard ``AWS_*`` environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` or
``AWS_DEFAULT_REGION``, ...), read by obstore itself, and ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph, moto), read here so that a plain
``http://`` endpoint is allowed without a second setting. A named profile of ``~/.aws/config``
and ``~/.aws/credentials`` (``AWS_PROFILE``, or ``S3Options(profile=...)``; the files may be
moved by ``AWS_CONFIG_FILE`` and ``AWS_SHARED_CREDENTIALS_FILE``) gives the credentials through
boto3, and its ``region`` and ``endpoint_url`` where nothing else sets them (s3_profile.py).
Explicit options win over the environment, the environment over the profile's settings. Every
request has a timeout and a bounded retry budget, so that nothing hangs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from ..errors import StorageError, UnsupportedLocationError
from .s3_profile import Profile, load_profile

__all__ = [
    "MAX_BACKOFF_S",
    "S3Options",
    "is_ambiguous",
    "is_not_found",
    "is_precondition",
    "make_store",
    "parse_s3_url",
    "s3_errors",
    "short",
]

try:  # obstore is the optional ``s3`` extra; the storage says how to install it where it is missing
    import obstore
    import obstore.exceptions as obstore_errors
    from obstore.store import S3Store
except ImportError:  # pragma: no cover - depends on the environment
    obstore = None  # type: ignore[assignment]


MAX_BACKOFF_S = 15.0
"""The longest wait between two retries (obstore's default): throttling (503 SlowDown) needs time."""


class S3Options:
    """Explicit settings of one S3 storage; each left ``None`` comes from the environment."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        config: Mapping[str, Any] | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 4,
        retry_timeout_s: float = 60.0,
        multipart_bytes: int = 100 << 20,
        lease_ttl_s: float = 60.0,
        lease_skew_s: float = 10.0,
        backoff_s: float = 0.1,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self.profile = profile
        """A named AWS profile; it wins over keys in the environment, where ``AWS_PROFILE`` does not."""
        self.config = dict(config or {})
        """Any other obstore ``S3Config`` key (``access_key_id``, ``secret_access_key``, ...)."""
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.retry_timeout_s = retry_timeout_s
        self.multipart_bytes = multipart_bytes
        """Files larger than this go up as multipart uploads (parallel parts, bounded memory). The
        default follows AWS's advice (multipart from about 100 MB) and keeps a full default chunk
        (64 MiB and its 4-byte CRC) one PUT: a multipart upload costs three requests or more."""
        self.backoff_s = backoff_s
        """The wait before the first retry of a request; it doubles with each retry, up to
        :data:`MAX_BACKOFF_S` (the client's retries and the storage's own, of conditional PUTs)."""
        self.lease_ttl_s = lease_ttl_s
        """How long a run-directory lock outlives its holder's last renewal (R10.12; renewed every
        third of it): a killed saver's step can be saved again this long after it died."""
        self.lease_skew_s = lease_skew_s
        """How far the clocks of processes sharing a run directory may disagree: a lease is taken
        over only this long after its expiry, and its holder counts it lost this long before."""
        if not 0 <= lease_skew_s < lease_ttl_s:
            raise ValueError(
                f"lease_skew_s ({lease_skew_s}) must be at least 0 and below lease_ttl_s ({lease_ttl_s})"
            )


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (no slashes at the ends)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise UnsupportedLocationError(f"{url!r} is not an s3://bucket/prefix location")
    if parts.query or parts.fragment:
        raise UnsupportedLocationError(f"{url!r}: an s3:// location takes no query or fragment")
    prefix = parts.path.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise UnsupportedLocationError(f"{url!r}: the prefix must be plain names separated by '/'")
    return parts.netloc, prefix


def make_store(bucket: str, options: S3Options, *, retries: bool = True) -> Any:
    """The obstore client of ``bucket``: environment, then the explicit options on top; without
    ``retries`` for the conditional PUTs, whose retries the storage makes itself."""
    if obstore is None:
        raise StorageError(
            f"s3://{bucket}: S3 locations need obstore; install tessera-checkpoint[s3] (pip install obstore)"
        )
    config: dict[str, Any] = {}
    profile = _profile(bucket, options)
    endpoint = (
        options.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or (profile and profile.endpoint_url)
    )
    if endpoint:
        config["endpoint"] = endpoint
    region = (
        options.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or (profile and profile.region)
    )
    config["region"] = region or "us-east-1"
    config.update(options.config)
    extra: dict[str, Any] = {}
    if profile is not None and "access_key_id" not in config:
        extra["credential_provider"] = profile.credential_provider
    client = {
        "timeout": timedelta(seconds=options.timeout_s),
        "connect_timeout": timedelta(seconds=options.connect_timeout_s),
        "allow_http": str(config.get("endpoint", "")).startswith("http://"),
    }
    retry = {
        "max_retries": options.max_retries if retries else 0,
        "retry_timeout": timedelta(seconds=options.retry_timeout_s),
        "backoff": {
            "init_backoff": timedelta(seconds=options.backoff_s),
            "max_backoff": timedelta(seconds=MAX_BACKOFF_S),
            "base": 2.0,
        },
    }
    try:
        return S3Store(bucket, config=config, client_options=client, retry_config=retry, **extra)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - obstore's configuration errors, reworded
        raise StorageError(f"s3://{bucket}: cannot configure the S3 client: {short(exc)}") from None


def _profile(bucket: str, options: S3Options) -> Profile | None:
    """The named profile, if any: the options' (explicit), else ``AWS_PROFILE``'s."""
    if options.profile:
        return load_profile(bucket, options.profile, explicit=True)
    name = os.environ.get("AWS_PROFILE")
    return load_profile(bucket, name, explicit=False) if name else None


def is_not_found(exc: BaseException) -> bool:
    """A 404: obstore raises the built-in ``FileNotFoundError`` for it."""
    return isinstance(exc, FileNotFoundError) and not isinstance(exc, StorageError)


def is_precondition(exc: BaseException) -> bool:
    """A 412 (or 409) on a conditional PUT: something is there, perhaps our own earlier attempt."""
    return obstore is not None and isinstance(
        exc, obstore_errors.AlreadyExistsError | obstore_errors.PreconditionError
    )


def is_ambiguous(exc: BaseException) -> bool:
    """Whether a conditional PUT that raised ``exc`` may still have been applied: a 412 (perhaps
    a retry of our own applied PUT), a timeout, a lost connection, a 5xx after the retries; not
    an answer that refused it (not found, denied, a bad request)."""
    if obstore is None or not isinstance(exc, obstore_errors.BaseError):
        return False
    return not isinstance(
        exc,
        obstore_errors.PermissionDeniedError
        | obstore_errors.UnauthenticatedError
        | obstore_errors.InvalidPathError
        | obstore_errors.NotSupportedError
        | obstore_errors.UnknownConfigurationKeyError,
    )


@contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Re-raise an obstore error as a :class:`StorageError` saying ``what`` failed (with the URL)
    and the store's answer, shortened; a missing bucket, denied access and missing credentials
    say what to check."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if not is_not_found(exc) and (obstore is None or not isinstance(exc, obstore_errors.BaseError)):
            raise
        answer = short(exc)
        hint = next((h for code, h in _HINTS.items() if answer.startswith(code)), "")
        if "/latest/api/token" in answer or "/latest/meta-data" in answer:
            # No credentials in the options or the environment: the client fell back to the
            # EC2 instance metadata service, which is not there.
            answer, hint = "no AWS credentials found", _NO_CREDENTIALS
        denied = obstore_errors.PermissionDeniedError | obstore_errors.UnauthenticatedError
        if not hint and isinstance(exc, denied):
            hint = _HINTS["AccessDenied"]
        raise StorageError(f"{what}: {answer}{hint}") from None


def short(exc: BaseException) -> str:
    """The store's own answer where its XML error body is in the message (``NoSuchBucket: The
    specified bucket does not exist``), else the message's first 400 characters."""
    text = " ".join(str(exc).split())
    code, message = _CODE.search(text), _MESSAGE.search(text)
    if code:
        return f"{code.group(1)}: {message.group(1) if message else ''}".rstrip(": ")
    return text if len(text) <= 400 else text[:400] + "..."


_CODE = re.compile(r"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_NO_CREDENTIALS = (
    " (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run where an instance role,"
    " AWS_WEB_IDENTITY_TOKEN_FILE or container credentials provide them)"
)
_HINTS = {
    "NoSuchBucket": " (create the bucket, or check the name and AWS_ENDPOINT_URL)",
    "AccessDenied": " (check the AWS_* credentials and the bucket's policy)",
    "InvalidAccessKeyId": " (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
    "SignatureDoesNotMatch": " (check AWS_SECRET_ACCESS_KEY)",
}
