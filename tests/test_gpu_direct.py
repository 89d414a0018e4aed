"""GPU-direct I/O (issue 6): chunk bytes between device memory and files through KvikIO, CRC32C
computed on the GPU, files identical to the host-staged writer's.

The CRC arithmetic that the GPU kernels use is checked here on the CPU against the ``crc32c``
package; the kernels, the writer and the reader run where CUDA and KvikIO are (the GPU machine),
and skip elsewhere. Where GPU-direct I/O cannot run, asking for it is a clear error before
anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
import tessera
import torch
from tessera.engine.gpu.crc32c import SEGMENT, crc32c_combine, x8n_mod_p
from tessera.engine.gpu.direct_io import gpu_direct_storage
from tessera.planning.chunk_grid import DIRECT_IO_BLOCK, choose_chunk_shape

from .conftest import ROOT, assert_bit_equal, flip_byte, forced_chunks, random_tensor, run_conformance

HAS_GPU_DIRECT = torch.cuda.is_available() and importlib.util.find_spec("kvikio") is not None
gpu_direct = pytest.mark.skipif(not HAS_GPU_DIRECT, reason="needs a CUDA device and KvikIO")


# -- the CRC arithmetic (everywhere) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"), [(0, 0), (0, 5), (5, 0), (1, 1), (100, SEGMENT), (SEGMENT + 1, 13), (10**5, 77_777)]
)
def test_crc_of_a_concatenation_from_the_crcs_of_its_parts_R6_4(first: int, second: int) -> None:
    rng = np.random.default_rng(first * 7 + second)
    a, b = rng.bytes(first), rng.bytes(second)
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


def test_shifting_by_n_bytes_composes() -> None:
    """x^(8(m+n)) = x^(8m) * x^(8n): the fold kernel relies on it for runs of segments."""
    rng = np.random.default_rng(1)
    parts = [rng.bytes(int(n)) for n in rng.integers(0, 3 * SEGMENT, size=20)]
    folded = 0
    for part in parts:
        folded = crc32c_combine(folded, crc32c.crc32c(part), len(part))
    assert folded == crc32c.crc32c(b"".join(parts))
    assert x8n_mod_p(0) == 1 << 31  # the polynomial 1, bit-reflected


# -- chunk shapes that suit direct I/O (everywhere) ----------------------------------------------


@pytest.mark.parametrize(
    ("shape", "itemsize"),
    [((50257, 768), 4), ((151936, 4096), 2), ((100_003, 3), 4), ((3000, 1000, 8), 1), ((2**22 + 1,), 1)],
)
def test_chunks_of_a_split_tensor_fill_whole_4k_blocks_R6_9(shape: tuple[int, ...], itemsize: int) -> None:
    chunk = choose_chunk_shape(shape, itemsize, 2**20)
    nbytes = int(np.prod(chunk)) * itemsize
    assert nbytes % DIRECT_IO_BLOCK == 0, chunk
    assert 2**19 < nbytes <= 2**20, chunk  # still close to the target


def test_a_tensor_that_fits_one_chunk_keeps_its_shape() -> None:
    assert choose_chunk_shape((1000, 3), 4, 2**20) == (1000, 3)
    assert choose_chunk_shape((7,), 4, 8) == (2,)  # too small to align: unchanged


# -- asking for GPU-direct where it cannot run ---------------------------------------------------


@pytest.mark.skipif(HAS_GPU_DIRECT, reason="GPU-direct I/O is available here")
def test_unavailable_gpu_direct_is_a_clear_error_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(tessera.GpuDirectUnavailableError, match="CUDA|KvikIO"):
        tessera.save({"w": torch.ones(3)}, gpu_direct_storage(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()
    tessera.save({"w": torch.ones(3)}, tmp_path / "ok")
    with pytest.raises(tessera.GpuDirectUnavailableError):
        tessera.open(tessera.gpu_direct_storage(tmp_path / "ok"))
    with (
        pytest.warns(DeprecationWarning, match="gpu_direct_storage"),
        pytest.raises(tessera.GpuDirectUnavailableError),
    ):
        tessera.load(tmp_path / "ok", gpu_direct=True)


def test_gpu_direct_keyword_of_open_and_load_is_a_deprecated_alias(tmp_path: Path) -> None:
    """``gpu_direct=`` still works for one release, warning with the replacement's name."""
    tessera.save({"w": torch.ones(3)}, tmp_path / "ck")
    with pytest.warns(DeprecationWarning, match=r"tessera\.gpu_direct_storage\(path\)") as caught:
        checkpoint = tessera.open(tmp_path / "ck", gpu_direct=False)
    assert caught[0].filename == __file__  # points at the caller
    assert_bit_equal(checkpoint.read("w"), torch.ones(3))
    with pytest.warns(DeprecationWarning, match="gpu_direct_storage"):
        assert_bit_equal(tessera.load(tmp_path / "ck", gpu_direct=False)["w"], torch.ones(3))


