"""GPU-direct I/O: chunk bytes between GPU memory and files with no host copy the caller sees.

``direct_io`` moves the bytes (cuFile through KvikIO, an optional dependency), ``crc32c``
checksums them on the GPU (CUDA kernels through CuPy, which KvikIO requires), ``crc_batch``
checksums many chunks in one batch, ``streams`` keeps each I/O thread's GPU work on a stream of
its own. ``tessera.save(..., gpu_direct=True)`` and a storage from ``tessera.gpu_direct_storage``
use them; nothing here is imported from KvikIO or CuPy until then.
"""
