"""One place that turns a location (a path, a URL or a :class:`Storage`) into a storage.

Every entry point (``save``, ``save_async``, ``load``, ``open``, ``verify``, ``RunDirectory``
and the CLI) calls :func:`storage_for`, so a location means the same thing everywhere. A plain
path and a ``file://`` URL are local directories; any other scheme must have been registered,
either by :func:`register_scheme` or by an installed package through the ``tessera.storage``
entry-point group (the way a package adds an object store without Tessera importing it). A scheme
nobody registered is refused with :class:`~tessera.UnsupportedLocationError` naming the scheme
and the supported ones, before anything is written: a URL never becomes a local directory
called ``s3:``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from urllib.parse import unquote, urlsplit

from ..errors import UnsupportedLocationError
from .base import Storage
from .local import LocalStorage

__all__ = ["ENTRY_POINT_GROUP", "Location", "register_scheme", "storage_for", "supported_schemes"]

Location = str | os.PathLike[str] | Storage
"""Where a checkpoint (or a run directory) lives: a local path, a URL, or a storage object."""

StorageFactory = Callable[[str], Storage]
"""Makes the storage for one URL (given whole, scheme included)."""

ENTRY_POINT_GROUP = "tessera.storage"
"""Entry points named after a URL scheme, each a :data:`StorageFactory`."""

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):$")
_factories: dict[str, StorageFactory] = {}
_lock = threading.Lock()


def register_scheme(scheme: str, factory: StorageFactory) -> None:
    """Make ``scheme://...`` locations resolve through ``factory`` in this process; a scheme
    registered twice keeps the last factory (so a test can replace one)."""
    if not _SCHEME_LIKE.match(f"{scheme}:") or scheme.lower() == "file":
        raise ValueError(f"{scheme!r} is not a URL scheme that can be registered")
    with _lock:
        _factories[scheme.lower()] = factory


def supported_schemes() -> list[str]:
    """``file`` and every registered or installed scheme, sorted."""
    return sorted({"file", *_factories, *(ep.name.lower() for ep in entry_points(group=ENTRY_POINT_GROUP))})


def storage_for(location: Location) -> Storage:
    """The storage for ``location``; refuses a URL whose scheme no storage is registered for."""
    if isinstance(location, Storage):
        return location
    if not isinstance(location, str | os.PathLike):
        raise TypeError(
            f"a location is a path, a URL or a tessera Storage, not {type(location).__name__}"
        )
    text = os.fspath(location)
    if isinstance(text, bytes):
        raise TypeError("a location is a str path or URL, not bytes")
    url = _URL.match(text)
    if url is None:
        first = text.split("/", 1)[0]
        if _SCHEME_LIKE.match(first) and len(first) > 2:
            # "s3:/bucket/x" (what pathlib makes of "s3://bucket/x") or "gs:bucket": a URL
            # mistyped, or flattened by Path(); never a directory to create. ("c:" is left alone.)
            raise UnsupportedLocationError(
                f"{text!r} looks like a URL without '//' after {first!r}; write it as "
                f"'{first}//...' (as a str, not a pathlib.Path), or as './{text}' for a local path"
            )
        return LocalStorage(text)
    scheme = url.group(1).lower()
    if scheme == "file":
        return LocalStorage(_file_url_path(text))
    factory = _factory(scheme)
    if factory is None:
        raise UnsupportedLocationError(
            f"no storage for {scheme}:// locations is installed (location {text!r}); supported: "
            + ", ".join(f"{s}://" for s in supported_schemes())
            + " and local paths"
        )
    return factory(text)


def _file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UnsupportedLocationError(
            f"{url!r} names host {parts.netloc!r}; a file:// URL must be local (file:///abs/path)"
        )
    if parts.query or parts.fragment:
        raise UnsupportedLocationError(f"{url!r}: a file:// URL takes no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise UnsupportedLocationError(f"{url!r}: a file:// URL holds an absolute path (file:///abs/path)")
    return path


def _factory(scheme: str) -> StorageFactory | None:
    with _lock:
        if scheme in _factories:
            return _factories[scheme]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name.lower() == scheme:
            factory: StorageFactory = ep.load()
            with _lock:
                _factories.setdefault(scheme, factory)
            return factory
    return None
