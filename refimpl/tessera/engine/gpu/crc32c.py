"""CRC32C of bytes in GPU memory, computed on the GPU: the chunk checksum (spec §6) without
copying the chunk to the host.

A CRC is a serial recurrence over the bytes, but it is linear, so it splits:
for byte strings ``A`` and ``B``,

    crc(A + B) == multiply(x ** (8 * len(B)) mod P, crc(A)) ^ crc(B)

in GF(2)[x] modulo the CRC32C polynomial ``P`` (zlib's ``crc32_combine``; the
pre- and post-conditioning cancel out). One kernel gives each thread a
:data:`SEGMENT` of bytes of one of the buffers (slice-by-8 tables in shared
memory); a second, of one block per buffer, folds each buffer's segment CRCs
together with that rule. Many buffers (every chunk a load read) thus cost two
launches, not two each. The combine
arithmetic is written twice, in CUDA for the device and in Python
(:func:`crc32c_combine`), so that the CPU tests check it against the
``crc32c`` package and the GPU tests check the kernels against both.

The kernels are compiled at first use by NVRTC through CuPy, which KvikIO
(the GPU-direct file I/O) already requires; nothing is built at install time.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "BATCH_SEGMENTS",
    "POLYNOMIAL",
    "SEGMENT",
    "crc32c_combine",
    "device_crc32c",
    "device_crc32c_many",
    "x8n_mod_p",
]

POLYNOMIAL = 0x82F63B78
"""CRC32C (Castagnoli), bit-reflected, as in RFC 3720 and Zarr's ``crc32c`` codec."""

SEGMENT = 4096
"""Bytes per thread: small enough that a 64 MiB chunk gives 16,384 threads, large enough that
the combining stays a small part of the work."""

BATCH_SEGMENTS = 1 << 22
"""Segments per pair of launches: 16 GiB of buffers, whose segment CRCs take 16 MiB of GPU
memory, so that checking a whole GPU's worth of chunks at once never needs much more."""

_COMBINE_THREADS = 1024


def _multiply(a: int, b: int) -> int:
    """``a * b`` modulo P, both bit-reflected polynomials; ``a`` must not be 0."""
    m, product = 1 << 31, 0
    while True:
        if a & m:
            product ^= b
            if a & (m - 1) == 0:
                return product
        m >>= 1
        b = (b >> 1) ^ POLYNOMIAL if b & 1 else b >> 1


@functools.cache
def _x_2k() -> tuple[int, ...]:
    """``x ** (2 ** k)`` modulo P for k = 0..31 (x ** 1 is bit 30 in reflected order)."""
    powers = [1 << 30]
    for _ in range(31):
        powers.append(_multiply(powers[-1], powers[-1]))
    return tuple(powers)


def x8n_mod_p(n: int) -> int:
    """``x ** (8 * n)`` modulo P: what shifting a CRC past ``n`` bytes multiplies it by."""
    powers, power, k = _x_2k(), 1 << 31, 3
    while n:
        if n & 1:
            power = _multiply(powers[k & 31], power)
        n >>= 1
        k += 1
    return power


def crc32c_combine(first: int, second: int, second_length: int) -> int:
    """The CRC32C of ``A + B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``."""
    return _multiply(x8n_mod_p(second_length), first) ^ second


def _tables() -> list[int]:
    """Slice-by-8 tables, flattened: table k maps a byte to its CRC followed by k zero bytes."""
    base = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ POLYNOMIAL if crc & 1 else crc >> 1
        base.append(crc)
    tables = [base]
    for _ in range(7):
        previous = tables[-1]
        tables.append([(c >> 8) ^ base[c & 0xFF] for c in previous])
    return [value for table in tables for value in table]


