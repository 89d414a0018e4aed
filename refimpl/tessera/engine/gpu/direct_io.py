"""File I/O straight between GPU memory and chunk files, through cuFile (GPUDirect Storage) by
way of KvikIO.

With the GDS driver (``nvidia-fs``) the bytes move by DMA between the device and the disk; without
it KvikIO runs in its compatibility mode: POSIX reads and writes through its own pinned bounce
buffers. Either way the caller hands over device memory and no host copy of a chunk is visible
to it. :func:`describe` says which path runs.

KvikIO's settings are process-wide. :func:`configure_kvikio` sets, once, those that the
checkpoint I/O pattern needs (large files, several in flight), unless the user set them through
KvikIO's environment variables: a pool of threads for the parallel parts of each request, and
``O_DIRECT`` for reads and writes, which skips the page cache where the file system supports it
(the chunks' data starts at offset 0 of its file, 4 KiB aligned; spec R6.9).

Files are opened by the storage (exclusive creation, no symbolic links, inside the checkpoint)
and handed over as descriptors; KvikIO reopens them through ``/proc/self/fd``, so it works on
exactly the file the storage checked.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ...errors import GpuDirectUnavailableError
from ...storage.base import PendingRead, Storage
from ...storage.local import LocalStorage
from ...storage.resolve import Location, storage_for
from ...util.parallel import default_read_threads, default_threads

__all__ = [
    "KvikioFiles",
    "configure_kvikio",
    "describe",
    "direct_read_threads",
    "gpu_direct_storage",
    "kvikio_files",
    "storage_with_device_io",
]

_THREADS_VARIABLE = "KVIKIO_NTHREADS"
_DIRECT_VARIABLES = {
    "auto_direct_io_read": "KVIKIO_AUTO_DIRECT_IO_READ",
    "auto_direct_io_write": "KVIKIO_AUTO_DIRECT_IO_WRITE",
}


def _import_kvikio() -> Any:
    try:
        import kvikio  # noqa: PLC0415 - an optional dependency
        import kvikio.defaults  # noqa: PLC0415 - a submodule the package does not import
    except ImportError as exc:
        raise GpuDirectUnavailableError(
            f"GPU-direct I/O needs KvikIO, which is not importable ({exc}); install kvikio-cu12 or "
            "kvikio-cu13 to match the CUDA of your torch, or save and load through a plain path"
        ) from None
    return kvikio


@functools.cache
def configure_kvikio() -> None:
    """Set KvikIO's thread pool and ``O_DIRECT`` options for checkpoint I/O, once per process;
    a setting that the user gave through KvikIO's environment variable is left alone."""
    kvikio = _import_kvikio()
    settings: dict[str, Any] = {}
    if _THREADS_VARIABLE not in os.environ:
        settings["num_threads"] = 2 * default_threads()
    for name, variable in _DIRECT_VARIABLES.items():
        if variable not in os.environ:
            settings[name] = True
    if settings:
        kvikio.defaults.set(settings)


def describe() -> str:
    """Which path GPU-direct I/O takes on this machine, for logs and benchmark reports."""
    kvikio = _import_kvikio()
    configure_kvikio()
    defaults = kvikio.defaults
    if defaults.is_compat_mode_preferred():
        path = "compatibility mode (no GPUDirect Storage): POSIX I/O through pinned bounce buffers"
    else:
        path = "GPUDirect Storage (cuFile DMA between the GPU and the disk)"
    direct = [k.removeprefix("auto_direct_io_") for k in _DIRECT_VARIABLES if defaults.get(k)]
    return (
        f"KvikIO {kvikio.__version__}, {path}, {defaults.get('num_threads')} threads, "
        f"O_DIRECT for {' and '.join(direct) or 'nothing'}"
    )


