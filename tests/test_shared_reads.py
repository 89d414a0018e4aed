"""Loading together (``tessera.load(..., process_group=...)``): each needed chunk read by one rank (R14.8).

Ranks that need the same chunks (replicas of one shard, boxes that cut across
the saved chunks) read each chunk from storage once between them; the reader
sends the others their pieces over the process group. The result is the same
as every rank reading for itself, bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
import torch.distributed as dist
from tessera import ShardedTensor

from .conftest import flip_byte, random_tensor
from .ranks import run_ranks

SHAPE = (64, 40)


def _full(name: str) -> torch.Tensor:
    return random_tensor("bfloat16", SHAPE, seed=len(name))


def _load_together(rank: int, world_size: int, path: str, together: bool) -> tuple[bool, list[str]]:
    """Each rank: a column block of ``w`` (it crosses every row chunk), ``r`` whole (a replica),
    and a flat range of ``f``; returns whether all is bit-exact and the chunk files it read."""
    cols = SHAPE[1] // world_size
    total = SHAPE[0] * SHAPE[1]
    start, stop = total * rank // world_size, total * (rank + 1) // world_size
    template: dict[str, Any] = {
        "w": ShardedTensor(torch.zeros(SHAPE[0], cols, dtype=torch.bfloat16), SHAPE, (0, rank * cols)),
        "r": torch.zeros(SHAPE, dtype=torch.bfloat16),
        "f": ShardedTensor(
            torch.zeros(stop - start, dtype=torch.bfloat16),
            SHAPE,
            (0, 0),
            box_shape=SHAPE,
            flat_range=(start, stop),
        ),
    }
    checkpoint = tessera.open(path)
    reads: list[str] = []
    read_file = checkpoint.storage.read_file

    def counting(name: str, max_bytes: int) -> bytes:
        reads.append(name)
        return read_file(name, max_bytes)

    read_into = checkpoint.storage.read_into

    def counting_into(name: str, offset: int, outs: Any) -> None:
        reads.append(name)
        read_into(name, offset, outs)

    checkpoint.storage.read_file = counting  # type: ignore[method-assign]
    checkpoint.storage.read_into = counting_into  # type: ignore[method-assign]
    got = tessera.load(checkpoint, template, process_group=dist.group.WORLD if together else None)
    ok = (
        torch.equal(
            got["w"].view(torch.int16), _full("w")[:, rank * cols : (rank + 1) * cols].view(torch.int16)
        )
        and torch.equal(got["r"].view(torch.int16), _full("r").view(torch.int16))
        and torch.equal(got["f"].view(torch.int16), _full("f").reshape(-1)[start:stop].view(torch.int16))
    )
    return ok, [n for n in reads if "/c/" in n]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shared") / "ck"
    tessera.save(
        {k: _full(k) for k in ("w", "r", "f")},
        path,
        options=tessera.SaveOptions(chunk_bytes=SHAPE[1] * 2 * 8),
    )  # 8 rows a chunk
    return path


def test_each_needed_chunk_is_read_once_across_the_ranks_R14_8(saved: Path) -> None:
    together = run_ranks(4, _load_together, str(saved), True)
    alone = run_ranks(4, _load_together, str(saved), False)
    assert all(ok for ok, _ in together) and all(ok for ok, _ in alone)
    read_together = [name for _, names in together for name in names]
    assert sorted(read_together) == sorted(set(read_together)), "a chunk was read by two ranks"
    assert len(read_together) == 3 * 8  # every chunk of the three arrays, once
    # Alone, every rank reads all of w's and r's chunks, and its own two of f's.
    assert len([n for _, names in alone for n in names]) == 4 * 8 + 4 * 8 + 8
    per_rank = [len(names) for _, names in together]
    assert max(per_rank) - min(per_rank) <= 2, per_rank  # the reading is spread over the ranks


def _one_rank_fails(rank: int, world_size: int, path: str) -> str:
    shape = SHAPE if rank != 1 else (3, 3)  # rank 1 asks for a tensor of the wrong shape
    try:
        tessera.load(path, {"r": torch.zeros(shape, dtype=torch.bfloat16)}, process_group=dist.group.WORLD)
    except tessera.TesseraError as exc:
        return type(exc).__name__
    return "loaded"


def test_a_rank_that_cannot_load_fails_every_rank_R14_8(saved: Path) -> None:
    assert run_ranks(3, _one_rank_fails, str(saved)) == [
        "CollectiveError",
        "TensorMismatchError",
        "CollectiveError",
    ]


def _load_all_together(rank: int, world_size: int, path: str) -> str:
    try:
        tessera.load(path, {"r": torch.zeros(SHAPE, dtype=torch.bfloat16)}, process_group=dist.group.WORLD)
    except tessera.TesseraError as exc:
        return type(exc).__name__
    return "loaded"


def test_a_damaged_chunk_fails_every_rank_that_loads_together_R14_8(saved: Path, tmp_path: Path) -> None:
    """The one rank that reads a corrupt chunk raises checksum_mismatch; the others learn of it at once."""
    damaged = tmp_path / "damaged"
    shutil.copytree(saved, damaged)
    flip_byte(damaged / "r" / "c" / "3" / "0", 5)
    outcome = run_ranks(3, _load_all_together, str(damaged), collective_timeout_s=20)
    assert sorted(outcome) == ["ChecksumMismatchError", "CollectiveError", "CollectiveError"]
