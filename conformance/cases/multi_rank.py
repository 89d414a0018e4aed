"""Multi-rank cases: several backend processes write one checkpoint together (spec §16).

Each case says what every rank holds (a :class:`Layout`): tensors whole (replicas), one shard of a
tensor (a box or a flat range of one, with a replica id), or one cell of a sharded object. Every rank
gets its own ``write`` at once, with the same rendezvous (P13); the checkpoint they leave must hold
the global state in the merged order of R16.8 and pass every check of a single-process write. The
refusals (overlap, gap, disagreement) must fail on every rank and leave the root untouched (R16.7).

Cases of one world size follow each other, so that the session keeps its rank processes; every world
is small, so that the profile runs in seconds. ``Case.data`` holds ``arrays`` (tensor and object
entries of the checkpoint), ``expect_error`` (the code rank 0 must give, or ``None``) and ``world_size``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks.expected import ExpectedCheckpoint, Key
from ..protocol.connection import Backend
from .model import Case, Level, Outcome, Requirements, Session
from .state import Blob, Inputs, Leaf, State, Tensor, Value
from .writes import expect_refused, expect_written, timeout_for, write_request

__all__ = ["cases"]


@dataclass(frozen=True, slots=True)
class Shard:
    """A box of a global tensor, or the flat range ``[start, stop)`` of one in C order (spec R16.2)."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    replica: int = 0
    flat_range: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        box: dict[str, Any] = {
            "offset": list(self.offset),
            "shape": list(self.shape),
            "replica": self.replica,
        }
        if self.flat_range is not None:
            box["flat_range"] = list(self.flat_range)
        return box


@dataclass(frozen=True, slots=True)
class Cell:
    """A rank's cell of a sharded object's grid (spec R16.5)."""

    grid: tuple[int, ...]
    offset: tuple[int, ...]
    replica: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.grid), "offset": list(self.offset), "replica": self.replica}


@dataclass(frozen=True, slots=True)
class Held:
    """One key as one rank holds it: the leaf whole (a replica), one shard of it, or a grid cell."""

    leaf: Leaf
    shard: Shard | None = None
    cell: Cell | None = None


