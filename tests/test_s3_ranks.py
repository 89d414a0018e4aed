"""Many ranks on S3: real gloo ranks (tests/ranks.py) save to and load from ``s3://`` URLs on the
session's ``moto_server`` (tests/s3_server.py), each rank building its own S3 storage from the URL
and the ``AWS_*`` variables it is given; plus region reads that fetch only the chunks they need,
and ``verify`` / ``load`` against a chunk overwritten on the server.

Ranks are forked from a forkserver started before the test set any variable, so the variables
travel as an argument and each rank sets them itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import tessera
import torch
import torch.distributed as dist
from tessera import ShardedTensor
from tessera.errors import ChecksumMismatchError
from tessera.testing.fault_proxy import FaultProxy

from .conftest import assert_bit_equal, random_tensor
from .ranks import run_ranks
from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name
from .test_s3_storage import _options, s3_env  # noqa: F401 - fixtures and helpers, used by name

obstore = pytest.importorskip("obstore", reason="S3 storage needs obstore (the s3 extra)")

from tessera.storage.s3 import S3Storage  # noqa: E402 - after the skip above

ROWS, COLS = 24, 10
CHUNK_BYTES = 4 * COLS * 2
"""Four rows of ``w`` (bfloat16) a chunk: six row chunks, which 4 and 3 ranks cut differently."""


def _full(name: str) -> torch.Tensor:
    dtype = {"w": "bfloat16", "c": "float32", "r": "int64"}[name]
    shape = (ROWS, COLS) if name != "c" else (6, ROWS)
    return random_tensor(dtype, shape, seed=len(name) + ord(name[0]))


def _rows(name: str, rank: int, world_size: int) -> ShardedTensor:
    full = _full(name)
    start, stop = ROWS * rank // world_size, ROWS * (rank + 1) // world_size
    return ShardedTensor(full[start:stop].clone(), tuple(full.shape), (start, 0))


def _cols(name: str, rank: int, world_size: int) -> ShardedTensor:
    full = _full(name)
    start, stop = ROWS * rank // world_size, ROWS * (rank + 1) // world_size
    return ShardedTensor(full[:, start:stop].clone(), tuple(full.shape), (0, start))


def _sharded_state(rank: int, world_size: int) -> dict[str, Any]:
    """Rows of ``w``, columns of ``c``, a replica of ``r`` on every rank, a step."""
    return {"w": _rows("w", rank, world_size), "c": _cols("c", rank, world_size), "r": _full("r"), "step": 7}


def _use_env(env: dict[str, str]) -> None:
    os.environ.update(env)


def _save_rank(rank: int, world_size: int, url: str, env: dict[str, str], asynchronous: bool) -> str:
    _use_env(env)
    state = _sharded_state(rank, world_size)
    options = tessera.SaveOptions(chunk_bytes=CHUNK_BYTES)
    if asynchronous:
        tessera.save_async(state, url, options=options).wait()
    else:
        tessera.save(state, url, options=options)
    return "saved"


def _counted(url: str) -> tuple[Any, list[str]]:
    """The checkpoint at ``url``, opened, and the list its storage's reads of files are noted in."""
    checkpoint = tessera.open(url)
    storage, reads = checkpoint.storage, []
    read_file, read_into = storage.read_file, storage.read_into

    def counting_file(name: str, max_bytes: int) -> bytes:
        reads.append(name)
        return read_file(name, max_bytes)

    def counting_into(name: str, offset: int, fill: Any) -> None:
        reads.append(name)
        read_into(name, offset, fill)

    storage.read_file, storage.read_into = counting_file, counting_into
    return checkpoint, reads


def _load_rank(rank: int, world_size: int, url: str, env: dict[str, str]) -> list[dict[str, Any]]:
    """Each rank loads its rows of ``w``, columns of ``c`` and all of ``r`` under this world's
    layout, alone and then together with the others; returns what it got and what it should
    have got, compared by the parent."""
    _use_env(env)
    want = _sharded_state(rank, world_size)
    outcomes = []
    for group in (None, dist.group.WORLD):
        template = {
            "w": ShardedTensor(torch.zeros_like(want["w"].local), (ROWS, COLS), want["w"].global_offset),
            "c": ShardedTensor(torch.zeros_like(want["c"].local), (6, ROWS), want["c"].global_offset),
            "r": torch.zeros_like(want["r"]),
            "step": 0,
        }
        checkpoint, reads = _counted(url)
        got = tessera.load(checkpoint, template, process_group=group)
        outcomes.append(
            {
                "got": {k: got[k] for k in ("w", "c", "r", "step")},
                "want": {"w": want["w"].local, "c": want["c"].local, "r": want["r"], "step": 7},
                "chunks_read": [n for n in reads if "/c/" in n],
            }
        )
    return outcomes


