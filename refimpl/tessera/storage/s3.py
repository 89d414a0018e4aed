"""A checkpoint in an S3 (or S3-compatible) bucket, under a prefix, on obstore.

Why each step (spec §9): the claim and the root are PUTs with ``If-None-Match: *`` (obstore's
``mode="create"``), so two savers never share a prefix and the first root wins (R9.3, R9.11).
A PUT whose answer is ambiguous (a timeout, a lost connection after obstore's retries, or a
412 that a retry of our own applied PUT can cause) is settled by reading the object back and
comparing its ``save_id``: never by publishing blindly. Every completed PUT is durable, so
``sync`` has nothing to do (R9.8). Every request is a round trip, so reads make few: a chunk
read from its start is one GET streamed into the caller's blocks; a read from an offset is
ranged GETs pinned to the object's ETag; saves and loads keep ``S3_CONCURRENCY`` requests in
flight (:attr:`S3Storage.concurrency`).

The run-directory operations that need leases (``lock``, ``replace_file``,
``remove_checkpoint``; spec R10.12) are not implemented yet and refuse with the interface's
:class:`StorageError`; ``child``, ``kind`` and ``entries`` are.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointExistsError, LimitExceededError, StorageError
from .base import (
    CLAIM_FILE,
    ROOT_METADATA,
    Buffer,
    EntryKind,
    FileMissingError,
    ReadNext,
    Storage,
    check_relative_path,
    claim_names,
)
from .s3_client import (
    S3Options,
    is_ambiguous,
    is_not_found,
    is_precondition,
    make_store,
    obstore,
    parse_s3_url,
    s3_errors,
    short,
)

if TYPE_CHECKING:
    from obstore import GetOptions

__all__ = ["S3Options", "S3Storage", "storage_from_url"]


def storage_from_url(url: str) -> S3Storage:
    """The ``tessera.storage`` entry point for ``s3://bucket/prefix``: settings from the environment."""
    bucket, prefix = parse_s3_url(url)
    return S3Storage(bucket, prefix)


