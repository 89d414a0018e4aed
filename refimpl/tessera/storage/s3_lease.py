"""Locks on an object store: a lease object at the lock's marker key (spec R10.12, "Object store").

An object store has no ``flock``, and a lock whose holder died must become free without anyone
cleaning up after it, so a lock is a *lease*: a small JSON object at the marker key,

    {"tessera_lease": 1, "holder": "<random id, new at each take>", "expires": "2026-12-07T05:10:00.000Z"}

- **Take**: ``PUT`` with ``If-None-Match: *``: the marker was not there, the lock is taken and
  ``created`` (R10.11: no leftover of a run-directory save can be at this step).
- **Held or free**: where the marker exists, it is read (body and ETag). It is *free* when its
  lease expired: the reader's clock is past ``expires`` (UTC, RFC 3339) by more than the
  clock-skew margin; a marker that is no lease (an empty or foreign object) is free too. A free
  marker is
  taken over by ``PUT`` with ``If-Match: <its ETag>``, so that of two takers exactly one wins (the
  other gets 412: held); ``created`` is then ``False`` (a marker was there: its holder is gone).
- **Heartbeat**: while the lock is held, a daemon thread renews the lease every ``ttl / 3`` by
  ``PUT If-Match`` of the ETag it last wrote, moving ``expires`` to now + ``ttl``. A 412 means
  someone took the marker over, which happens only if this holder did not renew for ``ttl``
  (plus the margin): the lock is *lost*, said by a :class:`~tessera.TesseraWarning`; release
  then leaves the new holder's marker alone, and :attr:`S3Lease.valid` turns false, which the
  storage checks before it commits a checkpoint under the lock (``publish_root``): a save whose
  lease ran out is not committed (R10.12).
- **Release**: the heartbeat stops; the marker is deleted, or with ``keep_marker`` rewritten with
  an ``expires`` in the past (``If-Match``), so that ``lock(create=False)`` finds it free. The
  DELETE is unconditional (obstore has no conditional DELETE), so it is sent only while the lease
  is valid by the holder's own clock, when no one else can have taken it; past that, release
  rewrites the marker expired instead, conditionally, as with ``keep_marker``.

Clock-skew assumption (R10.12, "a lock that can be taken has no live holder"): ``expires`` is
written by the holder's clock and judged by the taker's, so the clocks of the processes sharing a
run directory must agree within ``skew_s`` (NTP keeps them within milliseconds; the default margin
is 10 s). A holder also gives its lease up by its own clock: a renewal it could not make before
``expires - skew_s`` marks it lost, so it never believes it holds a lease a taker may take.

A request whose answer is lost (a timeout, a reset) may still have been applied; it is settled by
reading the marker back and comparing the holder id, as the claim's read-back does (R9.3).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import warnings
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import StorageError, TesseraWarning
from .base import Lock
from .s3_client import is_ambiguous, is_not_found, is_precondition, obstore, s3_errors, short

__all__ = ["LeaseSettings", "S3Lease", "take_lease"]

LEASE_VERSION = 1
_MAX_MARKER_BYTES = 1 << 12
_RELEASED = "1970-01-01T00:00:00.000Z"
"""The ``expires`` of a marker kept at release (R10.9): long past, so free for every reader."""


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Where a lease lives and how long it lasts: ``store`` retries its requests, ``store_once``
    does not (for conditional PUTs, whose lost answers are settled by reading back)."""

    store: Any
    store_once: Any
    key: str
    url: str
    ttl_s: float
    skew_s: float
    attempts: int
    """How often a conditional PUT is tried while its answers stay unclear."""


@dataclass(frozen=True, slots=True)
class _Marker:
    """A marker as read: its ETag, its bytes, and whether it can be taken (its lease expired)."""

    e_tag: str
    data: bytes
    free: bool


def _body(holder: str, expires: float | None) -> bytes:
    """A marker of ``holder`` expiring at ``expires`` (UNIX seconds; ``None``: released, long
    expired). Each body a holder writes differs (its expiry, to the millisecond), so reading one
    back tells whether that very write was applied."""
    if expires is None:
        text = _RELEASED
    else:
        moment = datetime.fromtimestamp(expires, UTC)
        text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    doc = {"tessera_lease": LEASE_VERSION, "holder": holder, "expires": text}
    return json.dumps(doc, separators=(",", ":")).encode()


def _expiry(text: Any) -> float:
    """``expires`` as UNIX seconds; an RFC 3339 time must name its offset (``Z``: UTC)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("no UTC offset")
    return moment.timestamp()


def _read(settings: LeaseSettings) -> _Marker | None:
    """The marker at ``settings.key``, or ``None`` where there is none. A body that is no lease
    (an empty or foreign object at the marker key) is free: no live holder wrote it."""
    with s3_errors(f"cannot read the lock {settings.url}"):
        try:
            result = obstore.get(settings.store, settings.key)
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        e_tag = str(result.meta["e_tag"])
        data = bytes(result.bytes()) if int(result.meta["size"]) <= _MAX_MARKER_BYTES else b""
    try:
        expires = _expiry(json.loads(data)["expires"])
    except (ValueError, TypeError, KeyError):
        return _Marker(e_tag, data, True)
    return _Marker(e_tag, data, time.time() > expires + settings.skew_s)


def _put(settings: LeaseSettings, body: bytes, mode: Any) -> str | None:
    """A conditional PUT of the marker: its new ETag, or ``None`` if the condition failed (412:
    another process wrote it). An unclear answer (a 5xx, a timeout, a reset) is settled by
    reading back: the PUT was applied if the marker holds ``body``; it was not if the marker is
    as the condition expects (absent, or at the ETag given), and is then tried again; anything
    else is another writer's. Unclear to the end: :class:`StorageError`."""
    answer = ""
    for attempt in range(settings.attempts):
        if attempt:
            time.sleep(min(0.05 * 2**attempt, 1.0))
        with s3_errors(f"cannot write the lock {settings.url}"):
            try:
                return str(obstore.put(settings.store_once, settings.key, body, mode=mode)["e_tag"])
            except Exception as exc:
                if is_precondition(exc):
                    return None
                if not is_ambiguous(exc):
                    raise
                answer = short(exc)
        found = _read(settings)
        if found is not None and found.data == body:
            return found.e_tag
        if (found is None) != (mode == "create") or (found is not None and found.e_tag != mode["e_tag"]):
            return None
    raise StorageError(
        f"cannot write the lock {settings.url}: the store did not answer clearly ({answer}); try again"
    )