_SOURCE = r"""
#define POLY 0x82f63b78u

__device__ unsigned int multiply(unsigned int a, unsigned int b) {
    unsigned int m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

__device__ unsigned int x8n(unsigned long long n, const unsigned int* x_2k) {
    unsigned int p = 1u << 31;
    unsigned int k = 3;
    while (n) {
        if (n & 1) p = multiply(x_2k[k & 31], p);
        n >>= 1;
        ++k;
    }
    return p;
}

__device__ unsigned long long buffer_of(
    const unsigned long long* first, unsigned long long count, unsigned long long s
) {
    // The last buffer whose first segment is at or before segment s.
    unsigned long long lo = 0, hi = count - 1;
    while (lo < hi) {
        unsigned long long mid = (lo + hi + 1) / 2;
        if (first[mid] <= s) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// buffers: count addresses, then count sizes, then count first segments (the segments of
// buffer b are first[b] .. first[b + 1] - 1, each of `segment` bytes but the last).
extern "C" __global__ void crc32c_segments(
    const unsigned long long* __restrict__ buffers, unsigned long long count,
    unsigned long long segment, unsigned long long segments,
    const unsigned int* __restrict__ tables, unsigned int* __restrict__ out
) {
    __shared__ unsigned int t[8][256];
    for (int i = threadIdx.x; i < 8 * 256; i += blockDim.x) t[i >> 8][i & 255] = tables[i];
    __syncthreads();
    unsigned long long s = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= segments) return;
    const unsigned long long* first = buffers + 2 * count;
    unsigned long long b = buffer_of(first, count, s);
    const unsigned char* data = (const unsigned char*)buffers[b];
    unsigned long long n = buffers[count + b], k = s - first[b];
    const unsigned char* p = data + k * segment;
    const unsigned char* end = data + min((k + 1) * segment, n);
    unsigned int crc = 0xffffffffu;
    while (p < end && ((unsigned long long)p & 7)) crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    for (; p + 8 <= end; p += 8) {
        uint2 word = *(const uint2*)p;
        unsigned int lo = word.x ^ crc, hi = word.y;
        crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24]
            ^ t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
    }
    while (p < end) crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    out[s] = ~crc;
}

extern "C" __global__ void crc32c_fold(
    const unsigned int* __restrict__ crcs, const unsigned long long* __restrict__ buffers,
    unsigned long long count, unsigned long long segment,
    const unsigned int* __restrict__ x_2k, unsigned int* __restrict__ result
) {
    // One block per buffer: each thread folds a run of consecutive segments, then the runs
    // fold pairwise.
    __shared__ unsigned int crc[1024];
    __shared__ unsigned long long length[1024];
    unsigned long long b = blockIdx.x, n = buffers[count + b];
    const unsigned int* mine = crcs + buffers[2 * count + b];
    unsigned long long segments = (n + segment - 1) / segment;
    unsigned int j = threadIdx.x;
    unsigned long long per = (segments + blockDim.x - 1) / blockDim.x;
    unsigned long long first = j * per, last = min(first + per, segments);
    unsigned int acc = 0;
    unsigned long long bytes = 0;
    unsigned int full = x8n(segment, x_2k);
    for (unsigned long long i = first; i < last; ++i) {
        unsigned long long size = min(segment, n - i * segment);
        acc = (bytes ? multiply(size == segment ? full : x8n(size, x_2k), acc) : 0) ^ mine[i];
        bytes += size;
    }
    crc[j] = acc;
    length[j] = bytes;
    __syncthreads();
    for (unsigned int stride = 1; stride < blockDim.x; stride <<= 1) {
        if ((j % (2 * stride)) == 0 && j + stride < blockDim.x && length[j + stride]) {
            crc[j] = (length[j] ? multiply(x8n(length[j + stride], x_2k), crc[j]) : 0) ^ crc[j + stride];
            length[j] += length[j + stride];
        }
        __syncthreads();
    }
    if (j == 0) result[b] = crc[0];
}
"""


class _Kernels:
    """The compiled kernels and their constant tables, on one device."""

    def __init__(self, device: torch.device) -> None:
        import cupy  # noqa: PLC0415 - only the GPU-direct path needs it

        with cupy.cuda.Device(device.index):
            module = cupy.RawModule(code=_SOURCE, options=("-std=c++14",))
            self.segments = module.get_function("crc32c_segments")
            self.fold = module.get_function("crc32c_fold")
        self.tables = torch.tensor(_tables(), dtype=torch.int64, device=device).to(torch.int32)
        self.x_2k = torch.tensor(list(_x_2k()), dtype=torch.int64, device=device).to(torch.int32)
        self.cupy: Any = cupy


_compiled: dict[torch.device, _Kernels] = {}
_compiling = threading.Lock()


