"""GPU-direct I/O: chunk bytes between GPU memory and files with no host copy the caller sees.

``direct_io`` moves the bytes (cuFile through KvikIO, an optional dependency), ``crc32c``
checksums them on the GPU (CUDA kernels through CuPy, which KvikIO requires), ``crc_batch``
checksums many chunks in one batch, ``streams`` keeps each I/O thread's GPU work on a stream of
its own, ``device_writes`` holds the write strategies from device memory. A storage from
``tessera.gpu_direct_storage(path)``, given to ``save`` or ``open``, uses them; nothing here is
imported from KvikIO or CuPy until then.
"""
