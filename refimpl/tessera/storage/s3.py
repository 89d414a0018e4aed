"""A checkpoint in an S3 (or S3-compatible) bucket, under a prefix, on obstore.

Why each step (spec §9): the claim and the root are PUTs with ``If-None-Match: *`` (obstore's
``mode="create"``), so two savers never share a prefix and the first root wins (R9.3, R9.11).
A PUT whose answer is ambiguous (a timeout, a lost connection after obstore's retries, or a
412 that a retry of our own applied PUT can cause) is settled by reading the object back and
comparing its ``save_id``: never by publishing blindly. Chunks and array documents are PUTs
with ``If-None-Match: *`` too (R9.5), retried by the storage itself after an unclear answer (the
client does not retry a PUT whose connection reset after sending it); a 412 then is settled by
comparing the bytes read back, since only the claim's holder writes under the prefix (R9.4).
Files over ``multipart_bytes`` go up as multipart uploads, retried whole
(:mod:`tessera.storage.s3_puts`). Every completed PUT is durable, so ``sync`` has nothing to do
(R9.8). Every request is a round trip, so reads make few: a chunk read from its start is one GET
streamed into the caller's blocks; a read from an offset is ranged GETs pinned to the object's
ETag, so a region read fetches only the bytes it needs; saves and loads keep ``S3_CONCURRENCY``
requests in flight (:attr:`S3Storage.concurrency`).

Run directories (spec §10) live under a prefix too: a step is the prefix ``step-N/``, ``kind``
and ``entries`` list with a delimiter (an object store has no links, FIFOs or devices, so every
entry is a ``file`` or a ``dir``); ``latest`` is replaced by one unconditional PUT, which readers
see whole or not at all (R10.3); a checkpoint is deleted root ``zarr.json`` first, then the rest,
its claim last (R10.6). Locks are leases: objects at the marker keys, taken by conditional PUTs
and renewed by a heartbeat (R10.12; :mod:`tessera.storage.s3_lease` says how and why).
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

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
    is_not_found,
    make_store,
    obstore,
    parse_s3_url,
    s3_errors,
)
from .s3_lease import LeaseSettings, S3Lease, take_lease
from .s3_puts import Created, create_object, save_id_of, upload_whole
from .s3_reads import read_ranges, read_streamed

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
        _leases: dict[str, S3Lease] | None = None,
    ) -> None:
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._options = options or S3Options()
        if _store is None:
            _store = (make_store(bucket, self._options), make_store(bucket, self._options, retries=False))
        self._store, self._store_once = _store
        self._leases: dict[str, S3Lease] = {} if _leases is None else _leases
        """The leases this storage and its children took, by marker key (see ``_check_lease``)."""

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
        save_id = save_id_of(doc) or ""
        if not self._put_once(CLAIM_FILE, doc, save_id):
            raise CheckpointExistsError(
                f"{self.location} was already claimed by another save ({CLAIM_FILE} exists) and two "
                "writers never share a prefix; if that save died uncommitted, delete the prefix"
            )
        try:
            self._check_conditional_writes(doc)
        except StorageError:
            # The claim is ours: the refused save leaves nothing (R9.7). If that fails too, the
            # check's error says more, and the leftover claim refuses later saves by name.
            with contextlib.suppress(StorageError):
                self.remove_unpublished(save_id)
            raise

    def _check_conditional_writes(self, doc: bytes) -> None:
        """A second ``If-None-Match: *`` PUT of the claim must be refused: a store that accepts it
        ignores conditional writes, so neither the claim nor the root would be first-wins. Such
        a store is refused before anything else is written. A retry of this PUT rewrites the
        same bytes, so a 412 after a lost answer still shows the store enforcing the condition."""
        outcome, answer = self._create(CLAIM_FILE, doc)
        if outcome == "unclear":
            raise StorageError(
                f"cannot write {self._url(CLAIM_FILE)}: the store did not answer clearly ({answer}) "
                "while checking that it enforces conditional writes; nothing was committed, save again"
            )
        if outcome == "created":
            raise StorageError(
                f"{self.location}: the store ignores conditional writes (If-None-Match: *), so a commit "
                "could silently replace another save's; use a store that supports them (AWS S3, MinIO, "
                "moto 5.2.5 or newer, ...)"
            )

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        """PUT one chunk or document with ``If-None-Match: *`` (R9.5), retried on 5xx, throttling,
        timeouts and lost connections. A 412 after an attempt whose answer was lost (or a reset
        once the store had applied it) is settled by reading the object back: only the claim's
        holder writes under the prefix (R9.4), so equal bytes are our own earlier attempt, and
        other bytes are refused, never overwritten."""
        url = self._url(path)
        parts: list[memoryview] = []
        for buffer in buffers:
            if isinstance(buffer, torch.Tensor):
                raise TypeError(f"{url}: S3Storage has no device I/O; give it host buffers")
            parts.append(memoryview(buffer).cast("B"))
        if sum(p.nbytes for p in parts) > self._options.multipart_bytes:
            upload_whole(self._store, self._key(path), self._url(path), parts, self._options)
            return
        outcome, answer = self._create(path, parts)
        if outcome == "created":
            return
        if outcome == "taken":
            raise StorageError(f"cannot write {url}: it exists (files are written once, R9.5)")
        try:
            size = sum(p.nbytes for p in parts)
            same = self.read_file(path, size) == b"".join(parts)  # rare: after an unclear answer
        except FileMissingError:
            raise StorageError(
                f"cannot write {url}: the store did not answer clearly ({answer}) and the object is "
                "not there; nothing was committed, save again"
            ) from None
        except LimitExceededError:
            same = False
        if not same:
            raise StorageError(
                f"cannot write {url}: after an unclear answer ({answer}) the object there holds other "
                "bytes than this save's; another writer is using the prefix (R9.4), save elsewhere"
            )

    def sync(self) -> None:
        """Nothing: a PUT that completed is durable (R9.8)."""

    def publish_root(self, data: bytes, save_id: str) -> None:
        self._check_lease()
        if not self._put_once(ROOT_METADATA, data, save_id):
            raise CheckpointExistsError(
                f"{self._url(ROOT_METADATA)} appeared during the save: another writer committed first"
            )

    def _put_once(self, path: str, data: bytes, save_id: str) -> bool:
        """PUT ``path`` with ``If-None-Match: *``: ``True`` if this save's object is there after
        (written now, or by an attempt whose answer was lost), ``False`` if another save's is.

        A 412 to the first attempt is a rival's object; one after a lost answer, or retries that
        ran out, is settled by reading back and comparing the ``save_id`` (R9.3, R9.11)."""
        outcome, answer = self._create(path, data)
        if outcome != "unclear" and outcome != "taken-after-unclear":
            return outcome == "created"
        try:
            found = self.read_file(path, 1 << 20)
        except FileMissingError:
            raise StorageError(
                f"cannot write {self._url(path)}: the store did not answer clearly ({answer}) and the "
                "object is not there; nothing was committed, save again"
            ) from None
        return found == data or save_id_of(found) == save_id

    def _create(self, path: str, body: bytes | builtins.list[memoryview]) -> tuple[Created, str]:
        return create_object(self._store_once, self._key(path), self._url(path), body, self._options)

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
        """A read from the start is ONE GET whose body streams into the caller's blocks; a read
        from an ``offset``, ranged GETs pinned to the object's ETag (:mod:`tessera.storage.s3_reads`)."""
        key, url = self._key(path), self._url(path)
        if offset:
            read_ranges(self._store, key, url, offset, fill)
        else:
            read_streamed(self._store, key, url, fill)

    def list(self, path: str) -> builtins.list[str]:
        return [name for name, _ in self.entries(path)]

    def listed_sizes(self) -> dict[str, int]:
        """One listing of the prefix (a page per 1,000 objects), not a HEAD per object."""
        where = self._dir_key("")
        with s3_errors(f"cannot list {self.location}"):
            return {
                meta["path"][len(where) :]: int(meta["size"])
                for batch in obstore.list(self._store, prefix=where)
                for meta in batch
            }

    # -- run directories ---------------------------------------------------------------------

    def child(self, name: str) -> S3Storage:
        store = (self._store, self._store_once)
        return S3Storage(self._bucket, self._key(name), self._options, _store=store, _leases=self._leases)

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

    def replace_file(self, path: str, data: bytes) -> None:
        """One unconditional PUT: a reader sees the old object or the new one (R10.3); there is no
        temporary object to leave behind, nor a link to follow."""
        with s3_errors(f"cannot write {self._url(path)}"):
            obstore.put(self._store, self._key(path), data)

    def lock(self, path: str | None, *, create: bool, wait: float) -> S3Lease | None:
        """A lease at the marker ``path``; ``None`` (the run's own lock) is the marker
        :data:`RUN_LOCK`, made whatever ``create`` says (a prefix always exists) and deleted at
        release, so it leaves nothing behind."""
        marker = RUN_LOCK if path is None else path
        settings = LeaseSettings(
            self._store,
            self._store_once,
            self._key(marker),
            self._url(marker),
            self._options.lease_ttl_s,
            self._options.lease_skew_s,
            self._options.max_retries + 1,
        )
        lease = take_lease(settings, create=create or path is None, wait=wait)
        if lease is not None:
            self._leases[settings.key] = lease
        return lease

    def _check_lease(self) -> None:
        """A checkpoint saved under its run directory's step lock (``.<name>.lock`` beside it,
        R10.9) is committed only while this process's lease on that lock is valid (R10.12): a
        holder that could not renew in time may have been taken over, and the taker may be
        removing this save's files as a dead save's leftover."""
        parent, _, name = self._prefix.rpartition("/")
        lease = self._leases.get(f"{parent}/.{name}.lock" if parent else f".{name}.lock")
        if lease is not None:
            lease.check(f"commit {self.location}")

    def remove_checkpoint(self, path: str) -> None:
        """The root ``zarr.json`` first (a deletion cut short leaves an uncommitted checkpoint,
        R10.6), then every other object under ``path/`` in batches, the claim last (so no plain
        save claims a half-deleted prefix); keys that vanished meanwhile are no error."""
        where = self._dir_key(path)
        claim = f"{where}{CLAIM_FILE}"
        with s3_errors(f"cannot remove the checkpoint {self._url(path)}"):
            try:
                obstore.delete(self._store, f"{where}{ROOT_METADATA}")
            except Exception as exc:
                if not is_not_found(exc):
                    raise
            keys = [m["path"] for batch in obstore.list(self._store, prefix=where) for m in batch]
            rest = [k for k in keys if k != claim]
            for start in range(0, len(rest), 1000):
                obstore.delete(self._store, rest[start : start + 1000])
            if claim in keys:
                obstore.delete(self._store, claim)


RUN_LOCK = ".latest.lock"
"""The marker of a run's own lock (``lock(None)``, held while ``latest`` moves, R10.8)."""


S3_CONCURRENCY = 16
"""Threads of a save or load on S3 where the caller set none (measured: bench/RESULTS.md)."""