@dataclass(frozen=True, slots=True)
class Layout:
    """What every rank holds, each rank's keys in its own state-dict order."""

    ranks: tuple[tuple[Held, ...], ...]
    lists: tuple[Key, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    def stored(self) -> list[tuple[Key, Leaf]]:
        """The entries of the checkpoint in merged order (spec R16.8): rank 0's keys in its order, then
        each later rank's new ones; a sharded object's main cells together, in C order of their offsets."""
        cells: dict[Key, dict[tuple[int, ...], Leaf]] = {}
        for held in itertools.chain.from_iterable(self.ranks):
            if held.cell is not None and held.cell.replica == 0:
                cells.setdefault(held.leaf.key, {})[held.cell.offset] = held.leaf
        stored: dict[Key, Leaf] = {}
        for held in itertools.chain.from_iterable(self.ranks):
            if held.cell is None:
                stored.setdefault(held.leaf.key, held.leaf)
            else:
                for offset, leaf in sorted(cells[held.leaf.key].items()):
                    stored.setdefault((*held.leaf.key, *offset), leaf)
        return list(stored.items())

    @property
    def contents(self) -> State:
        """The stored leaves as one state (their number, size and data types), keys aside."""
        return State(tuple(leaf for _, leaf in self.stored()))

    def requirements(self) -> Requirements:
        held = State(tuple(h.leaf for h in itertools.chain.from_iterable(self.ranks)))
        return Requirements(
            frozenset({"writer"}), held.dtypes, held.features | {"multi_rank"}, subprocess=True
        )


def cases() -> list[Case]:
    return [
        _written(
            "row-shards",
            "row shards on 4 ranks",
            ("R16.2", "R16.3", "R16.8", "R16.1"),
            _by_rank(
                _split(Tensor(("model", "w"), "float32", (8, 6)), 0, [2, 2, 2, 2]),
                _split(Tensor(("model", "embed"), "bfloat16", (12, 4), seed=1), 0, [3, 3, 3, 3]),
            ),
        ),
        _written(
            "tp-dp-replicas",
            "a 2 x 2 layout: shards along tensor parallelism, copies (replica > 0) along data parallelism",
            ("R16.3", "R16.10", "R16.2"),
            _tp_dp(),
        ),
        _written(
            "uneven",
            "uneven row splits (3, 3, 2, 2), and empty boxes on the ranks a short tensor leaves without rows",
            ("R16.2", "R16.3", "R16.9"),
            _by_rank(
                _split(Tensor(("uneven",), "float32", (10, 5)), 0, [3, 3, 2, 2]),
                _split(Tensor(("few",), "int64", (2, 4), seed=1), 0, [1, 1, 0, 0]),
            ),
        ),
        _written(
            "flat-ranges",
            "ZeRO-style flat ranges at odd offsets, of a whole tensor and of tensor-parallel boxes; "
            "chunks straddle the ranges, so pieces move between ranks",
            ("R16.2", "R16.6", "R16.9", "R16.11"),
            _flat_ranges(),
        ),
        _written(
            "plain-replicas",
            "plain tensors every rank holds whole, a 0-d one and two in a list among them: each written once",
            ("R16.4", "R16.10", "R3.8"),
            Layout(
                tuple(
                    (
                        Held(Tensor(("plain",), "int8", (5, 3))),
                        Held(Tensor(("scale",), "bfloat16", (), seed=1)),
                        Held(Tensor(("layers", 0), "float32", (4,), seed=2)),
                        Held(Tensor(("layers", 1), "uint8", (3,), seed=3)),
                    )
                    for _ in range(4)
                ),
                lists=(("layers",),),
            ),
        ),
        _written(
            "sharded-objects",
            "per-rank bytes, JSON values and uint8 tensors at grid cells, copies of cells among them",
            ("R16.5", "R8.4", "R4.2"),
            _sharded_objects(),
        ),
        _written(
            "json-values",
            "JSON and float values, equal on every rank, and metadata",
            ("R16.4", "R16.8", "R3.6"),
            Layout(
                tuple(
                    (
                        Held(Value(("step",), 100)),
                        Held(Value(("config",), {"lr": 0.001, "betas": [0.9, 0.95], "name": "run"})),
                        shard,
                        Held(Value(("loss_scale",), "Infinity", "float")),
                    )
                    for shard in _split(Tensor(("w",), "float32", (4, 2)), 0, [1, 1, 1, 1])
                ),
                metadata={"step": 100, "tokens": 123456789},
            ),
        ),
        _written(
            "partial-keys",
            "keys that only some ranks hold, merged in rank order",
            ("R16.8", "R3.9", "R16.4"),
            _partial_keys(),
        ),
        # World size 2 from here on.
        _written(
            "column-shards",
            "column shards on 2 ranks, even and uneven",
            ("R16.2", "R16.9"),
            _by_rank(
                _split(Tensor(("cols",), "int32", (5, 8)), 1, [4, 4]),
                _split(Tensor(("wide",), "float16", (3, 10), seed=1), 1, [6, 4]),
            ),
        ),
        _refused(
            "overlap",
            "main copies that overlap (rows 0-3 and 2-5)",
            ("R16.3", "R16.7"),
            _per_rank([_rows(_OVERLAP, 0, 3)], [_rows(_OVERLAP, 2, 5)]),
        ),
        _refused(
            "gap",
            "main copies that leave a gap (rows 0-2 and 3-5)",
            ("R16.3", "R16.7"),
            _per_rank([_rows(_OVERLAP, 0, 2)], [_rows(_OVERLAP, 3, 5)]),
        ),
        _refused(
            "shape-disagree",
            "ranks that hold one key with different shapes",
            ("R16.4", "R16.7"),
            _per_rank([Held(Tensor(("w",), "float32", (3,)))], [Held(Tensor(("w",), "float32", (4,)))]),
        ),
        _refused(
            "value-disagree",
            "ranks that hold one JSON value with different values",
            ("R16.4", "R16.7"),
            _per_rank([Held(Value(("step",), 1))], [Held(Value(("step",), 2))]),
        ),
    ]


_OVERLAP = Tensor(("w",), "float32", (5, 4))


def _by_rank(*columns: Sequence[Held]) -> Layout:
    """A layout from one column per key: ``columns[k][r]`` is what rank ``r`` holds of key ``k``."""
    return Layout(tuple(zip(*columns, strict=True)))


def _per_rank(*ranks: Sequence[Held]) -> Layout:
    """A layout from one row per rank: ``ranks[r]`` is what rank ``r`` holds, in its order."""
    return Layout(tuple(tuple(held) for held in ranks))


def _split(tensor: Tensor, dim: int, sizes: Sequence[int], replica: int = 0) -> list[Held]:
    """Consecutive boxes of ``tensor`` along ``dim``, of ``sizes``, one per rank."""
    starts = [0, *itertools.accumulate(sizes)]
    return [_box(tensor, dim, start, size, replica) for start, size in zip(starts, sizes, strict=False)]


def _rows(tensor: Tensor, start: int, stop: int) -> Held:
    return _box(tensor, 0, start, stop - start)


def _box(tensor: Tensor, dim: int, start: int, size: int, replica: int = 0) -> Held:
    offset = tuple(start if d == dim else 0 for d in range(len(tensor.shape)))
    shape = tuple(size if d == dim else n for d, n in enumerate(tensor.shape))
    return Held(tensor, Shard(offset, shape, replica))


def _tp_dp() -> Layout:
    """Ranks ``r = 2 * dp + tp``: each tensor split along ``tp``, copied along ``dp`` (replica = dp)."""
    qkv = Tensor(("model", "qkv"), "float16", (6, 8))
    proj = Tensor(("model", "proj"), "float32", (4, 6), seed=1)
    scale = Tensor(("model", "scale"), "float32", (), seed=2)
    return Layout(
        tuple(
            (
                _split(qkv, 0, [3, 3], replica=rank // 2)[rank % 2],
                _split(proj, 1, [3, 3], replica=rank // 2)[rank % 2],
                Held(scale, Shard((), (), replica=rank)),  # one main copy of a 0-d tensor, three copies
            )
            for rank in range(4)
        )
    )


def _flat_ranges() -> Layout:
    """A tensor in flat ranges over 4 ranks, and 2 TP boxes each in flat ranges over 2 DP ranks."""
    whole = Tensor(("optim", "exp_avg"), "float64", (7, 5), chunk_shape=(2, 5))
    boxed = Tensor(("optim", "exp_avg_sq"), "float32", (12, 4), seed=1, chunk_shape=(4, 4))
    bounds = [0, 9, 20, 27, 35]
    return Layout(
        tuple(
            (
                Held(whole, Shard((0, 0), (7, 5), 0, (bounds[rank], bounds[rank + 1]))),
                Held(boxed, Shard((6 * (rank % 2), 0), (6, 4), 0, ((0, 11), (11, 24))[rank // 2])),
            )
            for rank in range(4)
        )
    )


def _sharded_objects() -> Layout:
    """Rank ``r``: RNG bytes at cell ``(r,)``, a loader position at ``(r // 2, r % 2)``, and a torch RNG
    state (uint8 tensor) at cell ``(r % 2,)`` of which ranks 2 and 3 hold copies."""
    return Layout(
        tuple(
            (
                Held(Blob(("rng",), bytes([rank]) * (10 + rank)), cell=Cell((4,), (rank,))),
                Held(
                    Value(("loader",), {"epoch": 1, "index": 10 * rank}),
                    cell=Cell((2, 2), (rank // 2, rank % 2)),
                ),
                Held(
                    Tensor(("torch_rng",), "uint8", (16,), seed=rank % 2),
                    cell=Cell((2,), (rank % 2,), replica=rank // 2),
                ),
            )
            for rank in range(4)
        )
    )


def _partial_keys() -> Layout:
    """Rank 0 holds one key; ranks 1 and 3 share a sharded tensor; ranks 1 and 2 hold keys of their own."""
    shared = Tensor(("model", "w"), "float32", (4, 4))
    common = Held(Value(("common",), "all"))
    top, bottom = _split(shared, 0, [2, 2])
    return Layout(
        (
            (common,),
            (top, Held(Value(("note",), "rank 1 only")), common),
            (Held(Tensor(("extra", "r2"), "float32", (3,), seed=1)), common),
            (bottom, common),
        )
    )


def _written(name: str, title: str, rules: tuple[str, ...], layout: Layout) -> Case:
    """A case whose ranks must write ``layout`` as one checkpoint."""

    def run(session: Session) -> Outcome:
        backends, inputs, root, requests = _start(session, layout)
        honours = "chunk_shapes" in session.claims.features
        expected = ExpectedCheckpoint(
            tuple(inputs.expected(leaf, honours, key) for key, leaf in layout.stored()),
            layout.lists,
            layout.metadata,
            world_size=len(layout.ranks),
        )
        timeout_s = timeout_for(backends[0], layout.contents.nbytes, layout.contents.arrays)
        return expect_written(backends, requests, root, expected, rules[0], timeout_s)

    return _case(name, title, rules, layout, run, None)


def _refused(name: str, title: str, rules: tuple[str, ...], layout: Layout) -> Case:
    """A case whose ranks must all refuse to write ``layout`` and leave the root as it was (R16.7)."""

    def run(session: Session) -> Outcome:
        backends, _, root, requests = _start(session, layout)
        timeout_s = timeout_for(backends[0], layout.contents.nbytes, layout.contents.arrays)
        return expect_refused(backends, requests, root, "bad_sharding", rules[0], "R16.7", timeout_s)

    return _case(f"refuse/{name}", f"refuses {title} (bad_sharding)", rules, layout, run, "bad_sharding")


def _start(session: Session, layout: Layout) -> tuple[list[Backend], Inputs, Path, list[dict[str, Any]]]:
    """The rank processes, the inputs, the (empty) root and each rank's request."""
    world_size = len(layout.ranks)
    backends = session.ranks(world_size)
    scratch = session.scratch()
    inputs = Inputs(scratch / "data")
    root = scratch / "checkpoint"
    root.mkdir()
    rendezvous = {"host": "127.0.0.1", "port": session.free_port()}
    requests = [
        write_request(
            root,
            [inputs.entry(h.leaf, **_placement(h)) for h in held],
            layout.lists,
            layout.metadata,
            None,
            rank=rank,
            world_size=world_size,
            rendezvous=rendezvous,
        )
        for rank, held in enumerate(layout.ranks)
    ]
    return backends, inputs, root, requests


def _placement(held: Held) -> dict[str, Any]:
    """The request members that say which part of the key the rank holds (P13)."""
    if held.shard is not None:
        return {"shards": [held.shard.to_json()]}
    if held.cell is not None:
        return {"grid": held.cell.to_json()}
    return {}


def _case(
    name: str,
    title: str,
    rules: tuple[str, ...],
    layout: Layout,
    run: Callable[[Session], Outcome],
    expect_error: str | None,
) -> Case:
    return Case(
        f"multi-rank/{name}",
        "multi-rank",
        title,
        rules,
        Level.MUST,
        run,
        layout.requirements(),
        {"arrays": layout.contents.arrays, "expect_error": expect_error, "world_size": len(layout.ranks)},
    )
