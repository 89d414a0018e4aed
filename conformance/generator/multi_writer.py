"""Valid checkpoints saved by several real processes (spec §16), read whole as the global tensors.

Each world (4 ranks, then 2) is a fresh set of processes joined in a gloo
process group; every rank calls ``tessera.save`` with its own part of the
state (``ShardedTensor``: row and column shards, a 2-D TP x DP grid with
replicas, uneven splits, ZeRO-style flat ranges; ``ShardedObject``: per-rank
RNG states, loader positions), once per vector. The chunk grids are fixed so
that many chunks straddle the ranks' shards, and pieces must move between
ranks before a chunk is written. Whatever the world and the layout, a reader
must read the global tensors (R3.5, R16.1).

Ranks are forked from a forkserver that has imported torch and tessera once,
so a world starts in well under a second even on two cores.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tessera
import torch
import torch.distributed as dist
from tessera import ShardedObject, ShardedTensor

from . import identity
from .data import tensor
from .leaves import Key, Leaf, NonFinite
from .vector import VectorWriter

__all__ = ["build"]

_CONTEXT = mp.get_context("forkserver")
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch._dynamo", "numpy", "tessera"] + [
    "tessera.api.load",
    "tessera.api.run_dir",
    "tessera.api.verify",
]
"""What the forkserver imports once (``import tessera`` imports its API lazily, so the API modules
are named). The forkserver is one per process and the first start fixes its list, so this is the
list the test suite's ranks (tests/ranks.py) also ask for."""
_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class _Multi:
    """One multi-rank vector: what each rank holds, and the global state a read must return."""

    name: str
    world: int
    title: str
    rules: tuple[str, ...]
    state: Callable[[int, int], dict[str, Any]]
    """``state(rank, world)``: the rank's state dict."""
    leaves: Callable[[], Mapping[Key, Leaf]]
    """The global value of every stored key."""
    chunk_shapes: Mapping[str, list[int]] = field(default_factory=dict)
    parallelism: Mapping[str, Any] = field(default_factory=dict)
    regions: Mapping[str, tuple[Key, list[tuple[int, int]]]] = field(default_factory=dict)


# -- the states ------------------------------------------------------------------------------


def _mesh(rank: int) -> tuple[int, int]:
    """``(tp, dp)`` indices in a 2 x 2 mesh, tp fastest."""
    return rank % 2, rank // 2


def _box(
    full: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...], replica: int = 0
) -> ShardedTensor:
    """The box ``[offset, offset + shape)`` of ``full``, held as a shard."""
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    return ShardedTensor(full[index].clone(), tuple(full.shape), offset, replica_id=replica)


def _flat(
    full: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...], start: int, stop: int
) -> ShardedTensor:
    """Elements ``[start, stop)`` (C order) of the box ``[offset, offset + shape)`` of ``full``."""
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    local = full[index].reshape(-1)[start:stop].clone()
    return ShardedTensor(local, tuple(full.shape), offset, box_shape=shape, flat_range=(start, stop))


def _rows_globals() -> dict[Key, Leaf]:
    return {
        ("w",): tensor("float32", (8, 6), 200),
        ("b",): tensor("int64", (8,), 201),
        ("emb",): tensor("float16", (3, 2), 202),
        ("step",): 3,
    }


def _rows_state(rank: int, world: int) -> dict[str, Any]:
    g = _rows_globals()
    return {
        "w": _box(g["w",], (2 * rank, 0), (2, 6)),
        "b": _box(g["b",], (2 * rank,), (2,)),
        "emb": g["emb",],
        "step": 3,
    }


def _tp_dp_globals() -> dict[Key, Leaf]:
    return {
        ("layer", "w"): tensor("bfloat16", (4, 6), 210),
        ("layer", "b"): tensor("float16", (6,), 211),
        ("grid", "w"): tensor("float32", (4, 6), 212),
        ("norm",): tensor("float32", (6,), 213),
    }


def _tp_dp_state(rank: int, world: int) -> dict[str, Any]:
    g = _tp_dp_globals()
    tp, dp = _mesh(rank)
    return {
        "layer": {
            "w": _box(g["layer", "w"], (2 * tp, 0), (2, 6), replica=dp),
            "b": _box(g["layer", "b"], (3 * tp,), (3,), replica=dp),
        },
        "grid": {"w": _box(g["grid", "w"], (2 * tp, 3 * dp), (2, 3))},
        "norm": g["norm",],
    }


