"""How reads reach destinations outside plain host memory: GPU tensors, and conjugate or
negative views (which NumPy cannot write through)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..format.dtypes import DType
from ..state.tensors import as_numpy
from .staging import StagingPool

__all__ = ["DeviceCopies"]


class DeviceCopies:
    """Copies through reusable staging buffers, pinned when CUDA is there, on a CUDA stream per
    device, so that the copies overlap the next reads.

    Call order, per read pass: :meth:`begin` for each device about to receive (in the thread
    that asked for the read), then :meth:`copy` / :meth:`send` from the I/O threads, then
    :meth:`wait` before the pass returns. One instance per handle; :meth:`close` drops its
    streams once no pass uses them."""

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def begin(self, device: torch.device) -> None:
        """Order the copies to ``device`` after the work the calling thread queued there (it
        may still be using the destinations); call in the thread that asked for the read."""
        if device.type != "cuda":
            return
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))

    def stream(self, device: torch.device) -> torch.cuda.Stream | None:
        return self._streams.get(device)

    @staticmethod
    def send(dst: torch.Tensor, host: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """Copy ``host`` into ``dst``: asynchronously on ``stream`` if given, else at once."""
        if stream is None:
            dst.copy_(host)
            return
        with torch.cuda.stream(stream):
            dst.copy_(host, non_blocking=True)

    def copy(self, dst: torch.Tensor, source: np.ndarray, dtype: DType) -> None:
        """Copy a host array into ``dst`` (same shape, any strides) through a staging buffer."""
        stream = self.stream(dst.device)
        with self.pool.buffer(source.nbytes, stream) as host:
            staged = host.view(dtype.torch_dtype).reshape(source.shape)
            as_numpy(staged, dtype)[...] = source
            self.send(dst, staged, stream)

    def wait(self) -> None:
        """Return once every copy queued so far has landed."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.synchronize()

    def close(self) -> None:
        """Wait for the copies in flight, then drop the streams."""
        self.wait()
        with self._lock:
            self._streams.clear()
