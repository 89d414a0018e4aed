"""Host buffers for moving bytes between storage and accelerator memory, reused.

A copy between host and GPU memory runs asynchronously, at the full speed of
the bus, only from page-locked ("pinned") host memory, and pinning memory is
slow (the pages are mapped for the device), so it is worth doing once per load
or save and not once per chunk. A :class:`StagingPool` lends a few buffers out
and takes them back::

    pool = StagingPool(pinned=True)
    with pool.buffer(nbytes, stream=stream) as host:  # 1-D uint8 CPU tensor, exactly nbytes
        storage_read_into(host)
        with torch.cuda.stream(stream):
            device_slice.copy_(host, non_blocking=True)
    # the buffer is lent again only once the copy enqueued on ``stream`` has finished

Without ``stream``, whatever used the buffer must be finished when the block
exits (a blocking ``copy_`` is). Buffers are returned on an exception too.
The pool is thread-safe; it holds at most ``max_buffers`` buffers, and a
request finding them all lent waits for one to come back, so a holder must not
ask for a second buffer while it holds one unless the pool has room for both.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..util.parallel import default_read_threads, default_threads

__all__ = ["StagingPool", "shared_pool"]

_GRAIN = 2**20
"""Buffer sizes are rounded up to whole MiB, so that nearby sizes share buffers."""


@dataclass(eq=False, slots=True)
class _Slot:
    data: torch.Tensor
    pending: torch.cuda.Event | None = None
    """Recorded after the last asynchronous use of the buffer; it is free once this completes."""

    @property
    def capacity(self) -> int:
        return self.data.numel()

    def idle(self) -> bool:
        return self.pending is None or self.pending.query()

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None


class StagingPool:
    """A few reusable host buffers, pinned when CUDA is available and ``pinned`` asks for it.

    ``max_buffers`` bounds how many buffers exist at once (lent or free); the default,
    16, is two per I/O thread of a large machine. Buffers live as long as the pool.
    """

    def __init__(self, pinned: bool = True, max_buffers: int = 16) -> None:
        if max_buffers < 1:
            raise ValueError(f"a staging pool needs at least one buffer, not {max_buffers}")
        self.pinned = pinned and torch.cuda.is_available()
        """Whether the buffers are page-locked (asked for, and CUDA is there to do it)."""
        self.max_buffers = max_buffers
        self._free: list[_Slot] = []
        self._count = 0
        self._changed = threading.Condition()

    @contextmanager
    def buffer(self, nbytes: int, stream: torch.cuda.Stream | None = None) -> Iterator[torch.Tensor]:
        """Lend a 1-D ``uint8`` CPU tensor of exactly ``nbytes``, for the ``with`` block.

        ``stream``: the CUDA stream on which the block enqueued asynchronous copies from or
        into the buffer; the buffer is lent again only after they finished. The contents
        are whatever the last holder left.
        """
        if nbytes < 0:
            raise ValueError(f"a buffer of {nbytes} bytes")
        slot = self._take(nbytes)
        try:
            yield slot.data[:nbytes]
        finally:
            if stream is not None:
                slot.pending = torch.cuda.Event()
                slot.pending.record(stream)
            with self._changed:
                self._free.append(slot)
                self._changed.notify()

    def _take(self, nbytes: int) -> _Slot:
        capacity = max(_GRAIN, -(-nbytes // _GRAIN) * _GRAIN)
        # In order: a free buffer that fits and is idle; a new buffer, while there is room; one
        # that fits but is still being copied (wait for the copy); a bigger buffer in place of
        # a free one too small; else wait for a buffer to come back.
        chosen = dropped = None
        with self._changed:
            while True:
                fitting = sorted((s for s in self._free if s.capacity >= nbytes), key=lambda s: s.capacity)
                chosen = next((s for s in fitting if s.idle()), None)
                if chosen is None and self._count >= self.max_buffers and fitting:
                    chosen = fitting[0]
                if chosen is not None:
                    self._free.remove(chosen)
                    break
                if self._count >= self.max_buffers and self._free:
                    dropped = max(self._free, key=lambda s: s.capacity)
                    self._free.remove(dropped)
                    self._count -= 1
                if self._count < self.max_buffers:
                    self._count += 1
                    break
                self._changed.wait()
        if dropped is not None:
            dropped.wait()  # its memory must outlive the copies still reading it
        if chosen is not None:
            chosen.wait()
            return chosen
        try:
            return _Slot(torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pinned))
        except BaseException:
            with self._changed:
                self._count -= 1
                self._changed.notify()
            raise

    def clear(self) -> None:
        """Free the buffers not lent now (after their pending copies finished)."""
        with self._changed:
            free, self._free = self._free, []
            self._count -= len(free)
            self._changed.notify_all()
        for slot in free:
            slot.wait()


@functools.cache
def shared_pool() -> StagingPool:
    """The process's pinned buffers, shared by every save and load: pinning costs milliseconds
    per MiB, so a job that checkpoints and loads repeatedly pays it once, not on every call.
    Two buffers per I/O thread (a read thread fills one while the other's copy runs; a write
    thread holds one at a time). Nothing is allocated until a GPU tensor is saved or loaded."""
    return StagingPool(pinned=True, max_buffers=2 * max(default_threads(), default_read_threads()))