def _uneven_globals() -> dict[Key, Leaf]:
    return {
        ("u",): tensor("float32", (10, 3), 220),
        ("c",): tensor("int32", (3, 10), 221),
        ("few",): tensor("int64", (2, 4), 222),
    }


def _uneven_state(rank: int, world: int) -> dict[str, Any]:
    g = _uneven_globals()
    rows = [(0, 3), (3, 3), (6, 3), (9, 1)]  # torch.chunk of 10 rows over 4
    cols = [(0, 3), (3, 3), (6, 2), (8, 2)]  # torch.tensor_split of 10 columns over 4
    state: dict[str, Any] = {
        "u": _box(g["u",], (rows[rank][0], 0), (rows[rank][1], 3)),
        "c": _box(g["c",], (0, cols[rank][0]), (3, cols[rank][1])),
    }
    if rank < 2:  # two rows over four ranks: ranks 2 and 3 hold nothing of it
        state["few"] = _box(g["few",], (rank, 0), (1, 4))
    return state


_EXP_AVG = ("optimizer", "state", 0, "exp_avg")
_EXP_AVG_SQ = ("optimizer", "state", 0, "exp_avg_sq")
_PARAM_GROUPS = [{"lr": 0.001, "betas": [0.9, 0.95], "params": [0]}]


def _zero_globals() -> dict[Key, Leaf]:
    return {
        _EXP_AVG: tensor("float64", (7, 5), 230),
        _EXP_AVG_SQ: tensor("float32", (12, 4), 231),
        ("optimizer", "state", 0, "step"): tensor("float32", (), 232),
        ("optimizer", "param_groups"): _PARAM_GROUPS,
    }


def _zero_state(rank: int, world: int) -> dict[str, Any]:
    g = _zero_globals()
    ranges = [(0, 9), (9, 18), (18, 27), (27, 35)]  # one flat buffer of 35 elements, split unevenly
    tp, dp = _mesh(rank)
    box_ranges = [(0, 13), (13, 24)]  # each TP box of 6 x 4 split unevenly over dp
    state = {
        "exp_avg": _flat(g[_EXP_AVG], (0, 0), (7, 5), *ranges[rank]),
        "exp_avg_sq": _flat(g[_EXP_AVG_SQ], (6 * tp, 0), (6, 4), *box_ranges[dp]),
        "step": g["optimizer", "state", 0, "step"],
    }
    return {"optimizer": {"state": {0: state}, "param_groups": _PARAM_GROUPS}}


def _rng_bytes(rank: int) -> bytes:
    return bytes((rank * 37 + i * 11) % 256 for i in range(8))


def _objects_globals() -> dict[Key, Leaf]:
    found: dict[Key, Leaf] = {("rng", r): _rng_bytes(r) for r in range(4)}
    for dp, tp in ((0, 0), (0, 1), (1, 0), (1, 1)):
        found["loader", dp, tp] = {"epoch": 1, "index": 10 * (2 * dp + tp)}
    found.update({("gen", tp): tensor("uint8", (4,), 240 + tp) for tp in (0, 1)})
    return found


def _objects_state(rank: int, world: int) -> dict[str, Any]:
    tp, dp = _mesh(rank)
    return {
        "rng": ShardedObject(_rng_bytes(rank), (4,), (rank,)),
        "loader": ShardedObject({"epoch": 1, "index": 10 * rank}, (2, 2), (dp, tp)),
        "gen": ShardedObject(tensor("uint8", (4,), 240 + tp), (2,), (tp,), replica_id=dp),
    }


def _cols_globals() -> dict[Key, Leaf]:
    return {
        ("w",): tensor("float16", (4, 10), 250),
        ("v",): tensor("uint8", (5,), 251),
        ("scale",): NonFinite("Infinity"),
    }


def _cols_state(rank: int, world: int) -> dict[str, Any]:
    g = _cols_globals()
    cols, items = [(0, 6), (6, 4)][rank], [(0, 3), (3, 2)][rank]
    return {
        "w": _box(g["w",], (0, cols[0]), (4, cols[1])),
        "v": _box(g["v",], (items[0],), (items[1],)),
        "scale": float("inf"),
    }


