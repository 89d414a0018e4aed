"""Saving from many ranks (§16) and loading under another layout (R14.8).

Most planner checks need no processes: every rank's local plan is made here and the global plan (or the
coordinator's whole first step, claim included) is checked directly. Real gloo ranks (``tests/ranks.py``)
are spawned only where the collectives matter, and each world does several things: the round trips at
world sizes 2-4 (one process for size 1), one resharding load, the refusals every rank must raise, a rank
that fails or dies before the commit, and the plan cache.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch
from tessera import PlanCache, ShardedObject, ShardedTensor
from tessera.planning.contents import manifest_contents
from tessera.planning.global_plan import GlobalPlan, make_global_plan
from tessera.planning.local_plan import Extent, LeafSpec, LocalPlan, make_local_plan
from tessera.planning.options import SaveOptions
from tessera.state.boxes import Box
from tessera.state.flatten import flatten
from tessera.storage.base import Storage
from tessera.storage.local import LocalStorage
from tessera.testing import FaultyStorage, RecordingStorage, StorageWrapper

from .conftest import assert_bit_equal, assert_chunk_lists_are_stored_crcs, random_tensor, recorded, recording
from .ranks import RankDied, run_ranks

CHUNK_BYTES = 40
"""Small enough that most arrays have several chunks and most chunks straddle shard boundaries."""

# -- the sharded state of the round trips --------------------------------------------------------

GLOBALS: dict[str, tuple[str, tuple[int, ...]]] = {
    "model/tp0": ("bfloat16", (12, 5)),  # TP split of dim 0 over every rank
    "model/tp1": ("int32", (3, 12)),  # TP split of dim 1
    "model/uneven": ("float32", (10, 3)),  # torch.chunk rows: 10 over 3 = 4,4,2; over 4 = 3,3,3,1
    "model/few": ("int64", (2, 4)),  # torch.chunk rows: some ranks hold an empty box, or nothing
    "model/cols": ("float16", (3, 10)),  # torch.tensor_split of dim 1
    "model/rep": ("float16", (4, 6)),  # split over tp, copies over dp (replica_id = dp index)
    "model/plain": ("int8", (5, 3)),  # plain tensor: a replica on every rank
    "layers/~0": ("float32", (12, 2)),  # a sharded tensor in a list
    "layers/~1": ("uint8", (3,)),  # a plain tensor in a list
    "optim/flat": ("float64", (7, 5)),  # distributed optimizer: flat ranges of the whole tensor
    "optim/tpflat": ("float32", (12, 4)),  # flat ranges (over dp) of TP boxes (over tp)
    "scalar": ("bfloat16", ()),  # 0-d plain
    "scalar_sh": ("float32", ()),  # 0-d sharded: one main copy, every other rank a replica
    "empty": ("float32", (0, 3)),  # zero-size plain
    "empty_sh": ("float32", (4, 0)),  # zero-size sharded
}
CFG = {"lr": 3e-4, "betas": [0.9, 0.95], "name": "run", "none": None}
BLOB = bytes(range(7)) * 3


@functools.cache
def _globals() -> dict[str, torch.Tensor]:
    """The global tensors, bit patterns that every process builds alike."""
    return {
        path: random_tensor(dtype, shape, seed=i) for i, (path, (dtype, shape)) in enumerate(GLOBALS.items())
    }


def _rng_state(n: int) -> torch.Tensor:
    """Stands for one rank's RNG state (a uint8 tensor); small, to keep the number of chunks low."""
    return random_tensor("uint8", (24,), seed=500 + n)


def _mesh(rank: int, world_size: int) -> tuple[int, int, int, int]:
    """``(tp, dp, tp index, dp index)`` of a mesh (dp, tp), tp fastest; tp = 2 for even world sizes."""
    tp = 2 if world_size % 2 == 0 else 1
    return tp, world_size // tp, rank % tp, rank // tp


def _part(
    full: torch.Tensor,
    dim: int,
    parts: int,
    index: int,
    split: Callable[..., Any] = torch.chunk,
    replica_id: int = 0,
) -> ShardedTensor:
    """Part ``index`` of ``full`` split along ``dim`` by ``split``; an empty box where it has none."""
    pieces = split(full, parts, dim)
    start = sum(p.shape[dim] for p in pieces[:index])
    local = pieces[index] if index < len(pieces) else full.narrow(dim, full.shape[dim], 0)
    offset = [0] * full.ndim
    offset[dim] = start
    return ShardedTensor(local.clone(), tuple(full.shape), tuple(offset), replica_id=replica_id)


def _flat(full: torch.Tensor, rows: tuple[int, int], parts: int, index: int) -> ShardedTensor:
    """Flat range ``index`` of ``parts`` (``[n*i//p, n*(i+1)//p)``) of the box of rows ``rows``."""
    box = full[rows[0] : rows[1]]
    n = box.numel()
    start, stop = n * index // parts, n * (index + 1) // parts
    return ShardedTensor(
        box.reshape(-1)[start:stop].clone(),
        tuple(full.shape),
        (rows[0], *[0] * (full.ndim - 1)),
        box_shape=tuple(box.shape),
        flat_range=(start, stop),
    )


def _rank_state(rank: int, world_size: int) -> dict[str, Any]:
    """What rank ``rank`` of ``world_size`` holds: every kind of shard and leaf of §16.1."""
    g = _globals()
    tp, dp, t, d = _mesh(rank, world_size)
    model: dict[str, Any] = {
        "tp0": ShardedTensor.from_rank_offsets(
            g["model/tp0"].chunk(world_size, 0)[rank].clone(), (0, rank, world_size)
        ),
        "tp1": ShardedTensor.from_rank_offsets(
            g["model/tp1"].chunk(world_size, 1)[rank].clone(), (1, rank, world_size)
        ),
        "uneven": _part(g["model/uneven"], 0, world_size, rank),
        "few": _part(g["model/few"], 0, world_size, rank),
        "cols": _part(g["model/cols"], 1, world_size, rank, torch.tensor_split),
        "rep": _part(g["model/rep"], 1, tp, t, replica_id=d),
        "plain": g["model/plain"].clone(),
    }
    if world_size == 4 and rank == 3:
        del model["few"]  # holds none of it and leaves the key out (rank 2 holds an empty box)
    rows = 12 // tp
    state: dict[str, Any] = {
        "model": model,
        "layers": [_part(g["layers/~0"], 0, world_size, rank), g["layers/~1"].clone()],
        "optim": {
            "flat": _flat(g["optim/flat"], (0, 7), world_size, rank),
            "tpflat": _flat(g["optim/tpflat"], (t * rows, (t + 1) * rows), dp, d),
        },
        "scalar": g["scalar"].clone(),
        "scalar_sh": ShardedTensor(g["scalar_sh"].clone(), (), (), replica_id=rank),
        "empty": g["empty"].clone(),
        "empty_sh": _part(g["empty_sh"], 0, world_size, rank, torch.tensor_split),
        "step": 7,
        "cfg": CFG,
    }
    if rank == 0:
        state["note"] = "rank 0 only"
    state["blob"] = BLOB
    state["rng"] = ShardedObject(_rng_state(rank), (world_size,), (rank,))
    state["tp_rng"] = ShardedObject(_rng_state(100 + t), (tp,), (t,), replica_id=d)
    state["seed"] = ShardedObject(1000 + rank, (dp, tp), (d, t))
    return state