def test_gpu_direct_storage_refuses_a_storage_that_is_not_local(tmp_path: Path) -> None:
    with pytest.raises(tessera.StorageError, match="weird"):
        tessera.gpu_direct_storage("weird://bucket/x")


@pytest.mark.skipif(HAS_GPU_DIRECT, reason="GPU-direct I/O is available here")
def test_the_deprecated_gpu_direct_flag_still_asks_for_device_io(tmp_path: Path) -> None:
    with (
        pytest.warns(DeprecationWarning, match="gpu_direct_storage"),
        pytest.raises(tessera.GpuDirectUnavailableError, match="CUDA|KvikIO"),
    ):
        tessera.save({"w": torch.ones(3)}, tmp_path / "ck", gpu_direct=True)
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(tessera.GpuDirectUnavailableError, match="CUDA|KvikIO"),
    ):
        tessera.save_async({"w": torch.ones(3)}, tmp_path / "ck", gpu_direct=True)  # refused at the call
    assert not (tmp_path / "ck").exists()


@gpu_direct
def test_an_asynchronous_save_to_a_gpu_direct_storage_R6_5(tmp_path: Path) -> None:
    """The snapshot is in host memory: its chunks take the host path, into the same files."""
    state = {"w": random_tensor("float32", (300, 70), seed=3).cuda(), "n": torch.arange(5)}
    options = tessera.SaveOptions(chunk_bytes=40_000)
    handle = tessera.save_async(state, gpu_direct_storage(tmp_path / "direct"), options=options)
    assert handle.location == str(tmp_path / "direct")
    handle.wait()
    tessera.save(state, tmp_path / "staged", options=options)
    assert _chunk_files(tmp_path / "direct") == _chunk_files(tmp_path / "staged")


