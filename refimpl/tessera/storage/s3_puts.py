"""The PUTs of an S3 save that must neither be lost nor land twice, with the retries the storage
makes itself, and what an unclear answer leaves to find out.

Why our own retries: the client does not retry a PUT whose connection reset after the body was
sent, and a retried ``If-None-Match: *`` PUT whose first attempt the store applied unseen gets
412, which alone cannot tell our own object from a rival's. So :func:`create_object` makes every
attempt itself (the client's retries off for it), remembers whether an answer was lost, and
reports which of the four outcomes it met; the storage settles the unclear ones by reading the
object back (R9.3, R9.5, R9.11). A multipart upload cannot be create-only; :func:`upload_whole`
sends it again whole after an unclear answer, which is safe because only the claim's holder
writes under the prefix (R9.4).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from .s3_client import (
    MAX_BACKOFF_S,
    S3Options,
    is_ambiguous,
    is_not_found,
    is_precondition,
    obstore,
    s3_errors,
    short,
)

__all__ = ["Created", "create_object", "save_id_of", "upload_whole"]

Created = Literal["created", "taken", "taken-after-unclear", "unclear"]
"""What :func:`create_object` found: a 2xx; a 412 to its first attempt (the object was there
before); a 412 after an attempt whose answer was lost (perhaps our own object); no clear answer
before the retries ran out. The last two need a read-back."""


def create_object(
    store_once: Any, key: str, url: str, body: bytes | list[memoryview], options: S3Options
) -> tuple[Created, str]:
    """PUT ``key`` with ``If-None-Match: *`` through ``store_once`` (a client without retries),
    retrying with backoff: the outcome, and the last unclear answer (``""`` if none).

    A list of buffers (a chunk's bytes and its CRC) goes as one body without being joined:
    obstore sends the pieces in order, so a save holds no copy of the chunks it has in flight
    (measured: a 256 MiB chunk joined first cost 258 MiB more, sent as pieces 2 MiB).

    Retried: whatever may not have been applied or may have been applied unseen (5xx,
    throttling, a timeout, a reset connection), until the retries run out (``"unclear"``); an
    answer that refused the PUT (denied, a bad path) raises :class:`StorageError` at once."""
    answer = ""
    for attempt in range(options.max_retries + 1):
        if attempt:
            time.sleep(_backoff(options.backoff_s, attempt))
        with s3_errors(f"cannot write {url}"):
            try:
                obstore.put(store_once, key, body, mode="create", use_multipart=False)
                return "created", answer
            except Exception as exc:
                if is_precondition(exc):
                    return ("taken-after-unclear" if answer else "taken"), answer
                if not is_ambiguous(exc):
                    raise
                answer = short(exc)
    return "unclear", answer


def upload_whole(store: Any, key: str, url: str, parts: list[memoryview], options: S3Options) -> None:
    """A multipart upload (parallel parts, each retried by the client), the whole upload sent
    again after an unclear answer: it can only replace this save's own earlier upload, with the
    same bytes (R9.4)."""
    for attempt in range(options.max_retries + 1):
        if attempt:
            time.sleep(_backoff(options.backoff_s, attempt))
        with s3_errors(f"cannot write {url}"):
            try:
                obstore.put(store, key, parts, use_multipart=True, chunk_size=16 << 20)
                return
            except Exception as exc:
                # A 404 too: a retried completion of an upload whose first answer was lost
                # finds it gone (NoSuchUpload), though the object may be there.
                retry = is_ambiguous(exc) or is_not_found(exc)
                if not retry or attempt == options.max_retries:
                    raise


def save_id_of(doc: bytes) -> str | None:
    """The ``save_id`` of a claim document or of a root ``zarr.json`` (under
    ``attributes.tessera``); ``None`` when the bytes hold neither: what a read-back compares."""
    try:
        parsed = json.loads(doc)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    found = parsed.get("save_id")
    if found is None:
        tessera = (parsed.get("attributes") or {}).get("tessera")
        found = tessera.get("save_id") if isinstance(tessera, dict) else None
    return found if isinstance(found, str) else None


def _backoff(first: float, attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): ``first``, doubling, at most the client's
    longest wait (:data:`~tessera.storage.s3_client.MAX_BACKOFF_S`)."""
    return float(min(first * 2 ** (attempt - 1), MAX_BACKOFF_S))