def _assert_loaded(results: list[list[dict[str, Any]]]) -> None:
    for outcomes in results:
        assert len(outcomes) == 2  # alone and together
        for result in outcomes:
            for key in ("w", "c", "r"):
                assert_bit_equal(result["got"][key], result["want"][key])
            assert result["got"]["step"] == 7


def test_four_ranks_save_three_load_resharded_alone_and_together(s3_server: S3Server) -> None:  # noqa: F811
    url = f"s3://{s3_server.bucket}/{s3_server.fresh_prefix()}/ckpt"
    env = s3_server.env()
    assert run_ranks(4, _save_rank, url, env, False) == ["saved"] * 4
    results = run_ranks(3, _load_rank, url, env)
    _assert_loaded(results)
    storage = S3Storage(s3_server.bucket, url.removeprefix(f"s3://{s3_server.bucket}/"), _options(s3_server))
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    stored = [k.removeprefix(f"{prefix}/") for a in ("w", "c", "r") for k in _chunk_keys(storage, prefix, a)]
    alone = [n for outcomes in results for n in outcomes[0]["chunks_read"]]
    together = [n for outcomes in results for n in outcomes[1]["chunks_read"]]
    # Together, each chunk is fetched from S3 by one rank only (R14.8); alone, every rank
    # fetches every chunk of the replicated r, and the chunks its boxes of w and c cross.
    assert sorted(together) == sorted(stored)
    assert len([n for n in alone if n.startswith("r/")]) == 3 * len([n for n in stored if n.startswith("r/")])
    assert len(alone) > len(together)


def test_save_async_from_many_ranks_and_from_one(s3_env: S3Server) -> None:  # noqa: F811
    many = f"s3://{s3_env.bucket}/{s3_env.fresh_prefix()}/many"
    assert run_ranks(2, _save_rank, many, s3_env.env(), True) == ["saved"] * 2
    loaded = tessera.load(many)
    for key in ("w", "c", "r"):
        assert_bit_equal(loaded[key], _full(key))
    one = f"s3://{s3_env.bucket}/{s3_env.fresh_prefix()}/one"
    w = _full("w")
    state = {"w": w, "c": _full("c"), "step": 7}
    handle = tessera.save_async(state, one, options=tessera.SaveOptions(chunk_bytes=CHUNK_BYTES))
    w.zero_()  # the snapshot was taken at the call
    handle.wait()
    loaded = tessera.load(one)
    assert_bit_equal(loaded["w"], _full("w"))
    assert_bit_equal(loaded["c"], _full("c"))
    assert loaded["step"] == 7


def _checkpointer_rank(rank: int, world_size: int, url: str, env: dict[str, str]) -> dict[str, Any]:
    """Every rank saves steps 1-3 of a sharded run through one Checkpointer (the coordinator takes
    the step's lease, moves ``latest``, applies retention), then resumes from ``latest``."""
    _use_env(env)
    state = {"w": _rows("w", rank, world_size), "step": 0}
    options = tessera.SaveOptions(chunk_bytes=CHUNK_BYTES)
    with tessera.Checkpointer(url, keep_last=2, options=options, process_group=dist.group.WORLD) as ckpt:
        for step in (1, 2, 3):
            state["step"] = step
            ckpt.save(step, state)
        mine = state["w"]
        empty = ShardedTensor(torch.zeros_like(mine.local), (ROWS, COLS), mine.global_offset)
        template = {"w": empty, "step": 0}
        resumed = ckpt.load(template)
    return {"step": resumed.step, "w": empty.local, "want": mine.local}