def take_lease(settings: LeaseSettings, *, create: bool, wait: float) -> S3Lease | None:
    """Take the lock whose marker is ``settings.key``; ``None`` if it stayed held ``wait`` seconds,
    or if there is no marker and ``create`` is false (see the module docstring)."""
    holder = uuid.uuid4().hex
    deadline = time.monotonic() + max(wait, 0.0)
    pause = 0.02
    while True:
        found = _read(settings)
        expires = time.time() + settings.ttl_s
        if found is None:
            if not create:
                return None
            e_tag = _put(settings, _body(holder, expires), "create")
            if e_tag is not None:
                return S3Lease(settings, holder, e_tag, expires, created=True)
        elif found.free:
            e_tag = _put(settings, _body(holder, expires), {"e_tag": found.e_tag})
            if e_tag is not None:
                return S3Lease(settings, holder, e_tag, expires, created=False)
        if time.monotonic() + pause > deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


class S3Lease(Lock):
    """A lease this process holds, renewed by a heartbeat thread until :meth:`release`."""

    def __init__(
        self, settings: LeaseSettings, holder: str, e_tag: str, expires: float, *, created: bool
    ) -> None:
        self.created = created
        self._settings = settings
        self._holder = holder
        self._e_tag = e_tag
        self._valid_until = expires - settings.skew_s
        self._lost = False
        self._released = False
        self._next_beat = settings.ttl_s / 3
        """Seconds to the next renewal: a third of the lease, a tenth of that after a failure."""
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        # The thread holds the lease weakly: a lease dropped unreleased stops renewing, and
        # expires as a dead holder's would.
        self._thread = threading.Thread(
            target=_heartbeat,
            args=(weakref.ref(self), self._stop),
            name=f"tessera-lease {settings.url}",
            daemon=True,
        )
        self._thread.start()

    @property
    def lost(self) -> bool:
        """Whether another process took the marker over (this holder did not renew in time)."""
        return self._lost

    @property
    def valid(self) -> bool:
        """Whether this process may act under the lock now: held, not lost, and its lease not
        yet within the clock-skew margin of its expiry by this process's clock."""
        return not (self._released or self._lost) and time.time() < self._valid_until

    def check(self, what: str) -> None:
        """Raise unless this process may still act under the lock (a lock released already is
        no longer this holder's concern): what runs under a lost or lapsed lease must stop."""
        if not self._released and not self.valid:
            raise StorageError(
                f"cannot {what}: the lock {self._settings.url} was not renewed in time (its lease of "
                f"{self._settings.ttl_s:g} s lapsed; another process may hold it now); nothing was "
                "committed, save again"
            )

    def renew(self) -> bool:
        """Move the lease's expiry to now + ttl; whether the lock is still held. A request without
        a clear answer is retried soon, until the lease would be takeable: then it is lost."""
        with self._mutex:
            if self._released or self._lost:
                return False
            expires = time.time() + self._settings.ttl_s
            try:
                e_tag = _put(self._settings, _body(self._holder, expires), {"e_tag": self._e_tag})
            except StorageError:
                e_tag = ""  # no clear answer: try again soon
            self._next_beat = self._settings.ttl_s / (3 if e_tag else 30)
            if e_tag:
                self._e_tag = e_tag
                self._valid_until = expires - self._settings.skew_s
                return True
            if e_tag is None or time.time() > self._valid_until:
                self._lose()
                return False
            return True

    def _lose(self) -> None:
        self._lost = True
        warnings.warn(
            f"lost the lock {self._settings.url}: its lease was not renewed within "
            f"{self._settings.ttl_s:g} s and another process may hold it now; what this process "
            "does under it may race that process (a save under it is not committed)",
            TesseraWarning,
            stacklevel=2,
        )

    def release(self, *, keep_marker: bool = False) -> None:
        self._stop.set()
        with self._mutex:
            if self._released:
                raise StorageError(f"the lock {self._settings.url} was released already")
            self._released = True
            if self._lost:
                return  # the marker is another holder's now
            if keep_marker or time.time() >= self._valid_until:
                if _put(self._settings, _body(self._holder, None), {"e_tag": self._e_tag}) is None:
                    self._lose()
                return
            with s3_errors(f"cannot remove the lock {self._settings.url}"):
                try:
                    obstore.delete(self._settings.store, self._settings.key)
                except Exception as exc:
                    if not is_not_found(exc):
                        raise


def _heartbeat(lease: weakref.ref[S3Lease], stop: threading.Event) -> None:
    held = lease()
    while held is not None:
        interval = held._next_beat
        del held
        if stop.wait(interval):
            return
        held = lease()
        if held is None or not held.renew():
            return