class S3Storage(Storage):
    """One checkpoint at ``s3://bucket/prefix``; ``options`` override the ``AWS_*`` environment."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        options: S3Options | None = None,
        *,
        _store: tuple[Any, Any] | None = None,
    ) -> None:
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._options = options or S3Options()
        if _store is None:
            _store = (make_store(bucket, self._options), make_store(bucket, self._options, retries=False))
        self._store, self._store_once = _store

    @property
    def location(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}"

    @property
    def concurrency(self) -> int:
        """Requests in flight for a save's or a load's chunks: S3 answers each in tens of
        milliseconds whatever the machine, so many more than a disk's few per core."""
        return S3_CONCURRENCY

    def _key(self, path: str) -> str:
        relative = check_relative_path(path)
        return f"{self._prefix}/{relative}" if self._prefix else relative

    def _url(self, path: str) -> str:
        return f"s3://{self._bucket}/{self._key(path)}"

    def _dir_key(self, path: str) -> str:
        """The listing prefix of the directory ``path`` (``""``: the root), ending in ``/``."""
        base = self._key(path) if path else self._prefix
        return f"{base}/" if base else ""

    # -- writing ---------------------------------------------------------------------------

    def claim(self, doc: bytes) -> None:
        names = self.list("")  # also the first request: a missing bucket fails here, before any PUT
        if ROOT_METADATA in names:
            raise CheckpointExistsError(
                f"{self.location} already holds a committed checkpoint; "
                "save to a new prefix (checkpoints are never overwritten)"
            )
        if names and CLAIM_FILE not in names:
            raise CheckpointExistsError(
                f"{self.location} is not empty ({sorted(names)[:5]}); save under a new or empty prefix"
            )
        save_id = _save_id(doc) or ""
        if not self._put_once(CLAIM_FILE, doc, save_id):
            raise CheckpointExistsError(
                f"{self.location} was already claimed by another save ({CLAIM_FILE} exists) and two "
                "writers never share a prefix; if that save died uncommitted, delete the prefix"
            )
        self._check_conditional_writes(doc)

    def _check_conditional_writes(self, doc: bytes) -> None:
        """A second ``If-None-Match: *`` PUT of the claim must be refused: a store that accepts it
        ignores conditional writes, so neither the claim nor the root would be first-wins. Such
        a store is refused (its claim removed) before anything else is written."""
        key = self._key(CLAIM_FILE)
        with s3_errors(f"cannot write {self._url(CLAIM_FILE)}"):
            try:
                obstore.put(self._store_once, key, doc, mode="create")
            except Exception as exc:
                if is_precondition(exc):
                    return
                raise
            obstore.delete(self._store, key)
        raise StorageError(
            f"{self.location}: the store ignores conditional writes (If-None-Match: *), so a commit "
            "could silently replace another save's; use a store that supports them (AWS S3, MinIO, "
            "moto 5.2.5 or newer, ...)"
        )

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        key, url = self._key(path), self._url(path)
        parts: list[memoryview] = []
        for buffer in buffers:
            if isinstance(buffer, torch.Tensor):
                raise TypeError(f"{url}: S3Storage has no device I/O; give it host buffers")
            parts.append(memoryview(buffer).cast("B"))
        total = sum(p.nbytes for p in parts)
        with s3_errors(f"cannot write {url}"):
            if total > self._options.multipart_bytes:
                # Only the claim's holder writes under the prefix (R9.4), so the unconditional
                # multipart upload cannot replace a rival's file.
                obstore.put(self._store, key, parts, use_multipart=True, chunk_size=16 << 20)
                return
            try:
                body = parts[0] if len(parts) == 1 else b"".join(parts)  # one part: no copy
                obstore.put(self._store, key, body, mode="create")
            except Exception as exc:
                if is_precondition(exc):
                    raise StorageError(f"cannot write {url}: it exists (files are written once)") from None
                raise

    def sync(self) -> None:
        """Nothing: a PUT that completed is durable (R9.8)."""

    def publish_root(self, data: bytes, save_id: str) -> None:
        if not self._put_once(ROOT_METADATA, data, save_id):
            raise CheckpointExistsError(
                f"{self._url(ROOT_METADATA)} appeared during the save: another writer committed first"
            )

    def _put_once(self, path: str, data: bytes, save_id: str) -> bool:
        """PUT ``path`` with ``If-None-Match: *``: ``True`` if this save's object is there after
        (written now, or by an attempt whose answer was lost), ``False`` if another save's is.

        The retries are ours (the client's are off for this PUT), so that a 412 to the first
        attempt is known to be a rival's object, and only one after a lost answer is settled by
        reading back (R9.3, R9.11)."""
        url = self._url(path)
        answer = ""
        for attempt in range(self._options.max_retries + 1):
            if attempt:
                time.sleep(min(0.1 * 2**attempt, 2.0))
            with s3_errors(f"cannot write {url}"):
                try:
                    obstore.put(self._store_once, self._key(path), data, mode="create")
                    return True
                except Exception as exc:
                    if is_precondition(exc) and not answer:
                        return False
                    if not is_ambiguous(exc):
                        raise
                    answer = short(exc)
                    if is_precondition(exc):
                        break
        # An answer was lost and then a 412 came, or the retries ran out: what is there now
        # says who won (R9.3, R9.11).
        try:
            found = self.read_file(path, 1 << 20)
        except FileMissingError:
            raise StorageError(
                f"cannot write {url}: the store did not answer clearly ({answer}) and the object is "
                "not there; nothing was committed, save again"
            ) from None
        return found == data or _save_id(found) == save_id

    def remove_unpublished(self, save_id: str) -> None:
        """Every object under the prefix but the claim first, the claim last, only while the
        claim names ``save_id`` and no root ``zarr.json`` exists (R9.7)."""
        if not claim_names(self, save_id):
            return
        if self.size(ROOT_METADATA) is not None:
            return
        claim_key = self._key(CLAIM_FILE)
        with s3_errors(f"cannot remove the uncommitted save at {self.location}"):
            keys = [
                meta["path"]
                for batch in obstore.list(self._store, prefix=self._dir_key(""))
                for meta in batch
                if meta["path"] != claim_key
            ]
            for start in range(0, len(keys), 1000):
                obstore.delete(self._store, keys[start : start + 1000])
            obstore.delete(self._store, claim_key)

    # -- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        with s3_errors(f"cannot list {self.location}"):
            stream = obstore.list(self._store, prefix=self._dir_key(""), chunk_size=1)
            return any(len(batch) > 0 for batch in stream)

    def size(self, path: str) -> int | None:
        key = self._key(path)
        with s3_errors(f"cannot read {self._url(path)}"):
            try:
                return int(obstore.head(self._store, key)["size"])
            except Exception as exc:
                if is_not_found(exc):
                    return None
                raise

    def read_file(self, path: str, max_bytes: int) -> bytes:
        key, url = self._key(path), self._url(path)
        with s3_errors(f"cannot read {url}"):
            try:
                result = obstore.get(self._store, key)
            except Exception as exc:
                if is_not_found(exc):
                    raise FileMissingError(f"cannot read {url}: no such object") from None
                raise
            size = int(result.meta["size"])
            if size > max_bytes:
                raise LimitExceededError(f"{url} is {size} bytes, over the limit of {max_bytes}")
            data = bytes(result.bytes())
        if len(data) != size:
            raise StorageError(f"{url} ended early ({len(data)} of {size} bytes)")
        return data

    def read_into(self, path: str, offset: int, fill: Callable[[int | None, ReadNext], None]) -> None:
        """A read from the start is ONE GET: its answer's ``meta`` gives the size (before any
        body byte is read), and the body streams into the caller's blocks. A read from an
        ``offset`` asks the size with a HEAD, then one ranged GET per block, each pinned to the
        ETag the HEAD saw (``If-Match``), so an object replaced mid-read is an error, never a
        mix of two objects' bytes."""
        url = self._url(path)
        if offset:
            self._read_ranges(path, offset, fill)
            return
        with s3_errors(f"cannot read {url}"):
            try:
                result = obstore.get(self._store, self._key(path))
            except Exception as exc:
                if not is_not_found(exc):
                    raise
                result = None
        if result is None:

            def missing(out: memoryview | torch.Tensor) -> None:
                raise FileMissingError(f"cannot read {url}: no such object")

            fill(None, missing)
            return
        size = int(result.meta["size"])
        body = _Body(url, size, result.stream(min_chunk_size=STREAM_CHUNK_BYTES))
        fill(size, body.read)

    def _read_ranges(self, path: str, offset: int, fill: Callable[[int | None, ReadNext], None]) -> None:
        key, url = self._key(path), self._url(path)
        with s3_errors(f"cannot read {url}"):
            try:
                meta = obstore.head(self._store, key)
            except Exception as exc:
                if not is_not_found(exc):
                    raise
                meta = None
        if meta is None:

            def missing(out: memoryview | torch.Tensor) -> None:
                raise FileMissingError(f"cannot read {url}: no such object")

            fill(None, missing)
            return
        size, etag = int(meta["size"]), meta["e_tag"]
        position = offset

        def read(out: memoryview | torch.Tensor) -> None:
            nonlocal position
            view = _host_view(url, out)
            if not view.nbytes:
                return
            if position + view.nbytes > size:
                raise StorageError(f"{url} ended early ({size} bytes, read to {position + view.nbytes})")
            options: GetOptions = {"range": (position, position + view.nbytes)}
            if etag:
                options["if_match"] = etag
            with s3_errors(f"cannot read {url} (replaced while being read?)"):
                got = obstore.get(self._store, key, options=options).bytes()
            if len(got) != view.nbytes:
                raise StorageError(f"{url} ended early (truncated object)")
            view[:] = memoryview(got).cast("B")
            position += view.nbytes

        fill(size, read)

    def list(self, path: str) -> builtins.list[str]:
        return [name for name, _ in self.entries(path)]

    # -- run directories (the lease-free part) -----------------------------------------------

    def child(self, name: str) -> S3Storage:
        return S3Storage(self._bucket, self._key(name), self._options, _store=(self._store, self._store_once))

    def kind(self, path: str) -> EntryKind | None:
        if self.size(path) is not None:
            return "file"
        with s3_errors(f"cannot list {self._url(path)}"):
            stream = obstore.list(self._store, prefix=self._dir_key(path), chunk_size=1)
            return "dir" if any(len(batch) > 0 for batch in stream) else None

    def entries(self, path: str = "") -> builtins.list[tuple[str, EntryKind]]:
        where = self._dir_key(path)
        with s3_errors(f"cannot list s3://{self._bucket}/{where}"):
            found = obstore.list_with_delimiter(self._store, prefix=where or None)
        files: list[tuple[str, EntryKind]] = [
            (meta["path"][len(where) :], "file") for meta in found["objects"]
        ]
        dirs: list[tuple[str, EntryKind]] = [
            (p[len(where) :].rstrip("/"), "dir") for p in found["common_prefixes"]
        ]
        return sorted(e for e in files + dirs if e[0])