_SHARDS = ("R16.1", "R16.2", "R16.3", "R3.5")
_VECTORS = {
    v.name: v
    for v in (
        _Multi("multi-rows", 4, "row shards over 4 ranks, in chunks that straddle them; a replicated "
               "tensor and value", _SHARDS, _rows_state, _rows_globals, {"w": [3, 6], "b": [8]},
               regions={"region-across-shards": (("w",), [(1, 7), (2, 5)])}),
        _Multi("multi-tp-dp", 4, "a 2 x 2 TP x DP mesh: TP shards replicated over DP, and a 2-D grid of "
               "boxes", (*_SHARDS, "R16.4"), _tp_dp_state, _tp_dp_globals, {"grid/w": [4, 2]},
               parallelism={"tp": 2, "dp": 2}),
        _Multi("multi-uneven", 4, "uneven splits: rows 3, 3, 3, 1; columns 3, 3, 2, 2; a tensor that two "
               "of the four ranks do not hold", _SHARDS, _uneven_state, _uneven_globals,
               {"u": [4, 3], "c": [3, 4], "few": [1, 4]}),
        _Multi("multi-zero", 4, "ZeRO-style flat ranges of optimizer state at uneven offsets, also within "
               "TP boxes; chunks gather pieces from several ranks", (*_SHARDS, "R16.6", "R16.9"),
               _zero_state, _zero_globals,
               {"optimizer/state/~0/exp_avg": [2, 5], "optimizer/state/~0/exp_avg_sq": [4, 4]},
               parallelism={"tp": 2, "dp": 2}),
        _Multi("multi-objects", 4, "sharded objects: per-rank RNG bytes (rng/~r), a 2 x 2 grid of loader "
               "positions, a grid of tensors with replicas", ("R16.5", "R16.1", "R3.5"), _objects_state,
               _objects_globals, parallelism={"tp": 2, "dp": 2}),
        _Multi("multi-cols", 2, "uneven column shards over 2 ranks (6 + 4 columns), chunks across both; "
               "a plain non-finite float", _SHARDS, _cols_state, _cols_globals, {"w": [4, 4], "v": [5]}),
    )
}  # fmt: skip


# -- the ranks -------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, staging: str, names: list[str]) -> None:
    """One rank: join the group, save every vector of this world, leave without interpreter teardown
    (gloo at times aborts a process at exit after a save, though the save succeeded)."""
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=dt.timedelta(seconds=_TIMEOUT_S),
        )
        for name in names:
            spec = _VECTORS[name]
            tessera.save(
                spec.state(rank, world),
                Path(staging) / name,
                options=tessera.SaveOptions(chunk_shapes=spec.chunk_shapes, threads=1),
                parallelism=spec.parallelism,
            )
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _save_world(world: int, names: list[str], staging: Path) -> None:
    """Save the vectors ``names`` from ``world`` fresh processes; raise if any rank fails."""
    _CONTEXT.set_forkserver_preload(_PRELOAD)
    port = _free_port()
    procs = [
        _CONTEXT.Process(target=_rank_main, args=(rank, world, port, str(staging), names), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(_TIMEOUT_S)
    failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if failed:
        raise RuntimeError(f"multi-rank save of {names} failed: (rank, exit code) {failed}")


def build(out: Path) -> None:
    """Write every vector of this module under ``out/valid``."""
    with tempfile.TemporaryDirectory(prefix="tessera-vectors-") as staging:
        for world in sorted({v.world for v in _VECTORS.values()}, reverse=True):
            _save_world(world, [v.name for v in _VECTORS.values() if v.world == world], Path(staging))
        for spec in _VECTORS.values():
            v = VectorWriter(out, "valid", spec.name)
            shutil.move(Path(staging) / spec.name, v.checkpoint)
            identity.fix(v.checkpoint, f"valid/{spec.name}")
            v.adopt(spec.leaves())
            probes = [v.read()]
            probes += [
                v.read(name, [(key, box)], rules=["R14.2"], features=["regions"])
                for name, (key, box) in spec.regions.items()
            ]
            v.finish(f"{spec.world} ranks: {spec.title}", spec.rules, [*probes, v.verify()])
