"""DTensor values as boxes (tessera.state.dtensor), on real gloo ranks with the placements torch makes.

On every rank each box must hold ``full[box]`` and be a view into the DTensor's own memory (a write to it
shows in ``to_local()``); across the ranks the main copies (``replica_id == 0``) must cover every element
of the global tensor exactly once, and all copies together as many times as the tensor is replicated.
A world takes seconds (each rank imports torch.distributed.tensor, and torch._dynamo at its first
collective), so each world runs once for the module and returns every case's outcome, an error included,
for the tests to judge one by one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import cast

import numpy as np
import pytest
import torch
from tessera.errors import ShardingError
from tessera.state.dtensor import _shard_steps, is_dtensor, sharded_from_dtensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import _StridedShard

from .ranks import run_ranks

Box = tuple[tuple[int, ...], tuple[int, ...], int]
"""A box as (global offset, shape, replica_id)."""

Outcome = tuple[tuple[int, ...], int, str, list[Box]] | str
"""One rank's result for one tensor: (global shape, copies, placements, boxes), or the error it met."""

UNBUILT = "torch cannot build this DTensor: "

CASES_2X2: dict[str, tuple[tuple[int, ...], list[Placement]]] = {
    "shard-shard": ((5, 7), [Shard(0), Shard(1)]),
    "shard-shard-same-dim": ((5, 7), [Shard(0), Shard(0)]),
    "replicate-shard": ((5, 7), [Replicate(), Shard(0)]),
    "shard-replicate": ((5, 7), [Shard(1), Replicate()]),
    "replicate-replicate": ((5, 7), [Replicate(), Replicate()]),
    "scalar": ((), [Replicate(), Replicate()]),
    "some-ranks-empty": ((3, 1, 4), [Shard(1), Shard(2)]),
    # FSDP2 + TP: the TP shard (right) splits first, FSDP's shard splits its part.
    "fsdp-tp-uneven": ((10, 6), [_StridedShard(0, split_factor=2), Shard(0)]),
    # Split factors that match no shard order (torch 2.13 builds these, 2.11 refuses them): rows from
    # several places of the tensor, so several boxes.
    "strided-shard-other-dim": ((10, 6), [_StridedShard(0, split_factor=2), Shard(1)]),
    "strided-replicate": ((10, 6), [_StridedShard(0, split_factor=3), Replicate()]),
    "strided-after-shard": ((9, 2), [Shard(0), _StridedShard(0, split_factor=2)]),
}

CASES_3: dict[str, tuple[tuple[int, ...], list[Placement]]] = {
    "uneven": ((10, 2), [Shard(0)]),
    "last-rank-empty": ((2, 3), [Shard(0)]),
    "uneven-dim-1": ((3, 7), [Shard(1)]),
    "replicate-3": ((4,), [Replicate()]),
}

MODELS: dict[str, tuple[tuple[int, int], list[int]]] = {
    "even": ((2, 2), [6, 10, 6]),
    "uneven": ((2, 2), [5, 7, 5]),
    # 7 rows on dp=3 x tp=2: FSDP2 puts row 6 on (dp 2, tp 1); placements read left to right say (2, 0).
    "dp3-tp2": ((3, 2), [3, 7, 3]),
}


def _boxes(value: DTensor, full: torch.Tensor) -> list[Box]:
    """This rank's boxes of ``value``, each checked against ``full`` and against the DTensor's memory."""
    if value.device_mesh.get_coordinate() is not None:
        assert torch.equal(value.full_tensor(), full), "torch itself disagrees with the reference tensor"
    before = value.to_local().clone()
    storage = value.to_local().untyped_storage().data_ptr()
    boxes = []
    for piece in sharded_from_dtensor(value):
        local = piece.local
        assert isinstance(local, torch.Tensor)
        expected = full[piece.box.relative_to((0,) * full.ndim)]
        assert torch.equal(local, expected), f"box {piece.box} holds the wrong values"
        assert local.untyped_storage().data_ptr() == storage, f"box {piece.box} is a copy"
        local.add_(1)
        boxes.append((piece.box.offset, piece.box.shape, piece.replica_id))
    assert torch.equal(value.to_local(), before + 1), "the boxes must cover to_local() once, in place"
    return boxes


def _outcome(make: Callable[[], tuple[DTensor, torch.Tensor]]) -> Outcome:
    try:
        value, full = make()
    except ValueError as exc:  # torch 2.11 refuses _StridedShard placements that match no shard order
        return f"{UNBUILT}{exc}"
    try:
        mesh = value.device_mesh
        copies = math.prod(mesh.size(i) for i, p in enumerate(value.placements) if p.is_replicate())
        return tuple(full.shape), copies, str(value.placements), _boxes(value, full)
    except Exception as exc:  # reported per case by the parent
        return f"{type(exc).__name__}: {exc}"


