"""PyTorch ``DTensor`` values as :class:`ShardedTensor` boxes, so a model's ``state_dict()`` saves as it is.

The planner works on boxes of global tensors (:mod:`tessera.state.boxes`): it checks that the main
copies cover every tensor exactly once, spreads the writing over the replicas and cuts boxes into chunks.
A DTensor describes its part by placements over a device mesh instead; this module turns this rank's part
into boxes. ``Shard`` and ``Replicate`` give one box, or none where an uneven split leaves the rank empty;
a ``_StridedShard`` may hold indices from several places of the global tensor, which gives several boxes.
Each box's ``local`` is a view into ``to_local()``, never a copy: a load fills these views in place and
so writes straight into the DTensor's memory.

The boxes come from the placements themselves, not from torch's private
``compute_local_shape_and_global_offset``, which has changed between releases and, in torch 2.13,
disagrees with the data that FSDP2 and ``redistribute`` lay out for unevenly split ``_StridedShard``
tensors. For each tensor dimension we follow the list of global indices this rank holds through the
shards in the order they apply, each one a ``torch.chunk`` split (chunks of ``ceil(n / k)``, so trailing
ranks may get fewer or none). FSDP2 over tensor parallelism gives ``(_StridedShard(d, sf), Shard(d))``:
the tensor-parallel shard on the right applies first and FSDP's shard then splits its part; torch reads
the split factors this way too (``DTensorSpec._maybe_convert_StridedShard_to_shard_order``). Where the
split factors do not match such an order (torch 2.13 allows that, 2.11 refuses it), a
``_StridedShard(d, sf)`` applies left to right as torch's ``_StridedShard._split_tensor`` does: split
into ``sf`` parts, take this rank's chunk of every part, so the rank holds several runs of indices.
"""

from __future__ import annotations

import itertools
import operator
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ShardingError
from .sharded import ShardedTensor

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Placement

__all__ = ["is_dtensor", "sharded_from_dtensor"]


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor``.

    Imports nothing: no DTensor can exist before ``torch.distributed.tensor`` is loaded, so a process that
    never loaded it (or a torch built without distributed support) pays no import and gets ``False``.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def sharded_from_dtensor(t: DTensor) -> list[ShardedTensor]:
    """This rank's part of ``t`` as boxes of the global tensor, each with a view into ``t.to_local()``.

    Handles ``Shard`` (uneven splits too), ``Replicate`` and ``_StridedShard`` placements. ``replica_id``
    is this rank's linear index over the mesh dimensions placed ``Replicate``, so exactly one of the ranks
    holding the same data has 0. A rank outside the mesh, or one whose part is empty, gets ``[]``.
    Raises :class:`ShardingError` for a ``Partial`` placement (unreduced values: reduce them first), and
    where ``to_local()`` does not have the shape that the placements give.
    """
    from torch.distributed.tensor import Replicate

    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return []
    shape = tuple(int(s) for s in t.shape)
    where = f"DTensor of shape {list(shape)} with placements {tuple(t.placements)}"
    replica_id = 0
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            replica_id = replica_id * mesh.size(mesh_dim) + coordinate[mesh_dim]
        elif placement.is_partial():
            raise ShardingError(
                f"{where}: mesh dimension {mesh_dim} holds unreduced partial values; reduce them first "
                "(t.redistribute(placements=...) with Replicate() or Shard() there, or t.full_tensor())"
            )
        elif _shard_of(placement) is None:
            raise ShardingError(f"{where}: placement {placement!r} is not supported")
    # Per tensor dimension, the global indices held, in local order, as runs (ranges of step 1).
    held = [[range(n)] for n in shape]
    for dim, mesh_dim, split_factor in _shard_steps(t.placements, mesh):
        count, index = mesh.size(mesh_dim), coordinate[mesh_dim]
        parts = [_chunk(held[dim], split_factor, part) for part in range(split_factor)]
        held[dim] = [run for part in parts for run in _chunk(part, count, index)]
    local = t.to_local()
    local_shape = [sum(len(run) for run in runs) for runs in held]
    if tuple(local.shape) != tuple(local_shape):
        raise ShardingError(
            f"{where}: the placements give a local shape of {local_shape} on mesh coordinate "
            f"{list(coordinate)}, but to_local() has shape {list(local.shape)}"
        )
    if any(a.stop > b.start for runs in held for a, b in itertools.pairwise(runs)):
        raise ShardingError(f"{where}: the local tensor does not hold its indices in global order")
    pieces = []
    for box in itertools.product(*(_runs_at(runs) for runs in held)):
        view = local[tuple(slice(first, first + len(run)) for run, first in box)]
        pieces.append(ShardedTensor(view, shape, tuple(run.start for run, _ in box), replica_id=replica_id))
    return pieces


def _shard_of(placement: Placement) -> tuple[int, int] | None:
    """(tensor dim, split factor) of a ``Shard`` (factor 1) or ``_StridedShard``; ``None`` for others."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    # _StridedShard subclasses Shard in some torch releases: test it first.
    if isinstance(placement, _StridedShard):
        return placement.dim, int(placement.split_factor)
    return (placement.dim, 1) if isinstance(placement, Shard) else None


def _shard_steps(placements: Sequence[Placement], mesh: DeviceMesh) -> list[tuple[int, int, int]]:
    """The shards as (tensor dim, mesh dim, split factor), in the order they split the index lists.

    As torch decodes ``_StridedShard``: right to left, a shard with split factor ``sf`` goes after the
    shards of its tensor dimension already placed whose mesh sizes multiply to ``sf``, and then splits
    plainly. Where no such place exists, the shards apply left to right with their split factors.
    """
    shards = [
        (mesh_dim, *shard) for mesh_dim, p in enumerate(placements) if (shard := _shard_of(p)) is not None
    ]
    orders: dict[int, list[int]] = {}
    for mesh_dim, dim, split_factor in reversed(shards):
        order = orders.setdefault(dim, [])
        sizes = itertools.accumulate((mesh.size(m) for m in order), operator.mul, initial=1)
        position = next((i for i, product in enumerate(sizes) if product == split_factor), None)
        if position is None:
            return [(dim, mesh_dim, split_factor) for mesh_dim, dim, split_factor in shards]
        order.insert(position, mesh_dim)
    return [(dim, mesh_dim, 1) for dim, order in orders.items() for mesh_dim in order]


def _chunk(runs: list[range], count: int, index: int) -> list[range]:
    """Chunk ``index`` of the indices in ``runs`` split into ``count`` as ``torch.chunk`` does: chunks of
    ``ceil(n / count)``, so the last ones may be shorter or empty."""
    size = -(-sum(len(run) for run in runs) // count)
    start, stop = index * size, (index + 1) * size
    chunk = []
    for run in runs:
        if start < len(run) and stop > 0:
            chunk.append(run[max(start, 0) : stop])
        start, stop = start - len(run), stop - len(run)
    return chunk


def _runs_at(runs: list[range]) -> list[tuple[range, int]]:
    """``runs`` with the ones that abut merged, each with its first position in the local tensor."""
    merged: list[tuple[range, int]] = []
    position = 0
    for run in runs:
        if merged and merged[-1][0].stop == run.start:
            merged[-1] = (range(merged[-1][0].start, run.stop), merged[-1][1])
        elif run:
            merged.append((run, position))
        position += len(run)
    return merged