def direct_read_threads() -> int:
    """Reading threads for GPU-direct loads: four times those of host loads (64 on 16 cores).

    A GPU-direct load's threads are mostly waiting: on KvikIO's pool for the data, and on the
    disk for the small reads each chunk brings besides (its directory entries and ``zarr.json``,
    the CRC after the data), so more of them keep more of those latencies overlapped. Measured
    on the H200 machine (virtio disk, compatibility mode), 8.7 GB in 1,015 chunk files, cold,
    against one file read by KvikIO alone in the same rounds: 32 threads 0.83-0.96 of it,
    64 threads 0.81-1.06 (ahead of 32 in three of four rounds run side by side); 96 and 128
    threads no better than 64.
    """
    return 4 * default_read_threads()


class KvikioFiles:
    """Reads and writes between open files and CUDA tensors (the storage's device I/O)."""

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise GpuDirectUnavailableError("GPU-direct I/O needs a CUDA device; torch sees none")
        self._kvikio = _import_kvikio()
        configure_kvikio()

    def write(self, fd: int, offset: int, data: torch.Tensor) -> None:
        """Write the bytes of ``data`` (contiguous, on a CUDA device) at ``offset`` of the open file."""
        data = _bytes_of(data)
        nbytes = data.numel()
        with _as_os_error("write"), self._kvikio.CuFile(f"/proc/self/fd/{fd}", "r+") as file:
            done = file.pwrite(data, nbytes, offset).get()
        if done != nbytes:
            raise OSError(errno.EIO, f"KvikIO wrote {done} of {nbytes} bytes")

    def start_read(self, fd: int, offset: int, out: torch.Tensor) -> PendingRead:
        """Start reading into ``out`` (contiguous, on a CUDA device) from ``offset`` on KvikIO's
        threads; the returned function waits for it and gives the bytes read (KvikIO raises,
        as an ``OSError`` here, where the file ends first)."""
        out = _bytes_of(out)
        with _as_os_error("read"):
            file = self._kvikio.CuFile(f"/proc/self/fd/{fd}", "r")
        try:
            with _as_os_error("read"):
                future = file.pread(out, out.numel(), offset)
        except BaseException:
            file.close()
            raise

        def wait() -> int:
            try:
                with _as_os_error("read"):
                    return int(future.get())
            finally:
                file.close()

        return wait


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as flat bytes: KvikIO takes buffers through ``__cuda_array_interface__``,
    which names element types as NumPy does; bfloat16 and the float8 types have no such name."""
    return tensor.reshape(-1).view(torch.uint8)


@contextmanager
def _as_os_error(operation: str) -> Iterator[None]:
    """KvikIO reports a failed system call as a ``RuntimeError``; the storage turns an ``OSError``
    into an error that names the file."""
    try:
        yield
    except RuntimeError as exc:
        raise OSError(errno.EIO, f"KvikIO could not {operation}: {exc}") from exc


@functools.cache
def kvikio_files() -> KvikioFiles:
    """The process's one engine (KvikIO's pool and settings are process-wide anyway)."""
    return KvikioFiles()


def gpu_direct_storage(location: Location) -> LocalStorage:
    """A local directory whose chunks of GPU tensors move between the GPU and their files through
    cuFile (KvikIO), checksummed on the GPU: pass it to ``save`` or ``open`` in place of a path.

    Raises :class:`~tessera.GpuDirectUnavailableError` without KvikIO or CUDA, and for a location
    that is not a local directory."""
    storage = storage_for(location)
    if not isinstance(storage, LocalStorage):
        raise GpuDirectUnavailableError(
            f"GPU-direct I/O reads and writes local files; {storage.location} is not a local directory"
        )
    return LocalStorage(storage.location, kvikio_files())


def storage_with_device_io(location: Location, gpu_direct: bool) -> Storage:
    """The storage for ``location``, built by :func:`gpu_direct_storage` where ``gpu_direct``:
    what the deprecated ``gpu_direct=`` keyword of ``save``, ``load`` and ``open`` asks for, in
    one place for all of them."""
    return gpu_direct_storage(location) if gpu_direct else storage_for(location)
