"""A minimal byte-counting progress bar on stderr (no dependency), safe across threads."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class Progress:
    """``with Progress(total, "saving") as bar: bar.advance(n)``; silent when disabled."""

    def __init__(self, total: int, label: str, enabled: bool, stream: TextIO | None = None) -> None:
        self._total = max(total, 1)
        self._label = label
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._done = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = 0.0

    @property
    def enabled(self) -> bool:
        """Whether the bar is drawn (a disabled bar ignores ``advance``)."""
        return self._enabled

    def advance(self, n: int) -> None:
        if not self._enabled:
            return
        with self._lock:
            self._done += n
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or self._done >= self._total:
                self._last_draw = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = min(self._done / self._total, 1.0)
        width = 30
        filled = int(fraction * width)
        rate = self._done / max(now - self._start, 1e-9)
        self._stream.write(
            f"\r{self._label} [{'#' * filled}{'.' * (width - filled)}] {fraction:6.1%} "
            f"{_human(self._done)}/{_human(self._total)} {_human(rate)}/s"
        )
        self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()