def _kernels(device: torch.device) -> _Kernels:
    with _compiling:
        kernels = _compiled.get(device)
        if kernels is None:
            kernels = _compiled[device] = _Kernels(device)
        return kernels


class _StreamHandle:
    """A CUDA stream as the CUDA stream protocol hands it over (``__cuda_stream__``)."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._handle)


def _cupy_stream(cupy: Any, stream: torch.cuda.Stream) -> Any:
    """``stream`` as a CuPy stream, to launch the kernels on (``from_external`` from CuPy 14)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device.index)
    return from_external(_StreamHandle(stream.cuda_stream))


def device_crc32c_many(buffers: Sequence[torch.Tensor]) -> list[int]:
    """The CRC32C of the bytes of each of ``buffers`` (contiguous tensors on one CUDA device),
    as ``crc32c.crc32c(buffer)`` would give it: two kernel launches per :data:`BATCH_SEGMENTS`
    segments and one wait for them all.

    The kernels run on the calling thread's current stream, so they see what it queued before
    (a copy that assembled a chunk); the call returns once the results are on the host. Checking
    a pass's chunks together, rather than one launch and wait per chunk, keeps the I/O threads
    from contending for the GIL and the GPU between their reads.
    """
    if not buffers:
        return []
    device = buffers[0].device
    if any(b.device != device or device.type != "cuda" or not b.is_contiguous() for b in buffers):
        raise ValueError("device_crc32c_many takes contiguous tensors on one CUDA device")
    sizes = [b.numel() * b.element_size() for b in buffers]
    batches: list[list[int]] = [[]]
    segments = 0
    for i, size in enumerate(sizes):
        if not size:
            continue
        if batches[-1] and segments + -(-size // SEGMENT) > BATCH_SEGMENTS:
            batches.append([])
            segments = 0
        batches[-1].append(i)
        segments += -(-size // SEGMENT)
    kernels = _kernels(device)
    stream = _cupy_stream(kernels.cupy, torch.cuda.current_stream(device))
    with kernels.cupy.cuda.Device(device.index), stream:
        results = [_launch(kernels, [buffers[i] for i in b], [sizes[i] for i in b]) for b in batches]
    crc = [0] * len(buffers)
    for batch, result in zip(batches, results, strict=True):
        for i, value in zip(batch, result.tolist(), strict=True):  # .tolist() waits for the stream
            crc[i] = value & 0xFFFFFFFF
    return crc


def _launch(kernels: _Kernels, buffers: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Queue the two kernels over non-empty ``buffers`` on the current stream; their CRCs, as
    int32 on the device."""
    device = kernels.tables.device
    if not buffers:
        return torch.empty(0, dtype=torch.int32, device=device)
    cupy = kernels.cupy
    firsts, segments = [], 0
    for size in sizes:
        firsts.append(segments)
        segments += -(-size // SEGMENT)
    table = [b.data_ptr() for b in buffers] + sizes + firsts
    described = torch.tensor(table, dtype=torch.int64).to(device)
    crcs = torch.empty(segments, dtype=torch.int32, device=device)
    results = torch.empty(len(buffers), dtype=torch.int32, device=device)
    count = cupy.uint64(len(buffers))
    threads = 256
    kernels.segments(
        ((segments + threads - 1) // threads,),
        (threads,),
        (
            described.data_ptr(),
            count,
            cupy.uint64(SEGMENT),
            cupy.uint64(segments),
            kernels.tables.data_ptr(),
            crcs.data_ptr(),
        ),
    )
    kernels.fold(
        (len(buffers),),
        (_COMBINE_THREADS,),
        (
            crcs.data_ptr(),
            described.data_ptr(),
            count,
            cupy.uint64(SEGMENT),
            kernels.x_2k.data_ptr(),
            results.data_ptr(),
        ),
    )
    return results


def device_crc32c(data: torch.Tensor, value: int = 0) -> int:
    """The CRC32C of the bytes of ``data`` (a contiguous tensor on a CUDA device), continuing
    from ``value`` (the CRC32C of the bytes before them), as ``crc32c.crc32c(data, value)``."""
    crc = device_crc32c_many([data])[0]
    n = data.numel() * data.element_size()
    return crc if value == 0 or n == 0 else crc32c_combine(value, crc, n)
