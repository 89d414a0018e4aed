"""Run I/O tasks on a thread pool; the first failure cancels the rest and is re-raised.

File writes, reads, fsync and CRC32C all release the GIL, so threads overlap
them on every core and keep several requests in flight to the disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

__all__ = ["default_threads", "run_all"]


def default_threads() -> int:
    """Enough requests in flight for a local NVMe disk, without oversubscribing small machines."""
    return min(16, max(4, 2 * (os.cpu_count() or 1)))


def run_all(tasks: Iterable[Callable[[], None]], threads: int | None = None) -> None:
    """Run every task; raise the first exception after cancelling what has not started."""
    pending = list(tasks)
    if not pending:
        return
    workers = min(threads or default_threads(), len(pending))
    if workers == 1:
        for task in pending:
            task()
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tessera-io") as pool:
        futures: list[Future[None]] = [pool.submit(task) for task in pending]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                pool.shutdown(cancel_futures=True)
                raise future.exception()  # type: ignore[misc]