S3_CONCURRENCY = 16
"""Threads of a save or load on S3 where the caller set none (measured: bench/RESULTS.md)."""
STREAM_CHUNK_BYTES = 8 << 20
"""The least a streamed GET hands over at once: few Python-level copies, bounded memory."""


def _host_view(url: str, out: memoryview | torch.Tensor) -> memoryview:
    if isinstance(out, torch.Tensor):
        raise TypeError(f"{url}: S3Storage has no device I/O; read into host buffers")
    return out.cast("B")


class _Body:
    """The body of one GET, handed to the caller's blocks in order as it arrives."""

    def __init__(self, url: str, size: int, stream: Iterable[Any]) -> None:
        self._url, self._size, self._stream = url, size, iter(stream)
        self._left = memoryview(b"")
        self._position = 0

    def read(self, out: memoryview | torch.Tensor) -> None:
        view = _host_view(self._url, out)
        end = self._position + view.nbytes
        if end > self._size:
            raise StorageError(f"{self._url} ended early ({self._size} bytes, read to {end})")
        at = 0
        while at < view.nbytes:
            if not self._left.nbytes:
                with s3_errors(f"cannot read {self._url}"):
                    piece = next(self._stream, None)
                if piece is None:
                    raise StorageError(
                        f"{self._url} ended early (the body stopped at {self._position + at} of "
                        f"{self._size} bytes)"
                    )
                self._left = memoryview(piece).cast("B")
            n = min(self._left.nbytes, view.nbytes - at)
            view[at : at + n] = self._left[:n]
            self._left, at = self._left[n:], at + n
        self._position = end


def _save_id(doc: bytes) -> str | None:
    """The ``save_id`` of a claim document or of a root ``zarr.json`` (under
    ``attributes.tessera``); ``None`` when the bytes hold neither."""
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