def _expected(world_size: int) -> dict[str, Any]:
    """Every stored entry by path, in the merged order of R16.8."""
    tp, dp, _, _ = _mesh(0, world_size)
    want: dict[str, Any] = dict(_globals())
    want.update({"step": 7, "cfg": CFG, "note": "rank 0 only", "blob": BLOB})
    want.update({f"rng/~{r}": _rng_state(r) for r in range(world_size)})
    want.update({f"tp_rng/~{t}": _rng_state(100 + t) for t in range(tp)})
    want.update({f"seed/~{d}/~{t}": 1000 + d * tp + t for d in range(dp) for t in range(tp)})
    return want


def _save_rank(rank: int, world_size: int, path: Path) -> tuple[str, int, dict[str, Any]]:
    tp, dp, _, _ = _mesh(rank, world_size)
    manifest = tessera.save(
        _rank_state(rank, world_size),
        path,
        options=tessera.SaveOptions(chunk_bytes=CHUNK_BYTES),
        parallelism={"tp": tp, "dp": dp},
        metadata={"run": "sharded"},
    )
    return manifest.save_id, manifest.world_size, manifest.parallelism


WORLD_SIZES = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, list[Any]]]:
    """The round-trip state saved at every world size: ``{world size: (path, what each rank returned)}``."""
    root = tmp_path_factory.mktemp("sharded")
    out = {1: (root / "ws1", [_save_rank(0, 1, root / "ws1")])}  # one process, no torch.distributed
    for ws in WORLD_SIZES[1:]:
        out[ws] = (root / f"ws{ws}", run_ranks(ws, _save_rank, root / f"ws{ws}"))
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_chunk_lists_are_the_crcs_the_owners_stored_R3_19_R16_17(
    saved: dict[int, tuple[Path, list[Any]]], world_size: int
) -> None:
    """Each rank reports the CRCs of the chunks it wrote (replicated arrays once, chunks assembled
    from flat ranges moved between ranks by their owner); the coordinator's chunk lists are exactly
    the CRCs at the ends of the chunk files."""
    assert assert_chunk_lists_are_stored_crcs(saved[world_size][0]) > 0


