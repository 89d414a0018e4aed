"""One CUDA stream per I/O thread and device, for the GPU work of GPU-direct I/O.

The I/O threads would otherwise queue their kernels (the checksums) and copies on the legacy
default stream, which waits for, and holds up, every other blocking stream of the device: KvikIO's
transfers and the other threads' work. A non-blocking stream of each thread's own keeps them
independent; each thread waits for its own stream before it hands memory to the file I/O.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["thread_stream"]

_local = threading.local()


def thread_stream(device: torch.device) -> torch.cuda.Stream:
    """The calling thread's own stream on ``device``, made on first use."""
    streams: dict[torch.device, torch.cuda.Stream] = getattr(_local, "streams", None) or {}
    _local.streams = streams
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
    return stream