def _distributed(
    mesh: DeviceMesh, shape: tuple[int, ...], placements: list[Placement]
) -> tuple[DTensor, torch.Tensor]:
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    if not any(isinstance(p, _StridedShard) for p in placements):
        return distribute_tensor(full, mesh, placements), full
    # distribute_tensor scatters _StridedShard parts as if even and fails on uneven ones; redistribute splits.
    return distribute_tensor(full, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, placements), full


def _with_full(value: DTensor) -> tuple[DTensor, torch.Tensor]:
    return value, value.full_tensor()


def _model_outcomes(mesh_shape: tuple[int, int], sizes: list[int]) -> dict[str, Outcome]:
    """A model's own state_dict after ``parallelize_module`` and ``fully_shard`` (with ``_StridedShard``)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(), torch.nn.Linear(sizes[1], sizes[2])
    )
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return {key: _outcome(functools.partial(_with_full, value)) for key, value in model.state_dict().items()}


def _world_2x2(rank: int, world_size: int) -> dict[str, Outcome]:
    mesh = init_device_mesh("cpu", (2, 2))
    outcomes = {
        name: _outcome(functools.partial(_distributed, mesh, *case)) for name, case in CASES_2X2.items()
    }
    for name in ("even", "uneven"):
        outcomes |= {f"{name}/{key}": o for key, o in _model_outcomes(*MODELS[name]).items()}
    return outcomes


def _world_3(rank: int, world_size: int) -> dict[str, Outcome]:
    mesh = init_device_mesh("cpu", (3,))
    outcomes = {
        name: _outcome(functools.partial(_distributed, mesh, *case)) for name, case in CASES_3.items()
    }
    outcomes["outside"] = _outcome(
        functools.partial(_distributed, DeviceMesh("cpu", [0, 1]), (6,), [Shard(0)])
    )
    partial = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    outcomes["is_dtensor"] = f"{is_dtensor(partial)} {is_dtensor(partial.to_local())}"
    try:
        sharded_from_dtensor(partial)
        outcomes["partial"] = "accepted"
    except ShardingError as exc:
        outcomes["partial"] = str(exc)
    return outcomes


def _world_3x2(rank: int, world_size: int) -> dict[str, Outcome]:
    outcomes = {f"dp3-tp2/{key}": o for key, o in _model_outcomes(*MODELS["dp3-tp2"]).items()}
    mesh = init_device_mesh("cpu", (3, 2))
    placements: list[Placement] = [_StridedShard(0, split_factor=2), Shard(0)]
    outcomes["redistributed"] = _outcome(functools.partial(_distributed, mesh, (7, 2), placements))
    return outcomes


def _by_case(per_rank: list[dict[str, Outcome]]) -> dict[str, list[Outcome]]:
    return {name: [outcomes[name] for outcomes in per_rank] for name in per_rank[0]}


@pytest.fixture(scope="module")
def world_2x2() -> dict[str, list[Outcome]]:
    return _by_case(run_ranks(4, _world_2x2))


@pytest.fixture(scope="module")
def world_3() -> dict[str, list[Outcome]]:
    return _by_case(run_ranks(3, _world_3))


@pytest.fixture(scope="module")
def world_3x2() -> dict[str, list[Outcome]]:
    return _by_case(run_ranks(6, _world_3x2))


def _assert_covered(per_rank: list[Outcome]) -> list[list[Box]]:
    """Every rank's boxes passed its own checks; main copies cover once, all copies ``copies`` times."""
    errors = [f"rank {rank}: {o}" for rank, o in enumerate(per_rank) if isinstance(o, str)]
    assert not errors, "\n".join(errors)
    results = [o for o in per_rank if not isinstance(o, str)]
    shape, copies, _, _ = results[0]
    main = np.zeros(shape, dtype=np.int64)
    every = np.zeros(shape, dtype=np.int64)
    for _, _, _, boxes in results:
        for offset, box_shape, replica_id in boxes:
            region = tuple(slice(o, o + s) for o, s in zip(offset, box_shape, strict=True))
            every[region] += 1
            if replica_id == 0:
                main[region] += 1
    assert (main == 1).all(), f"main copies cover the elements this many times:\n{main}"
    assert (every == copies).all(), f"all copies cover the elements this many times:\n{every}"
    return [boxes for _, _, _, boxes in results]