def _assert_stored(ck: tessera.Checkpoint, path: str, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert_bit_equal(ck.read(path), want)
    else:
        got = ck.value(path)
        assert type(got) is type(want) and got == want, (path, got, want)


# -- 1, 8: round trips and provenance ------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_round_trip_R16_1_R16_3_R16_5(saved: dict[int, tuple[Path, list[Any]]], world_size: int) -> None:
    """Every element of every shard kind (boxes, uneven and empty boxes, flat ranges, replicas, 0-d and
    zero-size, objects, values) is stored once, bit-exact; the checkpoint verifies; the manifest every
    rank got back is the committed one, with world_size and parallelism as passed (R16.8)."""
    path, returned = saved[world_size]
    ck = tessera.open(path)
    want = _expected(world_size)
    assert sorted(ck.keys()) == sorted(want)
    for key, value in want.items():
        _assert_stored(ck, key, value)
    report = tessera.verify(path)
    assert report.ok, report.problems
    assert report.arrays == sum(isinstance(v, (torch.Tensor, bytes)) for v in want.values())
    tp, dp, _, _ = _mesh(0, world_size)
    assert returned == [(ck.manifest.save_id, world_size, {"tp": tp, "dp": dp})] * world_size
    assert ck.manifest.world_size == world_size
    assert ck.manifest.parallelism == {"tp": tp, "dp": dp}
    assert ck.manifest.metadata == {"run": "sharded"}


def test_whole_load_rebuilds_lists_and_grids_R16_5(saved: dict[int, tuple[Path, list[Any]]]) -> None:
    got = tessera.load(saved[4][0])
    g = _globals()
    assert isinstance(got["layers"], list) and len(got["layers"]) == 2
    assert_bit_equal(got["layers"][0], g["layers/~0"])
    assert sorted(got["rng"]) == [0, 1, 2, 3]
    for r in range(4):
        assert_bit_equal(got["rng"][r], _rng_state(r))
    assert got["seed"] == {0: {0: 1000, 1: 1001}, 1: {0: 1002, 1: 1003}}
    assert got["step"] == 7 and got["cfg"] == CFG and got["blob"] == BLOB


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_files_whatever_the_world_size_R16_1(saved: dict[int, tuple[Path, list[Any]]]) -> None:
    """Same state, same chunk shapes: a save by N ranks holds the files of a one-process save, byte for
    byte, but for the root and the claim (and the grids of sharded objects, whose shape is per layout).
    Zero-size arrays are left out: their chunk shape follows the shards (R16.9 leaves it free)."""

    def comparable(path: str) -> bool:
        grids_and_zero_size = ("rng/", "tp_rng/", "seed/", "empty_sh/")
        return not path.startswith(grids_and_zero_size) and path not in ("zarr.json", ".tessera-claim.json")

    one = {k: v for k, v in _files(saved[1][0]).items() if comparable(k)}
    for ws in WORLD_SIZES[1:]:
        many = {k: v for k, v in _files(saved[ws][0]).items() if comparable(k)}
        assert sorted(many) == sorted(one), ws
        differ = [k for k in one if many[k] != one[k]]
        assert not differ, (ws, differ)


def test_cells_of_a_grid_follow_each_other_in_merged_order_R16_8(
    saved: dict[int, tuple[Path, list[Any]]],
) -> None:
    """R16.8: 'the cells of one sharded object follow each other in C order of their offsets, where
    its key first appears'. The reference appends rank r's cells after everything rank 0 listed."""
    ck = tessera.open(saved[4][0])
    assert [e.path for e in ck.manifest.entries] == list(_expected(4))


def test_only_the_main_copy_of_a_tensor_cell_is_stored_R16_5() -> None:
    """R16.5: each cell's main copy 'alone is stored'. The planner treats the copies of a tensor-valued
    cell as plain replicas and gives the chunk to the least-loaded holder: here rank 1's copy (its bytes
    differ, as RNG states of data-parallel ranks may), because rank 0 already writes 'big'."""
    states = [
        {"big": torch.zeros(64), "rng": ShardedObject(_rng(0), (1,), (0,))},
        {"rng": ShardedObject(_rng(9), (1,), (0,), replica_id=1)},
    ]
    plan = _global_plan(states)
    sources = [
        s.rank
        for rp in plan.ranks
        for a in rp.arrays
        if a.path == "rng/~0"
        for c in a.chunks
        for s in c.sources
    ]
    assert sources == [0], f"rng/~0 is written from rank {sources}'s copy"


def test_a_copy_of_a_json_cell_is_not_stored_R16_5() -> None:
    """R16.5 again, for a JSON-valued cell: the copy's value plays no part, yet the coordinator refuses
    'seed/~0: ranks 0 and 1 hold different values (1 and 2); a per-rank value is a ShardedObject'."""
    entries, _ = _contents(
        [{"seed": ShardedObject(1, (1,), (0,))}, {"seed": ShardedObject(2, (1,), (0,), replica_id=1)}]
    )
    assert [(e.path, e.value) for e in entries] == [("seed/~0", 1)]


def test_cells_in_merged_order_without_processes_R16_8() -> None:
    """The same, minimal: rank 0 holds cell 1 of two grids, rank 1 cell 0. The reference lists
    ['rng/~1', 'seed/~1', 'step', 'rng/~0', 'seed/~0']."""
    states = [
        {"rng": ShardedObject(torch.zeros(2), (2,), (r,)), "seed": ShardedObject(r, (2,), (r,)), "step": 1}
        for r in (1, 0)
    ]
    entries, _ = _contents(states)
    assert [e.path for e in entries] == ["rng/~0", "rng/~1", "seed/~0", "seed/~1", "step"]


# -- 2: resharding loads -------------------------------------------------------------------------


def _blank(like: torch.Tensor) -> torch.Tensor:
    """Garbage of ``like``'s dtype and shape, so that a region the load forgets shows."""
    return random_tensor(str(like.dtype).removeprefix("torch."), tuple(like.shape), seed=4242)


def _region_of(full: torch.Tensor, st: ShardedTensor) -> torch.Tensor:
    """What a shard must hold once loaded: its box of ``full``, or the flat range of that box."""
    assert st.box_shape is not None
    box = full[tuple(slice(o, o + s) for o, s in zip(st.global_offset, st.box_shape, strict=True))]
    return box.reshape(-1)[slice(*st.flat_range)] if st.flat_range is not None else box


def _template(full: torch.Tensor, st: ShardedTensor) -> ShardedTensor:
    return ShardedTensor(_blank(st.local), st.global_shape, st.global_offset, st.box_shape, st.flat_range)


def _load_layout(rank: int, tp: int, dp: int, saved_ws: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The template of rank ``rank`` of a mesh (dp, tp) and what each of its leaves must hold after loading:
    model tensors split over tp (along other dims than at save time where they can be), optimizer state
    as flat ranges (over dp) of TP boxes, objects by cell, a value."""
    g = _globals()
    t, d = rank % tp, rank // tp
    split = {
        "model/tp0": _part(g["model/tp0"], 0, tp, t, torch.tensor_split),
        "model/tp1": _part(g["model/tp1"], 1, tp, t, torch.tensor_split),
        "model/uneven": _part(g["model/uneven"], 1, tp, t, torch.tensor_split),
        "model/few": _part(g["model/few"], 1, tp, t, torch.tensor_split),
        "model/cols": _part(g["model/cols"], 0, tp, t, torch.tensor_split),
        "model/rep": _part(g["model/rep"], 0, tp, t, torch.tensor_split),
        "layers/~0": _part(g["layers/~0"], 1, tp, t, torch.tensor_split),
        "optim/flat": _flat(g["optim/flat"], _split_rows(7, tp, t), dp, d),
        "optim/tpflat": _flat(g["optim/tpflat"], _split_rows(12, tp, t), dp, d),
        "scalar_sh": ShardedTensor(g["scalar_sh"].clone(), (), ()),
        "empty_sh": _part(g["empty_sh"], 0, tp, t, torch.tensor_split),
    }
    templates: dict[str, Any] = {path: _template(g[path], st) for path, st in split.items()}
    want: dict[str, Any] = {path: _region_of(g[path], st) for path, st in split.items()}
    templates["model/plain"], want["model/plain"] = _blank(g["model/plain"]), g["model/plain"]
    saved_tp = _mesh(0, saved_ws)[0]
    templates["rng"] = ShardedObject(torch.empty(0), (saved_ws,), (rank % saved_ws,))
    want["rng"] = _rng_state(rank % saved_ws)
    templates["tp_rng"] = ShardedObject(None, (saved_tp,), (t % saved_tp,))
    want["tp_rng"] = _rng_state(100 + t % saved_tp)
    templates["step"], want["step"] = None, 7
    return _nested(templates), want


def _split_rows(n: int, parts: int, index: int) -> tuple[int, int]:
    sizes = [len(p) for p in torch.tensor_split(torch.arange(n), parts)]
    return sum(sizes[:index]), sum(sizes[: index + 1])


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": x, "l/~0": y}`` to ``{"a": {"b": x}, "l": {0: y}}`` (an integer key stands for a list)."""
    out: dict[Any, Any] = {}
    for path, value in flat.items():
        parts: list[Any] = [int(p[1:]) if p.startswith("~") else p for p in path.split("/")]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _get(tree: Any, path: str) -> Any:
    for part in path.split("/"):
        tree = tree[int(part[1:]) if part.startswith("~") else part]
    return tree


def _load_and_check(path: Path, saved_ws: int, rank: int, tp: int, dp: int) -> int:
    """Load this rank's part under mesh (dp, tp) into a fresh template; check every leaf bit-exact."""
    template, want = _load_layout(rank, tp, dp, saved_ws)
    got = tessera.load(path, template)
    assert got is template
    for key, value in want.items():
        leaf = _get(got, key)
        if isinstance(value, torch.Tensor):
            assert_bit_equal(leaf, value)
        else:
            assert leaf == value, (key, leaf, value)
    return len(want)


def _load_rank(rank: int, world_size: int, jobs: list[tuple[Path, int, int, int]]) -> list[int]:
    return [_load_and_check(path, saved_ws, rank, tp, dp) for path, saved_ws, tp, dp in jobs]


def test_resharding_loads_on_four_ranks_R14_8(
    saved: dict[int, tuple[Path, list[Any]]], tmp_path: Path
) -> None:
    """On four real ranks at once: TP=2 x DP=2 loaded at TP=4; the reverse, a plain (unsharded) save of one
    process loaded at TP=4 with ShardedTensor templates; flat ranges loaded at DP=4 from checkpoints whose
    ranges were saved at DP=2 (of TP=2 boxes) and DP=3."""
    g = _globals()
    plain = _nested({path: t.clone() for path, t in g.items()})
    plain.update({"step": 7, "rng": {0: _rng_state(0)}, "tp_rng": {0: _rng_state(100)}})
    tessera.save(plain, tmp_path / "plain", options=tessera.SaveOptions(chunk_bytes=CHUNK_BYTES))
    jobs = [
        (saved[4][0], 4, 4, 1),
        (tmp_path / "plain", 1, 4, 1),
        (saved[4][0], 4, 1, 4),
        (saved[3][0], 3, 1, 4),
    ]
    assert run_ranks(4, _load_rank, jobs) == [[len(_load_layout(0, 4, 1, 4)[1])] * 4] * 4


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_resharding_loads_in_one_process_R14_8(
    saved: dict[int, tuple[Path, list[Any]]], world_size: int
) -> None:
    """Loading is each rank on its own: TP=1/DP=1 with ShardedTensor templates (one rank), and the
    ranks of TP=3, of TP=2 x DP=3 and of DP=2 one after the other, without processes."""
    path = saved[world_size][0]
    for tp, dp in [(1, 1), (3, 1), (2, 3), (1, 2)]:
        for rank in range(tp * dp):
            _load_and_check(path, world_size, rank, tp, dp)


@pytest.mark.parametrize("world_size", [4, 3])
def test_unsharded_load_with_plain_templates_R14_8(
    saved: dict[int, tuple[Path, list[Any]]], world_size: int
) -> None:
    """A sharded checkpoint loads into a single process's plain tensors: no knowledge of the ranks."""
    g = _globals()
    template = _nested({path: _blank(t) for path, t in g.items()})
    got = tessera.load(saved[world_size][0], template)
    for path, want in g.items():
        assert_bit_equal(_get(got, path), want)


# -- 3: only overlapping chunks are read ---------------------------------------------------------

READS = ("read_file", "read_into")
"""Storage calls that read a file's bytes (``size`` only stats it)."""


def test_a_shard_reads_only_overlapping_chunks_R14_2_R14_8(tmp_path: Path) -> None:
    """t is [16, 8] float32 in chunks of two rows (c/0/0 ... c/7/0). Each destination shard reads exactly
    the chunks its elements lie in: boxes, boxes across chunk edges, columns, flat ranges."""
    full = random_tensor("float32", (16, 8), seed=3)
    tessera.save({"t": full}, tmp_path / "ck", options=tessera.SaveOptions(chunk_bytes=64))
    shards: list[tuple[ShardedTensor, set[int]]] = [
        *[(ShardedTensor(torch.empty(4, 8), (16, 8), (4 * r, 0)), {2 * r, 2 * r + 1}) for r in range(4)],
        (ShardedTensor(torch.empty(4, 8), (16, 8), (3, 0)), {1, 2, 3}),  # straddles chunk edges
        (ShardedTensor(torch.empty(16, 2), (16, 8), (0, 6)), set(range(8))),  # columns: every chunk
        (ShardedTensor(torch.empty(30), (16, 8), (0, 0), box_shape=(16, 8), flat_range=(20, 50)), {1, 2, 3}),
        (ShardedTensor(torch.empty(5), (16, 8), (4, 0), box_shape=(8, 8), flat_range=(59, 64)), {5}),
        (ShardedTensor(torch.empty(0), (16, 8), (0, 0), box_shape=(16, 8), flat_range=(9, 9)), set()),
    ]
    for shard, rows in shards:
        storage = recorded(tmp_path / "ck")
        ck = tessera.open(storage)
        with recording(storage) as calls:
            got = tessera.load(ck, {"t": shard})["t"]
        read = [p for m, p in calls if "/c/" in p and m in READS]
        assert sorted(read) == sorted(f"t/c/{i}/0" for i in rows), (shard, read)  # each chunk read once
        assert_bit_equal(got, _region_of(full, shard))


def test_a_rank_reads_only_its_chunks_of_a_sharded_save_R14_8(
    saved: dict[int, tuple[Path, list[Any]]],
) -> None:
    """The same on the checkpoint four ranks wrote: layers/~0 is [12, 2] float32 in chunks of 5 rows;
    TP=4 loaders (3 rows each) read the one or two chunks their rows lie in, nothing else of it."""
    g = _globals()["layers/~0"]
    for rank in range(4):
        storage = recorded(saved[4][0])
        ck = tessera.open(storage)
        shard = ShardedTensor(torch.empty(3, 2), (12, 2), (3 * rank, 0))
        with recording(storage) as calls:
            got = tessera.load(ck, {"layers": [shard]})["layers"]
        read = sorted(p for m, p in calls if "/c/" in p and m in READS)
        assert read == sorted({f"layers/~0/c/{r // 5}/0" for r in range(3 * rank, 3 * rank + 3)}), read
        assert_bit_equal(got[0], g[3 * rank : 3 * rank + 3])


# -- 4: the global plan: one writer per chunk, balance, alignment ---------------------------------


def _local_plans(states: list[dict[str, Any]], chunk_bytes: int) -> tuple[SaveOptions, list[LocalPlan]]:
    options = SaveOptions(chunk_bytes=chunk_bytes)
    return options, [make_local_plan(flatten(s), options) for s in states]


def _global_plan(states: list[dict[str, Any]], chunk_bytes: int = CHUNK_BYTES) -> GlobalPlan:
    options, local = _local_plans(states, chunk_bytes)
    plan = make_global_plan([lp.arrays for lp in local], options)
    _check_plan(plan)
    return plan


def _contents(states: list[dict[str, Any]], chunk_bytes: int = CHUNK_BYTES) -> tuple[Any, Any]:
    options, local = _local_plans(states, chunk_bytes)
    plan = make_global_plan([lp.arrays for lp in local], options)
    return manifest_contents(
        plan,
        [lp.values for lp in local],
        [lp.order for lp in local],
        [lp.lists for lp in local],
        [lp.tuples for lp in local],
    )[:2]


def _check_plan(plan: GlobalPlan) -> None:
    """R16.8-R16.11 on any plan: every chunk of every array has exactly one owner, its sources tile it,
    every source the owner lacks is sent to it exactly once, one rank writes each zarr.json, loads add up."""
    owners: Counter[tuple[str, tuple[int, ...]]] = Counter()
    metadata: Counter[str] = Counter()
    foreign: Counter[tuple[int, int, Any]] = Counter()
    for rank, rank_plan in enumerate(plan.ranks):
        if rank:
            assert rank_plan.groups == (), "the coordinator writes every group zarr.json"
        written = 0
        for task in rank_plan.arrays:
            metadata[task.path] += task.write_metadata
            for chunk in task.chunks:
                owners[task.path, chunk.index] += 1
                bounds = task.layout.chunk_region(chunk.index)
                region = Box(tuple(a for a, _ in bounds), tuple(b - a for a, b in bounds))
                covered = np.zeros(region.shape, dtype=np.int64)
                for source in chunk.sources:
                    assert region.contains(source.region), (task.path, chunk.index, source)
                    covered[source.region.relative_to(region.offset)] += 1
                    if source.rank != rank:
                        foreign[source.rank, rank, source] += 1
                    written += source.region.volume * task.layout.dtype.itemsize
                assert (covered == 1).all(), (task.path, chunk.index, chunk.sources)
        assert written == plan.loads[rank] == rank_plan.nbytes
    expected = Counter((p, i) for p, e in plan.entries.items() for i in e.layout.chunk_indices())
    assert owners == expected, "every chunk of every array has exactly one owner (R16.8, R16.10, R16.13)"
    assert metadata == Counter(dict.fromkeys(plan.entries, 1))
    sent = Counter((src, t.peer, t.source) for src, rp in enumerate(plan.ranks) for t in rp.sends)
    received = Counter((t.peer, dst, t.source) for dst, rp in enumerate(plan.ranks) for t in rp.receives)
    assert sent == received == foreign, "pieces move through the process group, once each (R16.11)"
    tags = [(src, t.peer, t.tag) for src, rp in enumerate(plan.ranks) for t in rp.sends]
    assert len(set(tags)) == len(tags)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_round_trip_layouts_plan_R16_8_R16_11(world_size: int) -> None:
    plan = _global_plan([_rank_state(r, world_size) for r in range(world_size)])
    assert set(plan.entries) == {
        p for p, v in _expected(world_size).items() if isinstance(v, (torch.Tensor, bytes))
    }
    if world_size > 1:
        assert any(rp.sends for rp in plan.ranks), "tiny uneven shards: pieces move to chunk owners"


def test_0d_and_zero_size_arrays_plan_R16_8() -> None:
    """A 0-d array has one chunk (key ``c``) with one owner; a zero-size array has none; each has one
    zarr.json writer. Plain and sharded, over two ranks."""
    states = [
        {
            "s": torch.zeros(()),
            "z": torch.zeros(0, 3),
            "ss": ShardedTensor(torch.zeros(()), (), (), replica_id=r),
            "zs": ShardedTensor(torch.zeros(2, 0), (4, 0), (2 * r, 0)),
        }
        for r in range(2)
    ]
    plan = _global_plan(states)
    chunks = Counter(a.path for rp in plan.ranks for a in rp.arrays for _ in a.chunks)
    assert chunks == {"s": 1, "ss": 1}


@pytest.mark.parametrize(
    ("shape", "dim", "chunk_shape"), [((4096, 512), 0, (1024, 512)), ((512, 4096), 1, (512, 1024))]
)
def test_tp_shards_of_a_large_tensor_align_R16_9(
    shape: tuple[int, int], dim: int, chunk_shape: tuple[int, int]
) -> None:
    """8 MiB float32 over TP=4, 3 MiB target chunks (whose plain grid would straddle the shards): the
    chunks follow the shard boundaries instead, each is written by the rank that holds it, nothing moves,
    every rank writes its 2 MiB."""
    local = list(shape)
    local[dim] //= 4
    states = [{"w": ShardedTensor.from_rank_offsets(torch.empty(local), (dim, r, 4))} for r in range(4)]
    plan = _global_plan(states, chunk_bytes=3 * 2**20)
    assert plan.entries["w"].layout.chunk_shape == chunk_shape
    assert all(not rp.sends and not rp.receives for rp in plan.ranks)
    assert plan.loads == (2 * 2**20,) * 4
    for rank, rp in enumerate(plan.ranks):
        for chunk in rp.arrays[0].chunks:
            assert [s.rank for s in chunk.sources] == [rank]


def test_tiny_uneven_shards_gather_to_one_owner_R16_9_R16_11() -> None:
    """10 rows over 4 ranks (3,3,3,1) of a 120-byte tensor: one chunk, owned by the rank that holds most
    (the lowest of equals); the other three send it their rows."""
    full = random_tensor("float32", (10, 3), seed=1)
    plan = _global_plan([{"w": _part(full, 0, 4, r)} for r in range(4)], chunk_bytes=2**20)
    assert plan.entries["w"].layout.chunk_shape == (10, 3)
    assert [len(rp.arrays[0].chunks) if rp.arrays else 0 for rp in plan.ranks] == [1, 0, 0, 0]
    assert [(t.peer, t.source.region) for t in plan.ranks[0].receives] == [
        (1, Box((3, 0), (3, 3))),
        (2, Box((6, 0), (3, 3))),
        (3, Box((9, 0), (1, 3))),
    ]
    assert [len(rp.sends) for rp in plan.ranks] == [0, 1, 1, 1]


def test_flat_ranges_move_only_the_chunks_they_split_R16_6_R16_11() -> None:
    """A [1000, 100] float32 tensor as three distributed-optimizer flat ranges, chunks of 10 rows: only the
    two chunks that hold a range boundary (elements 33333 and 66666) are gathered."""
    full = torch.empty(1000, 100)
    plan = _global_plan([{"m": _flat(full, (0, 1000), 3, r)} for r in range(3)], chunk_bytes=4000)
    gathered = {
        c.index: {s.rank for s in c.sources}
        for rp in plan.ranks
        for a in rp.arrays
        for c in a.chunks
        if len(c.sources) > 1
    }
    assert gathered == {(33, 0): {0, 1}, (66, 0): {1, 2}}
    moved = {t.source.region.offset[0] // 10 for rp in plan.ranks for t in rp.sends}
    assert moved == {33, 66}  # the moving part of a range is up to 2 boxes (a row's tail, whole rows)
    assert max(plan.loads) <= 2 * sum(plan.loads) / 3


def test_replicas_are_written_once_and_balanced_R16_10() -> None:
    """Four ranks each holding the same four plain 64 KiB tensors (16 chunks): each chunk once, each rank
    a quarter; DP=4 x TP=2 copies of TP shards over 8 ranks: each rank an eighth, nothing moves."""
    same = {f"p{i}": torch.empty(256, 64) for i in range(4)}
    plan = _global_plan([same] * 4, chunk_bytes=16 * 2**10)
    assert plan.loads == (64 * 2**10,) * 4
    w = torch.empty(1024, 512)
    states = [
        {"w": ShardedTensor.from_rank_offsets(w.chunk(2, 0)[r % 2], (0, r % 2, 2), replica_id=r // 2)}
        for r in range(8)
    ]
    plan = _global_plan(states, chunk_bytes=256 * 2**10)
    assert plan.loads == (256 * 2**10,) * 8
    assert all(not rp.sends for rp in plan.ranks)


def test_owner_uses_its_own_replica_of_a_part_R16_9() -> None:
    """A gathered chunk's owner that holds a copy (replica_id > 0) of another rank's part takes it from its
    own memory instead of receiving it. (One rank holding several shards of a key, main and copy, arises
    from DTensor placements, so the local plans are written out here.)"""
    rank0 = LeafSpec(
        ("w",), "tensor", "float32", (6, 2), "torch", sharded=True, extents=(Extent((0, 0), (2, 2), None, 0),)
    )
    rank1 = LeafSpec(
        ("w",),
        "tensor",
        "float32",
        (6, 2),
        "torch",
        sharded=True,
        extents=(Extent((2, 0), (4, 2), None, 0), Extent((0, 0), (2, 2), None, 1)),
    )
    plan = make_global_plan([(rank0,), (rank1,)], SaveOptions(chunk_bytes=2**20))
    _check_plan(plan)
    assert plan.ranks[0].arrays == () and not plan.ranks[0].sends
    ((chunk,),) = [a.chunks for a in plan.ranks[1].arrays]
    assert sorted((s.rank, s.piece, s.region) for s in chunk.sources) == [
        (1, 0, Box((2, 0), (4, 2))),
        (1, 1, Box((0, 0), (2, 2))),
    ]


# -- 5: refusals, before anything is claimed -----------------------------------------------------


def _st(
    rows: tuple[int, int],
    shape: tuple[int, ...] = (10, 4),
    dtype: torch.dtype = torch.float32,
    replica_id: int = 0,
) -> ShardedTensor:
    return ShardedTensor(
        torch.zeros(rows[1] - rows[0], *shape[1:], dtype=dtype), shape, (rows[0], 0), replica_id=replica_id
    )


def _fr(start: int, stop: int, rows: tuple[int, int] = (0, 10)) -> ShardedTensor:
    return ShardedTensor(
        torch.zeros(stop - start),
        (10, 4),
        (rows[0], 0),
        box_shape=(rows[1] - rows[0], 4),
        flat_range=(start, stop),
    )


def _obj(value: Any, grid: tuple[int, ...], cell: tuple[int, ...], replica_id: int = 0) -> ShardedObject:
    return ShardedObject(value, grid, cell, replica_id=replica_id)


def _rng(n: int) -> torch.Tensor:
    return torch.full((4,), n, dtype=torch.uint8)


REFUSALS: dict[str, tuple[list[dict[str, Any]], type[Exception], str]] = {
    "overlap": (
        [{"w": _st((0, 6))}, {"w": _st((4, 10))}],
        tessera.ShardingError,
        r"^w: the main copies of ranks \[0\] \(offset \[0, 0\], shape \[6, 4\]\) and ranks \[1\] "
        r"\(offset \[4, 0\], shape \[6, 4\]\) overlap",
    ),
    "same-box-twice": (
        [{"w": _st((0, 5))}, {"w": _st((5, 10))}, {"w": _st((0, 5))}],
        tessera.ShardingError,
        r"^w: box offset \[0, 0\] shape \[5, 4\] has more than one main copy \(ranks \[0, 2\]\)",
    ),
    "gap": (
        [{"w": _st((0, 4))}, {"w": _st((6, 10))}],
        tessera.ShardingError,
        r"^w: the main copies \(replica_id 0\) cover 32 of 40 .* offset \[4, 0\] of shape \[2, 4\] is held",
    ),
    "gap-held-only-by-a-replica": (
        [{"w": _st((0, 5))}, {"w": _st((5, 10), replica_id=1)}],
        tessera.ShardingError,
        r"^w: the main copies \(replica_id 0\) cover 20 of 40 ",
    ),
    "shapes-differ": (
        [{"w": _st((0, 5))}, {"w": _st((5, 10), shape=(10, 5))}],
        tessera.ShardingError,
        r"^w: ranks disagree: rank 0 holds a sharded tensor of float32 \[10, 4\] \(torch\), "
        r"rank 1 a sharded tensor of float32 \[10, 5\]",
    ),
    "dtypes-differ": (
        [{"w": _st((0, 5))}, {"w": _st((5, 10))}, {"w": _st((0, 5), dtype=torch.bfloat16, replica_id=1)}],
        tessera.ShardingError,
        r"^w: ranks disagree: rank 0 holds a sharded tensor of float32 .*rank 2 a sharded tensor of bfloat16",
    ),
    "sharded-and-plain": (
        [{"w": _st((0, 10))}, {"w": torch.zeros(10, 4)}],
        tessera.ShardingError,
        r"^w: ranks disagree: rank 0 holds a sharded tensor .*, rank 1 a tensor of float32 \[10, 4\]",
    ),
    "json-differs": (
        [{"step": 3}, {"step": 3}, {"step": 4}],
        tessera.ShardingError,
        r"^step: ranks 0 and 2 hold different values \(3 and 4\)",
    ),
    "json-int-vs-float": (
        [{"cfg": {"lr": 1}}, {"cfg": {"lr": 1.0}}],
        tessera.ShardingError,
        r"^cfg: ranks 0 and 1 hold different values",
    ),
    "json-and-array": (
        [{"x": torch.zeros(2)}, {"x": 5}],
        tessera.ShardingError,
        r"^x: rank 1 holds a JSON value where other ranks hold an array",
    ),
    "grid-missing-cell": (
        [{"rng": _obj(_rng(0), (3,), (0,))}, {"rng": _obj(_rng(1), (3,), (1,))}],
        tessera.ShardingError,
        r"^rng: 1 of the 3 cells of the sharded object's grid \[3\] have no main copy, e\.g\. cell \[2\]",
    ),
    "grid-cell-only-replicas": (
        [{"rng": _obj(_rng(0), (2,), (0,))}, {"rng": _obj(_rng(1), (2,), (1,), replica_id=1)}],
        tessera.ShardingError,
        r"^rng: 1 of the 2 cells .* e\.g\. cell \[1\]",
    ),
    "grid-two-mains": (
        [
            {"rng": _obj(_rng(0), (2,), (0,))},
            {"rng": _obj(_rng(1), (2,), (1,))},
            {"rng": _obj(_rng(0), (2,), (0,))},
        ],
        tessera.ShardingError,
        r"^rng: ranks 0 and 2 both hold the main copy of cell \[0\]",
    ),
    "grid-shapes-differ": (
        [{"rng": _obj(_rng(0), (2,), (0,))}, {"rng": _obj(_rng(1), (3,), (1,))}],
        tessera.ShardingError,
        r"^rng: ranks disagree on the grid of the sharded object: \[2\] and \[3\] \(rank 1\)",
    ),
    "json-grid-two-mains": (
        [
            {"seed": _obj(1, (1, 2), (0, 1))},
            {"seed": _obj(1, (1, 2), (0, 1))},
            {"seed": _obj(2, (1, 2), (0, 0))},
        ],
        tessera.ShardingError,
        r"^seed: ranks 0 and 1 both hold the main copy of cell \[0, 1\]",
    ),
    "json-grid-missing-cell": (
        [{"seed": _obj(1, (2, 2), (0, 0))}, {"seed": _obj(1, (2, 2), (1, 1))}],
        tessera.ShardingError,
        r"^seed: 2 of the 4 cells .* e\.g\. cell \[0, 1\]",
    ),
    "flat-overlap": (
        [{"f": _fr(0, 25)}, {"f": _fr(20, 40)}],
        tessera.ShardingError,
        r"^f: box offset \[0, 0\] shape \[10, 4\]: ranks 0 and 1 both hold flat elements \[20, 25\)",
    ),
    "flat-gap": (
        [{"f": _fr(0, 20)}, {"f": _fr(25, 40)}],
        tessera.ShardingError,
        r"^f: box offset \[0, 0\] shape \[10, 4\]: no rank holds flat elements \[20, 25\)",
    ),
    "flat-short": (
        [{"f": _fr(0, 20)}, {"f": _fr(20, 39)}],
        tessera.ShardingError,
        r"^f: box offset \[0, 0\] shape \[10, 4\]: no rank holds flat elements \[39, 40\)",
    ),
    "flat-and-whole-box": (
        [{"f": _fr(0, 40)}, {"f": _st((0, 10))}],
        tessera.ShardingError,
        r"^f: box offset \[0, 0\] shape \[10, 4\] has more than one main copy \(ranks \[0, 1\]\)",
    ),
    "flat-boxes-overlap": (
        [{"f": _fr(0, 24, (0, 6))}, {"f": _fr(0, 24, (4, 10))}],
        tessera.ShardingError,
        r"^f: the main copies of ranks \[0\] .* and ranks \[1\] .* overlap",
    ),
    "overlap-among-600-ranks": (  # past the first block of the vectorized check
        [{"w": ShardedTensor(torch.zeros(1, 2), (600, 2), (r, 0))} for r in range(599)]
        + [{"w": ShardedTensor(torch.zeros(2, 2), (600, 2), (3, 0))}],
        tessera.ShardingError,
        r"^w: the main copies of ranks \[3\] \(offset \[3, 0\], shape \[1, 2\]\) and ranks \[599\] "
        r"\(offset \[3, 0\], shape \[2, 2\]\) overlap",
    ),
    "case-collision": (
        [{"W": torch.zeros(1)}, {"w": torch.zeros(1)}],
        tessera.InvalidKeyError,
        r"keys W and w differ only in letter case",
    ),
    "unused-pickle-key": (  # a local check every rank passes, refused once all plans are in
        [{"w": torch.zeros(1)}, {"w": torch.zeros(1)}],
        tessera.InvalidKeyError,
        r"pickle_keys names keys the state dict lacks: \['nothing'\]",
    ),
}


def _coordinate(states: list[dict[str, Any]], path: Path, **options: Any) -> list[Any]:
    """The coordinator's first step (gather, check, plan, claim) on every rank's report, in this process:
    the instruction each rank would get."""
    from tessera.api.save import _coordinate as coordinate
    from tessera.api.save import _Report

    opts = SaveOptions(chunk_bytes=CHUNK_BYTES, **options)
    reports = []
    for state in states:
        local = make_local_plan(flatten(state), opts)
        reports.append(_Report.of(None, local.layout_digest(opts, len(states)), local, True))
    instructions, _ = coordinate(reports, opts, LocalStorage(path), None, None, None, len(states))
    return instructions


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_before_the_claim_R16_2_R16_7(tmp_path: Path, case: str) -> None:
    """Each bad layout is refused by the coordinator with an error naming the key (and the ranks that hold
    what is wrong), the same error for every rank, and the path is never created (R16.12)."""
    states, error, pattern = REFUSALS[case]
    path = tmp_path / "ck"
    instructions = _coordinate(states, path, pickle_keys=["nothing"] if case == "unused-pickle-key" else ())
    assert len(instructions) == len(states)
    errors = {(type(i.error), str(i.error)) for i in instructions}
    assert len(errors) == 1, errors
    ((kind, message),) = errors
    assert kind is error, message
    assert re.search(pattern, message), message
    assert all(i.rank_plan is None for i in instructions)
    assert not path.exists()


def test_the_same_layouts_pass_when_fixed(tmp_path: Path) -> None:
    """Control for the refusals: the coordinator plans and claims a good layout."""
    instructions = _coordinate(
        [{"w": _st((0, 6)), "step": 3}, {"w": _st((6, 10)), "step": 3}], tmp_path / "ck"
    )
    assert all(i.error is None and i.rank_plan is not None for i in instructions)
    assert sorted(os.listdir(tmp_path / "ck")) == [".tessera-claim.json"]


def test_shard_outside_the_global_tensor_R16_2() -> None:
    """Checked on the rank itself, before any collective."""
    with pytest.raises(tessera.ShardingError, match=r"global_offset=\[6, 0\]\).*lies outside"):
        ShardedTensor(torch.zeros(5, 4), (10, 4), (6, 0))
    with pytest.raises(tessera.ShardingError, match=r"flat_range \[30, 50\] needs .* within the box's 40"):
        ShardedTensor(torch.zeros(20), (10, 4), (0, 0), box_shape=(10, 4), flat_range=(30, 50))
    with pytest.raises(tessera.ShardingError, match=r"grid_offset \[2\] is not a cell of grid \[2\]"):
        ShardedObject(1, (2,), (2,))


def test_value_and_container_across_ranks_is_bad_sharding_R16_4(tmp_path: Path) -> None:
    """R16.4: the entries of all ranks together must satisfy R3.13; the coordinator refuses a violation
    (other than R4.8) with bad_sharding, naming the key and the ranks."""
    instructions = _coordinate([{"a": torch.zeros(2)}, {"a": {"b": torch.zeros(2)}}], tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert isinstance(instructions[0].error, tessera.ShardingError), repr(instructions[0].error)


def _refusal_rank(rank: int, world_size: int, root: Path) -> list[tuple[str, str]]:
    """Every rank runs each bad save, then a good one (the group is still in step), then that one again."""
    cases: dict[str, dict[str, Any]] = {
        "overlap": {
            "w": _st((0, 6) if rank == 0 else (4, 10) if rank == 1 else (0, 10), replica_id=rank // 2)
        },
        "json": {"step": 3 if rank < 2 else 4},
        "grid": {"rng": _obj(_rng(rank), (2,), (rank % 2,))},
        "local": {"w": torch.zeros(2), **({"bad": object()} if rank == 2 else {})},
    }
    out = []
    for name, state in cases.items():
        try:
            tessera.save(state, root / name, options=tessera.SaveOptions(chunk_bytes=CHUNK_BYTES))
            out.append(("saved", name))
        except tessera.TesseraError as exc:
            out.append((type(exc).__name__, str(exc)))
    tessera.save({"w": _st((0, 10), replica_id=rank)}, root / "ok")
    try:
        tessera.save({"w": _st((0, 10), replica_id=rank)}, root / "ok")
        out.append(("saved", "ok"))
    except tessera.TesseraError as exc:
        out.append((type(exc).__name__, str(exc)))
    return out


def test_every_rank_refuses_and_nothing_is_claimed_R16_7_R16_12(tmp_path: Path) -> None:
    results = run_ranks(3, _refusal_rank, tmp_path)
    expected = [
        (
            "overlap",
            "ShardingError",
            r"^w: the main copies of ranks \[(0|1)\] .* and ranks \[(1|0)\] .* overlap",
        ),
        ("json", "ShardingError", r"^step: ranks 0 and 2 hold different values \(3 and 4\)"),
        ("grid", "ShardingError", r"^rng: ranks 0 and 2 both hold the main copy of cell \[0\]"),
        ("local", "UnsafeEncodingError", r"^bad: a builtins\.object is neither"),
        ("ok", "CheckpointExistsError", r"already holds a committed checkpoint"),
    ]
    for i, (name, kind, pattern) in enumerate(expected):
        got = {r[i] for r in results}
        assert len(got) == 1, (name, got)  # the same error on every rank
        ((got_kind, message),) = got
        assert got_kind == kind and re.search(pattern, message), (name, got_kind, message)
        if name != "ok":
            assert not (tmp_path / name).exists(), name
    assert tessera.verify(tmp_path / "ok").ok


# -- 6: a rank that fails or dies before the commit ----------------------------------------------


def _replicated(step: int) -> dict[str, torch.Tensor]:
    """Four equal plain tensors held by every rank, several chunks each (so every rank writes chunks)."""
    return {f"p{i}": random_tensor("float32", (8, 4), seed=10 * step + i) for i in range(4)}


class _DiesAfterFirstChunk(StorageWrapper):
    """A rank's medium that takes the process down once it has written a chunk."""

    def wrap(self, inner: Storage) -> StorageWrapper:
        return _DiesAfterFirstChunk(inner)

    def write_file(self, path: str, buffers: Any) -> None:
        super().write_file(path, buffers)
        if "/c/" in path:
            os._exit(1)


def _failing_rank(rank: int, world_size: int, root: Path, log: Path) -> list[Any]:
    recording = RecordingStorage(LocalStorage(root))
    tessera.RunDirectory(recording).save(_replicated(1), step=1, options=tessera.SaveOptions(chunk_bytes=32))
    written = [c.path or "" for c in recording.ops("write_file")]
    (log / f"written-by-{rank}").write_text("\n".join(written))  # rank 1 will not return
    out: list[Any] = []
    faults = {
        2: FaultyStorage(LocalStorage(root)).fail_write(),  # every write: the disk is full
        3: _DiesAfterFirstChunk(LocalStorage(root)),
    }
    for step, fault in faults.items():
        run = tessera.RunDirectory(fault if rank == 1 else LocalStorage(root))
        try:
            run.save(_replicated(step), step=step, options=tessera.SaveOptions(chunk_bytes=32))
            out.append("saved")
        except tessera.TesseraError as exc:
            out.append(type(exc).__name__)
        (log / f"outcomes-of-{rank}").write_text(" ".join(out))
    return out


def test_a_rank_that_fails_or_dies_leaves_nothing_committed_R16_13_R16_16(tmp_path: Path) -> None:
    """Step 1 commits, each chunk written by exactly one rank, balanced. Step 2: rank 1's writes fail
    (StorageError there, collective_failed elsewhere). Step 3: rank 1 dies after its first chunk; rank 0
    raises collective_failed. Step 2 is removed by its coordinator (R9.7), step 3 stays uncommitted,
    latest still names step 1, which loads."""
    (tmp_path / "log").mkdir()
    results = run_ranks(
        3, _failing_rank, tmp_path / "run", tmp_path / "log", allow_death=True, collective_timeout_s=10
    )
    run = tessera.RunDirectory(tmp_path / "run")
    step1 = run.root / run.name_of(1)
    # R16.13 / R16.10 on step 1: every file once, by one rank; chunks spread evenly.
    logs = [(tmp_path / "log" / f"written-by-{r}").read_text().split("\n") for r in range(3)]
    written = [[p for p in log if not p.startswith("zarr.json.")] for log in logs]  # less the temporary root
    every = [p for paths in written for p in paths]
    on_disk = sorted(p.relative_to(step1).as_posix() for p in step1.rglob("*") if p.is_file())
    assert (
        sorted(every)
        == sorted(set(every))
        == [p for p in on_disk if p not in ("zarr.json", ".tessera-claim.json")]
    )
    chunks = [sum("/c/" in p for p in paths) for paths in written]
    assert sum(chunks) == 4 * 4 and max(chunks) - min(chunks) <= 1, chunks
    # Step 2: a rank raised while writing.
    assert results[1] == RankDied(1), "rank 1 died in step 3 (os._exit(1))"
    assert (tmp_path / "log" / "outcomes-of-1").read_text() == "StorageError", "its own error in step 2"
    assert results[0] == ["CollectiveError", "CollectiveError"]
    assert results[2] == ["CollectiveError", "CollectiveError"], results[2]
    # Step 2 failed with every rank alive: once all had reported, the coordinator removed what
    # the save wrote (R9.7). Step 3 lost a rank: nothing is removed, it stays uncommitted.
    assert not (run.root / run.name_of(2)).exists()
    with pytest.raises(tessera.UncommittedCheckpointError):
        tessera.open(run.root / run.name_of(3))
    assert any((run.root / run.name_of(3)).rglob("c/*")), "rank 1 wrote a chunk before it died"
    assert run.latest() == step1
    assert [(c.step, c.committed, c.latest) for c in run.checkpoints()] == [
        (1, True, True),
        (3, False, False),
    ]
    got = tessera.load(step1)
    for key, want in _replicated(1).items():
        assert_bit_equal(got[key], want)


# -- 7: the plan cache ---------------------------------------------------------------------------


def _cache_state(rank: int, world_size: int, layout: str, save: int) -> dict[str, Any]:
    """Layout "a": 10 rows over the ranks (uneven: pieces move); "b": 12 rows; "b!": "b" with a step that
    rank 2 gets wrong; "c": "b" and a tensor that rank 1 alone holds. Bytes and values change every save."""
    rows = 10 if layout == "a" else 12
    full = random_tensor("bfloat16", (rows, 3), seed=save)
    state: dict[str, Any] = {
        "w": _part(full, 0, world_size, rank),
        "plain": random_tensor("int64", (4,), seed=100 + save),
        "rng": ShardedObject(
            random_tensor("uint8", (8,), seed=200 + 10 * save + rank), (world_size,), (rank,)
        ),
        "step": save + (layout == "b!" and rank == 2),
        "sched": {"lr": 0.1 / (save + 1)},
    }
    if layout == "c" and rank == 1:
        state["extra"] = random_tensor("float32", (3,), seed=300 + save)
    return state


CACHE_SAVES = ["a", "a", "b", "b", "b!", "b", "c", "c"]
CACHE_HITS = [0, 1, 1, 2, 2, 3, 3, 4]
"""``cache.hits`` after each save."""


def _cache_rank(rank: int, world_size: int, root: Path) -> list[Any]:
    cache = PlanCache()
    out: list[Any] = []
    for save, layout in enumerate(CACHE_SAVES):
        try:
            tessera.save(
                _cache_state(rank, world_size, layout, save),
                root / f"s{save}",
                options=tessera.SaveOptions(chunk_bytes=8),
                plan_cache=cache,
                metadata={"save": save},
            )
        except tessera.ShardingError as exc:
            out.append(str(exc))
        out.append(cache.hits)
    return out


def test_plan_cache_reused_while_the_layout_holds_R16_3(tmp_path: Path) -> None:
    """Same layout: the next save reuses the plan on every rank and stores the new bytes and JSON values
    (and a value that differs across ranks is still refused). Changed shapes, or a new key on one rank
    other than the coordinator: every rank plans afresh (hits unchanged), and the plan is cached again."""
    results = run_ranks(3, _cache_rank, tmp_path)
    refused = "step: ranks 0 and 2 hold different values (4 and 5); a per-rank value is a ShardedObject"
    assert results == [[*CACHE_HITS[:4], refused, *CACHE_HITS[4:]]] * 3
    for save, layout in enumerate(CACHE_SAVES):
        if layout == "b!":
            assert not (tmp_path / f"s{save}").exists()
            continue
        ck = tessera.open(tmp_path / f"s{save}")
        states = [_cache_state(r, 3, layout, save) for r in range(3)]
        rows = 10 if layout == "a" else 12
        assert_bit_equal(ck.read("w"), random_tensor("bfloat16", (rows, 3), seed=save))
        assert_bit_equal(ck.read("plain"), states[0]["plain"])
        for r in range(3):
            assert_bit_equal(ck.read(f"rng/~{r}"), states[r]["rng"].value)
        assert ck.value("step") == save and ck.value("sched") == states[0]["sched"]
        assert ck.manifest.metadata == {"save": save}
        assert ("extra" in ck) == (layout == "c")
        if layout == "c":
            assert_bit_equal(ck.read("extra"), states[1]["extra"])
        assert tessera.verify(tmp_path / f"s{save}").ok
