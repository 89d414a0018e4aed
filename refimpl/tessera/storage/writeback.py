"""Start writing a file's dirty pages to the disk now, without waiting for them.

A save writes every file first and fsyncs them all at the end (one wait
instead of one per file). Left alone, the kernel would hold the written pages
in memory until that fsync (or until its dirty limits are hit), so the disk
would sit idle while the files are written and then do all the work at the
end. ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues the file's pages for
writeback as soon as it is written and returns at once: the disk works while
the next files are written, and the final fsyncs find little left to do.
It makes nothing durable by itself (no metadata, no disk cache flush); the
fsync at the end is still what the commit relies on (spec R9.8).

Linux only; elsewhere, or where the call fails, it does nothing and the final
fsync does all the work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

__all__ = ["start_writeback"]

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_CALL = _sync_file_range()


def start_writeback(fd: int) -> None:
    """Queue every dirty page of the open file ``fd`` for writing to the disk; never blocks on it."""
    if _CALL is not None:
        _CALL(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