@pytest.mark.parametrize("name", CASES_2X2)
def test_placements_on_a_2x2_mesh(world_2x2: dict[str, list[Outcome]], name: str) -> None:
    if name.startswith("strided") and all(str(o).startswith(UNBUILT) for o in world_2x2[name]):
        pytest.skip(f"{world_2x2[name][0]} (torch {torch.__version__})")
    boxes = _assert_covered(world_2x2[name])
    if name.startswith("strided"):
        assert max(len(b) for b in boxes) > 1, "expected a rank holding several boxes"
    if name.endswith("empty"):
        assert [] in boxes, "expected a rank holding nothing"


@pytest.mark.parametrize("name", CASES_3)
def test_placements_on_3_ranks(world_3: dict[str, list[Outcome]], name: str) -> None:
    boxes = _assert_covered(world_3[name])
    if name.endswith("empty"):
        assert boxes[2] == []


@pytest.mark.parametrize("model", MODELS)
def test_fsdp2_over_tensor_parallel(request: pytest.FixtureRequest, model: str) -> None:
    world = request.getfixturevalue("world_3x2" if MODELS[model][0] == (3, 2) else "world_2x2")
    entries = {name: o for name, o in world.items() if name.startswith(f"{model}/")}
    assert len(entries) == 4, entries
    for name, per_rank in entries.items():
        _assert_covered(per_rank)
        if name.endswith("0.weight"):
            assert "_StridedShard" in str(per_rank[0][2]), per_rank[0][2]


def test_strided_shard_is_read_in_shard_order(world_3x2: dict[str, list[Outcome]]) -> None:
    """``redistribute`` lays out ``(_StridedShard(0, sf=2), Shard(0))`` as FSDP2 does: tp first, then dp."""
    boxes = _assert_covered(world_3x2["redistributed"])
    assert boxes[4:] == [[], [((6, 0), (1, 2), 0)]]


def test_rank_outside_the_mesh_holds_nothing(world_3: dict[str, list[Outcome]]) -> None:
    boxes = _assert_covered(world_3["outside"])
    assert boxes[2] == [] and boxes[0] and boxes[1]


def test_partial_is_refused(world_3: dict[str, list[Outcome]]) -> None:
    for message in world_3["partial"]:
        assert "unreduced partial values; reduce them first" in str(message)


def test_is_dtensor(world_3: dict[str, list[Outcome]]) -> None:
    assert world_3["is_dtensor"] == ["True False"] * 3
    assert not is_dtensor(torch.ones(2)) and not is_dtensor(np.ones(2)) and not is_dtensor(None)


class _Sizes:
    """The one thing shard orders need of a mesh: its dimensions' sizes."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes

    def size(self, mesh_dim: int) -> int:
        return self.sizes[mesh_dim]


ORDERS: list[tuple[tuple[int, ...], list[Placement]]] = [
    ((3, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    ((4, 3, 2), [_StridedShard(0, split_factor=2), _StridedShard(0, split_factor=2), Shard(0)]),
    ((2, 3, 2), [_StridedShard(0, split_factor=6), Shard(0), Shard(0)]),
    ((2, 2, 2), [_StridedShard(1, split_factor=2), Shard(0), Shard(1)]),
    ((2, 2, 2), [Shard(1), Replicate(), Shard(1)]),
    ((2, 2), [_StridedShard(0, split_factor=2), Shard(1)]),
    ((2, 2), [Shard(0), _StridedShard(0, split_factor=2)]),
]


@pytest.mark.parametrize(("sizes", "placements"), ORDERS, ids=str)
def test_shard_order_is_decoded_as_torch_does(sizes: tuple[int, ...], placements: list[Placement]) -> None:
    """The order in which shards split a dimension, against torch's own decoding of ``_StridedShard``."""
    decode = getattr(DTensorSpec, "_maybe_convert_StridedShard_to_shard_order", None)
    if decode is None:
        pytest.skip(f"torch {torch.__version__} has no shard orders")
    mesh = cast(DeviceMesh, _Sizes(sizes))
    steps = _shard_steps(placements, mesh)
    order = decode(tuple(placements), mesh)
    if order is None:  # left to right, with the split factors
        assert [(dim, mesh_dim) for dim, mesh_dim, _ in steps] == [
            (p.dim, m) for m, p in enumerate(placements) if isinstance(p, Shard | _StridedShard)
        ]
        assert any(split_factor > 1 for _, _, split_factor in steps)
    else:
        assert {entry.tensor_dim: list(entry.mesh_dims) for entry in order} == {
            dim: [m for d, m, _ in steps if d == dim] for dim, _, _ in steps
        }
        assert all(split_factor == 1 for _, _, split_factor in steps)