def test_a_checkpointer_of_two_ranks_on_s3(s3_server: S3Server) -> None:  # noqa: F811
    """Two gloo ranks run a Checkpointer on an ``s3://`` run directory: steps commit, retention
    deletes the oldest, ``latest`` names the newest, every rank resumes its own rows bit-exact,
    and no lease marker is left once the Checkpointer is closed."""
    prefix = f"{s3_server.fresh_prefix()}/run"
    results = run_ranks(2, _checkpointer_rank, f"s3://{s3_server.bucket}/{prefix}", s3_server.env())
    for result in results:
        assert result["step"] == 3
        assert_bit_equal(result["w"], result["want"])
    run = S3Storage(s3_server.bucket, prefix, _options(s3_server))
    assert [name for name, _ in run.entries()] == ["latest", "step-00000002", "step-00000003"]
    assert run.read_file("latest", 256) == b"step-00000003\n"


def _chunk_keys(storage: S3Storage, prefix: str, array: str) -> list[str]:
    listed = obstore.list(storage._store, prefix=f"{prefix}/{array}/c/").collect()
    return sorted(meta["path"] for meta in listed)


def test_a_region_read_fetches_only_the_chunks_it_overlaps(s3_server: S3Server) -> None:  # noqa: F811
    prefix = s3_server.fresh_prefix()
    storage = S3Storage(s3_server.bucket, prefix, _options(s3_server))
    full = _full("w")
    tessera.save({"w": full}, storage, options=tessera.SaveOptions(chunk_bytes=CHUNK_BYTES))
    chunks = _chunk_keys(storage, prefix, "w")
    grid = json.loads(bytes(obstore.get(storage._store, f"{prefix}/w/zarr.json").bytes()))
    chunk_rows, chunk_cols = grid["chunk_grid"]["configuration"]["chunk_shape"]
    assert chunk_cols == COLS and ROWS // chunk_rows == len(chunks) == 6
    with FaultProxy(s3_server.endpoint, timeout=10) as proxy:
        options = _options(s3_server)
        options.endpoint_url = proxy.url
        checkpoint = tessera.open(S3Storage(s3_server.bucket, prefix, options))
        proxy.set_rules([])  # count from here: opening read the metadata
        region = checkpoint.read("w", (slice(5, 11), slice(2, 7)))
        exchanges = proxy.exchanges
    assert_bit_equal(torch.as_tensor(region), full[5:11, 2:7])
    wanted = {f"{prefix}/w/c/{i}/0" for i in range(5 // chunk_rows, (11 - 1) // chunk_rows + 1)}
    assert len(wanted) == 2  # rows 5-10 cross the chunks of rows 4-7 and 8-11
    fetched = [
        e.path.split("?")[0].removeprefix(f"/{s3_server.bucket}/") for e in exchanges if e.method == "GET"
    ]
    # The array's metadata (read when first needed), then each overlapping chunk, no other.
    assert sorted(k for k in fetched if "/c/" in k) == sorted(wanted), exchanges
    assert [k for k in fetched if "/c/" not in k] == [f"{prefix}/w/zarr.json"], exchanges
    assert all(e.status in (200, 206) for e in exchanges), exchanges


def test_verify_finds_an_overwritten_chunk_and_load_refuses_it(s3_server: S3Server) -> None:  # noqa: F811
    prefix = s3_server.fresh_prefix()
    storage = S3Storage(s3_server.bucket, prefix, _options(s3_server))
    options = tessera.SaveOptions(chunk_bytes=CHUNK_BYTES)
    tessera.save({"w": _full("w"), "r": _full("r")}, storage, options=options)
    report = tessera.verify(storage)
    chunks = _chunk_keys(storage, prefix, "w") + _chunk_keys(storage, prefix, "r")
    assert report.ok and report.arrays == 2 and report.chunks == len(chunks)
    key = f"{prefix}/w/c/3/0"
    data = bytearray(obstore.get(storage._store, key).bytes())
    data[5] ^= 0x01  # same size, one bit: only the checksum can tell
    obstore.put(storage._store, key, bytes(data))
    report = tessera.verify(S3Storage(s3_server.bucket, prefix, _options(s3_server)))
    assert [p.code for p in report.problems] == ["checksum_mismatch"], report.problems
    assert report.problems[0].message.startswith("w chunk c/3/0 ") and prefix in report.problems[0].message
    assert_bit_equal(tessera.load(storage, {"r": torch.zeros_like(_full("r"))})["r"], _full("r"))
    with pytest.raises(ChecksumMismatchError, match="c/3/0"):
        tessera.load(storage)