@pytest.mark.skipif(HAS_GPU_DIRECT, reason="GPU-direct I/O is available here")
def test_the_gpu_direct_backend_says_why_it_cannot_start(tmp_path: Path) -> None:
    done = run_conformance(ROOT / "conformance/backends/gpu-direct", timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "needs a CUDA device" in done.stdout and "CONFORMANT" not in done.stdout.replace(
        "NOT CONFORMANT", ""
    )


# -- on the GPU ----------------------------------------------------------------------------------


@gpu_direct
@pytest.mark.parametrize("offset", [0, 1, 3, 8])
@pytest.mark.parametrize("size", [1, 7, 8, 4095, 4096, 4097, 3 * SEGMENT * 1024 + 5, 2**24 + 12])
def test_device_crc_matches_the_host_crc(size: int, offset: int) -> None:
    from tessera.engine.gpu.crc32c import device_crc32c

    data = torch.randint(0, 256, (size + offset,), dtype=torch.uint8, device="cuda")[offset:]
    host = data.cpu().numpy().tobytes()
    assert device_crc32c(data) == crc32c.crc32c(host)
    assert device_crc32c(data, 0x12345678) == crc32c.crc32c(host, 0x12345678)


@gpu_direct
@pytest.mark.parametrize("batch_segments", [None, 1, 5])
def test_device_crcs_of_many_buffers_in_one_batch_match_the_host_crcs(
    batch_segments: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch mixes every case a load's chunks bring: empty, tiny, unaligned, a partial last
    segment, and buffers far larger than the segment, in any order; split into launches of a
    few segments (a buffer larger than one launch then goes alone), the results are the same."""
    from tessera.engine.gpu import crc32c as device
    from tessera.engine.gpu.crc32c import device_crc32c_many

    if batch_segments is not None:
        monkeypatch.setattr(device, "BATCH_SEGMENTS", batch_segments)
    pool = torch.randint(0, 256, (2**23,), dtype=torch.uint8, device="cuda")
    spans = [(0, 0), (5, 1), (3, 4095), (4096, 4096), (9, 3 * SEGMENT + 1), (100, 2**22 + 7), (7, 0), (1, 17)]
    buffers = [pool[start : start + size] for start, size in spans]
    assert device_crc32c_many(buffers) == [crc32c.crc32c(b.cpu().numpy().tobytes()) for b in buffers]
    assert device_crc32c_many([]) == []


def _gpu_state() -> dict[str, Any]:
    """Every path of the GPU-direct writer: contiguous chunks with and without edge padding,
    chunks gathered from strided tensors, tiny and empty arrays, 1-byte and complex types."""
    dev = torch.device("cuda")
    return {
        "w": random_tensor("bfloat16", (1000, 300), seed=1).to(dev),  # edge chunk padded
        "t": random_tensor("float32", (300, 200), seed=2).to(dev).t(),  # strided: gathered
        "e": random_tensor("float8_e4m3fn", (77, 13), seed=3).to(dev),
        "c": random_tensor("complex64", (5, 6), seed=4).to(dev),
        "b": random_tensor("bool", (33,), seed=5).to(dev),
        "s": random_tensor("float64", (), seed=6).to(dev),
        "z": torch.empty(0, 4, device=dev),
        "u": random_tensor("uint32", (64, 3), seed=7).to(dev),
        "h": random_tensor("int16", (40, 40), seed=8),  # on the host: the ordinary path
        "step": 12,
    }


def _chunk_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zarr.json" and not p.name.startswith(".")
    }


@gpu_direct
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_gpu_direct_files_equal_the_host_staged_files_R6_5(tmp_path: Path, compression: str | None) -> None:
    state = _gpu_state()
    options = tessera.SaveOptions(compression=tessera.Zstd() if compression else None, chunk_bytes=40_000)
    tessera.save(state, tmp_path / "staged", options=options)
    tessera.save(state, gpu_direct_storage(tmp_path / "direct"), options=options)
    staged, direct = _chunk_files(tmp_path / "staged"), _chunk_files(tmp_path / "direct")
    assert len(staged) > 20 and staged.keys() == direct.keys()
    assert [k for k in staged if staged[k] != direct[k]] == []
    assert tessera.verify(tmp_path / "direct").ok


@gpu_direct
def test_gpu_direct_files_read_by_stock_readers_R2_1(tmp_path: Path) -> None:
    ts = pytest.importorskip("tensorstore")
    zarr = pytest.importorskip("zarr")
    want = random_tensor("float32", (2000, 300), seed=11)
    tessera.save(
        {"w": want.cuda()},
        gpu_direct_storage(tmp_path / "ck"),
        options=tessera.SaveOptions(chunk_bytes=2**20),
    )
    path = str(tmp_path / "ck" / "w")
    by_zarr = np.asarray(zarr.open_array(store=path, mode="r")[...])
    by_ts = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, read=True).result()
    assert_bit_equal(torch.from_numpy(by_zarr), want)
    assert_bit_equal(torch.from_numpy(np.asarray(by_ts.read().result())), want)


@gpu_direct
def test_gpu_direct_load_in_place_and_into_regions(tmp_path: Path) -> None:
    state = _gpu_state()
    tessera.save(
        state, tmp_path / "ck", options=tessera.SaveOptions(chunk_bytes=40_000)
    )  # host-staged: readers are independent
    template = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    template["t"] = torch.zeros(300, 200, device="cuda").t()  # a strided destination
    got = tessera.load(tessera.gpu_direct_storage(tmp_path / "ck"), template)
    for key, want in state.items():
        if isinstance(want, torch.Tensor):
            assert got[key] is template[key] and got[key].device == want.device
            assert_bit_equal(got[key].cpu(), want.cpu())
    checkpoint = tessera.open(tessera.gpu_direct_storage(tmp_path / "ck"))
    part = torch.zeros(50, 299, dtype=torch.bfloat16, device="cuda")
    checkpoint.read_into("w", part, (slice(433, 483), slice(1, 300)))  # across chunks, shared
    assert_bit_equal(part.cpu(), state["w"][433:483, 1:300].cpu())


@gpu_direct
@pytest.mark.parametrize("where", ["data", "padding", "checksum"])
@pytest.mark.parametrize("destination", ["whole", "region"])
def test_gpu_direct_reads_check_every_chunk_R6_6(tmp_path: Path, where: str, destination: str) -> None:
    with forced_chunks(lambda shape: (64,)):
        tessera.save({"w": random_tensor("float32", (100,), seed=3)}, tmp_path / "ck")
    chunk = tmp_path / "ck" / "w" / "c" / "1"  # 36 elements of data, 28 of padding, then the CRC
    flip_byte(chunk, {"data": 4, "padding": 36 * 4 + 1, "checksum": 64 * 4 + 2}[where])
    out = torch.zeros(100 if destination == "whole" else 10, device="cuda")
    region = None if destination == "whole" else (slice(70, 80),)
    with pytest.raises(tessera.ChecksumMismatchError, match="w chunk c/1"):
        tessera.open(tessera.gpu_direct_storage(tmp_path / "ck")).read_into("w", out, region)


@gpu_direct
def test_gpu_direct_reads_refuse_missing_and_truncated_chunks_R6_7(tmp_path: Path) -> None:
    with forced_chunks(lambda shape: (64,)):
        tessera.save({"w": torch.ones(200), "v": torch.ones(200)}, tmp_path / "ck")
    (tmp_path / "ck" / "w" / "c" / "1").unlink()
    chunk = tmp_path / "ck" / "v" / "c" / "2"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    checkpoint = tessera.open(tessera.gpu_direct_storage(tmp_path / "ck"))
    with pytest.raises(tessera.MissingChunkError):
        checkpoint.read_into("w", torch.zeros(200, device="cuda"))
    with pytest.raises(tessera.InconsistentCheckpointError, match="bytes"):
        checkpoint.read_into("v", torch.zeros(200, device="cuda"))


@gpu_direct
def test_a_device_read_has_landed_when_read_into_returns(tmp_path: Path) -> None:
    """A device read runs beside the host reads after it; the storage waits for it before the
    file closes and the call returns, also when ``fill`` raised; one past the end of the file
    is an error that names the file (KvikIO raises at the end of a file)."""
    from tessera.engine.gpu.direct_io import kvikio_files
    from tessera.storage.local import LocalStorage

    data = bytes(range(256)) * 64
    (tmp_path / "f").write_bytes(data)
    storage = LocalStorage(tmp_path, kvikio_files())
    out, tail = torch.zeros(len(data) - 4096, dtype=torch.uint8, device="cuda"), bytearray(4096)

    def fill(size: int | None, read: Any) -> None:
        read(out)
        read(memoryview(tail))
        raise ValueError("fill failed")

    with pytest.raises(ValueError, match="fill failed"):
        storage.read_into("f", 0, fill)
    assert out.cpu().numpy().tobytes() == data[:-4096] and bytes(tail) == data[-4096:]
    longer = torch.zeros(len(data) + 1, dtype=torch.uint8, device="cuda")
    with pytest.raises(tessera.StorageError, match=re.escape(str(tmp_path / "f"))):
        storage.read_into("f", 0, lambda size, read: read(longer))


@gpu_direct
def test_a_gpu_direct_save_never_overwrites_R9_1(tmp_path: Path) -> None:
    tessera.save({"w": torch.ones(10, device="cuda")}, gpu_direct_storage(tmp_path / "ck"))
    before = _chunk_files(tmp_path / "ck")
    with pytest.raises(tessera.CheckpointExistsError):
        tessera.save({"w": torch.zeros(10, device="cuda")}, gpu_direct_storage(tmp_path / "ck"))
    assert _chunk_files(tmp_path / "ck") == before


@gpu_direct
def test_the_gpu_direct_backend_is_conformant(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    backend = ROOT / "conformance" / "backends" / "gpu-direct"
    done = run_conformance(backend, "--report", str(report_path), timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    failed = [c["id"] for c in report["cases"] if c["status"] in ("fail", "error")]
    assert failed == [] and "CONFORMANT" in done.stdout
