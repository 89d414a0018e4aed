"""Reading one object of an S3 checkpoint into the caller's blocks with as few requests as the
read allows (each request is a round trip, and a store serves a bounded number a second).

A read from the start of an object is ONE GET: its answer's ``meta`` gives the size before any
body byte is read (so ``fill`` can check it first, storage/base.py), and the body streams into
the caller's blocks as it arrives. A read from an offset (part of a chunk) asks the size with a
HEAD, then makes one ranged GET per block, each pinned to the ETag the HEAD saw (``If-Match``),
so an object replaced mid-read is an error, never a mix of two objects' bytes. A body that ends
before its size is an error too, never data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import StorageError
from .base import FileMissingError, ReadNext
from .s3_client import is_not_found, obstore, s3_errors

if TYPE_CHECKING:
    from obstore import GetOptions

__all__ = ["STREAM_CHUNK_BYTES", "read_ranges", "read_streamed"]

STREAM_CHUNK_BYTES = 8 << 20
"""The least a streamed GET hands over at once: few Python-level copies, bounded memory."""

Fill = Callable[[int | None, ReadNext], None]


def read_streamed(store: Any, key: str, url: str, fill: Fill) -> None:
    """``fill(size, read)`` over one GET of the whole object ``key``; ``fill(None, ...)`` if none."""
    result = _unless_missing(url, lambda: obstore.get(store, key))
    if result is None:
        fill(None, _missing(url))
        return
    size = int(result.meta["size"])
    body = _Body(url, size, result.stream(min_chunk_size=STREAM_CHUNK_BYTES))
    fill(size, body.read)


def read_ranges(store: Any, key: str, url: str, offset: int, fill: Fill) -> None:
    """``fill(size, read)`` where each ``read`` is a ranged GET from ``offset`` on, pinned to the
    ETag of the object's HEAD; ``fill(None, ...)`` if there is no object."""
    meta = _unless_missing(url, lambda: obstore.head(store, key))
    if meta is None:
        fill(None, _missing(url))
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
            got = obstore.get(store, key, options=options).bytes()
        if len(got) != view.nbytes:
            raise StorageError(f"{url} ended early (truncated object)")
        view[:] = memoryview(got).cast("B")
        position += view.nbytes

    fill(size, read)


def _unless_missing(url: str, request: Callable[[], Any]) -> Any:
    """``request()``'s answer, or ``None`` where the store says the object is not there (404)."""
    with s3_errors(f"cannot read {url}"):
        try:
            return request()
        except Exception as exc:
            if not is_not_found(exc):
                raise
            return None


def _missing(url: str) -> ReadNext:
    def missing(out: memoryview | torch.Tensor) -> None:
        raise FileMissingError(f"cannot read {url}: no such object")

    return missing


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
