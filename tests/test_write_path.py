"""The write path of the I/O engine: fused checksums, batched fsync, GPU sources (issue 5).

The format is unchanged by the engine, so the tests check that what it writes
is still exactly what the spec says (stock readers agree, every byte checked)
and that its failure modes still leave nothing committed.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import crc32c
import numpy as np
import pytest
import tessera
import tessera.storage.local
import torch
from tessera.engine.gpu.direct_io import gpu_direct_storage
from tessera.format.chunk_codec import encode_chunk
from tessera.format.dtypes import dtype_by_name
from tessera.format.layout import ArrayLayout
from tessera.storage.local import LocalStorage
from tessera.testing import FaultyStorage, RecordingStorage

from .ranks import run_ranks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAS_KVIKIO = importlib.util.find_spec("kvikio") is not None


def test_checksum_of_a_chunk_of_many_blocks_R6_1() -> None:
    """The CRC32C computed block by block while the chunk is written equals the CRC of the whole."""
    layout = ArrayLayout(dtype_by_name("float32"), (3_000_000,), (2_500_000,))
    data = np.random.default_rng(0).standard_normal(3_000_000).astype(np.float32)
    for index, part in (((0,), data[:2_500_000]), ((1,), data[2_500_000:])):
        stored = b"".join(bytes(b) for b in encode_chunk(part, layout, index))
        assert len(stored) == 10_000_000 + 4
        assert struct.unpack("<I", stored[-4:])[0] == crc32c.crc32c(stored[:-4])
    edge = b"".join(bytes(b) for b in encode_chunk(data[2_500_000:], layout, (1,)))
    assert np.isnan(np.frombuffer(edge[2_000_000:-4], np.float32)).all(), "overhang holds the fill value"


def test_large_chunks_read_back_by_stock_readers_R2_1(tmp_path: Path) -> None:
    """Chunks of several checksum blocks, written straight from the tensor, as zarr-python and
    tensorstore read them."""
    zarr = pytest.importorskip("zarr")
    ts = pytest.importorskip("tensorstore")
    weight = torch.randn(1500, 1700)
    tessera.save({"w": weight}, tmp_path / "ckpt", options=tessera.SaveOptions(chunk_bytes=6 * 2**20))
    layout = tessera.open(tmp_path / "ckpt").entry("w").layout  # an array entry
    assert layout.chunk_nbytes > 4 * 2**20 and layout.chunk_count > 1
    expected = weight.numpy()
    np.testing.assert_array_equal(
        np.asarray(zarr.open_array(store=str(tmp_path / "ckpt" / "w"), mode="r")[...]), expected
    )
    store = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "ckpt" / "w")}}
    ).result()
    np.testing.assert_array_equal(store.read().result(), expected)


def test_a_failed_fsync_leaves_the_save_uncommitted_R9_8(tmp_path: Path) -> None:
    """The batched fsync at the end is where a writeback error (EIO) shows up; it must stop the commit."""
    root = tmp_path / "ckpt"
    storage = RecordingStorage(FaultyStorage(LocalStorage(root)).fail_sync())
    with pytest.raises(tessera.StorageError, match="injected fault") as info:
        tessera.save({"w": torch.arange(1000.0)}, storage, options=tessera.SaveOptions(chunk_bytes=1024))
    assert info.value.code == "io_error"
    assert [c.op for c in storage.ops("sync", "publish_root", "remove_unpublished")] == [
        "sync",
        "remove_unpublished",
    ], "no commit after a failed sync"
    assert not root.exists(), "the failed save removes what it wrote (R9.7)"
    with pytest.raises(tessera.CheckpointNotFoundError):
        tessera.open(root)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu().resolve_conj().contiguous().view(torch.uint8)


@cuda
def test_save_from_gpu_tensors_bit_exact(tmp_path: Path) -> None:
    """GPU tensors, contiguous or not, whole or sharded, are copied to the host chunk by chunk."""
    device = torch.device("cuda")
    state = {
        "w": torch.randn(1024, 700, device=device).to(torch.bfloat16),
        "t": torch.randn(300, 500, device=device).t(),  # not contiguous
        "c": torch.randn(64, 64, dtype=torch.complex64, device=device).conj(),  # a lazy conjugate
        "s": tessera.ShardedTensor(torch.randn(100, 40, device=device)[:, 10:30], (100, 20), (0, 0)),
    }
    expected = {k: _bits(v.local if isinstance(v, tessera.ShardedTensor) else v) for k, v in state.items()}
    tessera.save(state, tmp_path / "ckpt", options=tessera.SaveOptions(chunk_bytes=2**16))
    loaded = tessera.load(tmp_path / "ckpt")
    for key, bits in expected.items():
        assert torch.equal(_bits(loaded[key]), bits), key


def _flat_range_rank(rank: int, world_size: int, root: Path, device: str, gpu_direct: bool) -> None:
    """Each rank holds a flat range of one tensor on the GPU, with boundaries mid-row, so the
    chunks where the ranges meet are assembled from pieces that travel between ranks."""
    full = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)
    start, stop = [0, 1000, 64 * 48][rank], [0, 1000, 64 * 48][rank + 1]
    local = full.reshape(-1)[start:stop].to(device)
    state = {
        "w": tessera.ShardedTensor(local, (64, 48), (0, 0), box_shape=(64, 48), flat_range=(start, stop))
    }
    location = gpu_direct_storage(root) if gpu_direct else root
    tessera.save(state, location, options=tessera.SaveOptions(chunk_bytes=48 * 4 * 8))


@pytest.mark.parametrize(
    ("device", "gpu_direct"),
    [
        ("cpu", False),
        pytest.param("cuda", False, marks=cuda),
        pytest.param("cuda", True, marks=[cuda, pytest.mark.skipif(not HAS_KVIKIO, reason="needs KvikIO")]),
    ],
    ids=["cpu", "cuda", "cuda-direct"],
)
def test_pieces_move_to_their_chunks_owners_from_any_device(
    tmp_path: Path, device: str, gpu_direct: bool
) -> None:
    run_ranks(2, _flat_range_rank, tmp_path / "ckpt", device, gpu_direct)
    expected = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)
    assert torch.equal(tessera.load(tmp_path / "ckpt")["w"], expected)
