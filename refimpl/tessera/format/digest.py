"""The manifest digest (spec R3.20, R3.21): a SHA-256 of the root ``zarr.json``'s own bytes.

The chunks carry CRCs and the manifest lists them, but nothing else checked the
manifest itself: a flipped bit in a JSON value, a key or user metadata loaded
silently. ``manifest_digest`` is ``"sha256:"`` and 64 lowercase hex digits: the
SHA-256 of the file's exact bytes with those 64 digits replaced by 64 ASCII
``0``. Hashing bytes, not a canonical re-serialization, leaves no number or
string canonicalization for implementations in other languages to get wrong,
and covers every byte (whitespace and member order included). The value must
occur in the file exactly once, so a reader finds it by a byte search.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from ..errors import ChecksumMismatchError, SchemaViolationError

__all__ = ["DIGEST_MEMBER", "PLACEHOLDER", "check_manifest_digest", "reseal_root", "seal_root"]

DIGEST_MEMBER = "manifest_digest"
_PREFIX = "sha256:"
_HEX = 64
PLACEHOLDER = _PREFIX + "0" * _HEX
"""The value a writer puts in the member before it knows the digest; also what the 64 hex
digits become when the digest is computed."""
_VALUE = re.compile(r"sha256:[0-9a-f]{64}")
_MEMBER = re.compile(rb'"manifest_digest"\s*:\s*"(sha256:[0-9a-f]{64})"')


def _digest(data: bytes | memoryview, value_at: int) -> str:
    """The digest of ``data`` whose member value (the quoted string) starts at ``value_at``."""
    hex_at = value_at + 1 + len(_PREFIX)
    view = memoryview(data)
    sha = hashlib.sha256(view[:hex_at])
    sha.update(b"0" * _HEX)
    sha.update(view[hex_at + _HEX :])
    return _PREFIX + sha.hexdigest()


def _occurrences(data: bytes, needle: bytes) -> list[int]:
    """Every start of ``needle`` in ``data`` (at most two are looked for: one is the rule)."""
    found: list[int] = []
    at = data.find(needle)
    while at >= 0 and len(found) < 2:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


def seal_root(data: bytes) -> bytes:
    """Writer: the root document ``data`` (its manifest's digest member holding
    :data:`PLACEHOLDER`) with the digest in place of the placeholder.

    The writer puts the member before any member that holds the caller's data, so its
    placeholder is the first one in the file even if user metadata holds the same string.
    """
    at = data.find(b'"' + PLACEHOLDER.encode() + b'"')
    if at < 0:
        raise ValueError("the root document has no manifest_digest placeholder")
    return _seal_at(data, at)


def _seal_at(data: bytes, at: int) -> bytes:
    """``data`` with the digest value whose opening quote is at ``at`` (64 hex digits, any)
    replaced by the digest of ``data``."""
    value = _digest(data, at)
    return data[: at + 1] + value.encode() + data[at + 1 + len(value) :]


def reseal_root(data: bytes) -> bytes:
    """A root document whose bytes were edited (by a tool that rewrites manifests, or a test
    crafting a damaged one), with the digest recomputed over the new bytes; ``data`` unchanged
    if it holds no ``"manifest_digest": "sha256:..."`` member (a 1.0 root, or not JSON at all)."""
    found = _MEMBER.search(data)
    if found is None:
        return data
    return _seal_at(data, found.start(1) - 1)


def check_manifest_digest(data: bytes, manifest: Any, where: str) -> None:
    """Reader: check ``manifest_digest`` against ``data``, the root document's bytes, when the
    (already parsed, version-checked) ``manifest`` has the member (R3.21, any minor version).

    A value that is not ``sha256:`` and 64 lowercase hex digits is a ``schema_violation``;
    a value that is not in the bytes exactly once, or not the digest, ``checksum_mismatch``.
    A manifest of version 1.1 or later without the member is refused by the schema (R3.20).
    """
    if not isinstance(manifest, dict) or DIGEST_MEMBER not in manifest:
        return
    value = manifest[DIGEST_MEMBER]
    if not isinstance(value, str) or _VALUE.fullmatch(value) is None:
        raise SchemaViolationError(f"{where}: manifest_digest must be 'sha256:' and 64 lowercase hex digits")
    found = _occurrences(data, b'"' + value.encode() + b'"')
    if len(found) != 1:
        raise ChecksumMismatchError(
            f"{where}: the manifest_digest value occurs {len(found)} times in the file's bytes "
            "(it must occur exactly once, unescaped); the root zarr.json is damaged or was edited"
        )
    actual = _digest(data, found[0])
    if actual != value:
        raise ChecksumMismatchError(
            f"{where}: the root zarr.json's SHA-256 is {actual[len(_PREFIX):]} but its manifest_digest "
            f"says {value[len(_PREFIX):]}; the manifest is damaged or was edited (restore the "
            "checkpoint from a copy)"
        )
