"""The manifest's entries of one save: the plan's arrays plus this save's JSON values.

JSON values (step, config, learning rate) change from save to save while the
arrays' layout does not, so they are merged here, after a fresh or a cached
global plan: a value held by several ranks must be equal on all of them, a
key cannot be a value on one rank and an array on another, and every cell of
a sharded object's grid must have exactly one main copy (spec R16.2, R16.6).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence

from ..errors import InvalidKeyError, ShardingError
from ..format.keys import Key, key_to_path, parent_paths, path_to_key
from ..format.manifest import Entry, ValueEntry
from ..format.tuples import split_tuples
from .global_plan import GlobalPlan
from .local_plan import Cell, LeafSpec

__all__ = ["manifest_contents"]


def manifest_contents(
    plan: GlobalPlan,
    values: Sequence[Sequence[LeafSpec]],
    orders: Sequence[Sequence[str]],
    lists: Sequence[Sequence[Key]],
    tuples: Sequence[Sequence[Key]],
) -> tuple[tuple[Entry, ...], tuple[Key, ...], tuple[Key, ...]]:
    """Every entry in merged state-dict order (R16.8), the list keys, and those of tuples (R3.8).

    A container is a tuple if any rank held it as one: ranks that hold a list and a tuple at
    one key differ only in a type the reader's template decides anyway (R8.8)."""
    merged: dict[str, ValueEntry] = {}
    holder: dict[str, int] = {}
    cells: list[tuple[Cell, int]] = list(plan.cells)
    for rank, specs in enumerate(values):
        for spec in specs:
            path = spec.path
            if path in plan.entries:
                raise ShardingError(f"{path}: rank {rank} holds a JSON value where other ranks hold an array")
            if spec.cell is not None:
                cells.append((spec.cell, rank))
                if not spec.cell.main:
                    continue  # a copy of a cell is not stored, whatever it holds (R16.5)
            entry = _value_entry(spec)
            if path in merged:
                if _canonical(merged[path]) != _canonical(entry):
                    raise ShardingError(
                        f"{path}: ranks {holder[path]} and {rank} hold different values "
                        f"({merged[path].value!r} and {spec.value!r}); a per-rank value is a ShardedObject"
                    )
            else:
                merged[path], holder[path] = entry, rank
    _check_cells(cells)
    order = _merged_order(orders, cells)
    _check_no_value_holds_keys(order)
    entries: tuple[Entry, ...] = tuple(plan.entries[p] if p in plan.entries else merged[p] for p in order)
    _check_case_collisions(list(order))
    return (
        entries,
        tuple(dict.fromkeys(k for keys in lists for k in keys)),
        tuple(dict.fromkeys(k for keys in tuples for k in keys)),
    )


def _value_entry(spec: LeafSpec) -> ValueEntry:
    """The manifest's entry of a JSON leaf: tuples spelled as arrays, their positions listed (R3.22)."""
    if spec.tag == "float":
        return ValueEntry(spec.key, spec.value, "float")
    value, positions = split_tuples(spec.value)
    return ValueEntry(spec.key, value, "json", positions)


def _merged_order(orders: Sequence[Sequence[str]], cells: list[tuple[Cell, int]]) -> dict[str, int]:
    """Each path with the lowest rank listing it: rank 0's paths in its order, then each later
    rank's new ones; a sharded object's main cells together, in C order, where it first appears."""
    grid_of: dict[str, str] = {}
    cells_of: dict[str, dict[tuple[int, ...], str]] = {}
    for cell, _ in cells:
        if cell.main:
            path = key_to_path((*path_to_key(cell.grid_path), *cell.offset))
            grid_of[path] = cell.grid_path
            cells_of.setdefault(cell.grid_path, {})[cell.offset] = path
    order: dict[str, int] = {}
    for rank, paths in enumerate(orders):
        for path in paths:
            grid = grid_of.get(path)
            if grid is None:
                order.setdefault(path, rank)
            elif path not in order:
                for offset in sorted(cells_of[grid]):
                    order.setdefault(cells_of[grid][offset], rank)
    return order


def _check_no_value_holds_keys(order: dict[str, int]) -> None:
    """A key is a stored value or a container of keys, on every rank alike (R3.13, R16.4)."""
    for path, rank in order.items():
        for prefix in parent_paths(path):
            if prefix in order:
                raise ShardingError(
                    f"{prefix}: rank {order[prefix]} stores a value at this key, and rank {rank} "
                    f"stores {path} under it"
                )


def _canonical(entry: ValueEntry) -> str:
    """JSON equality that tells 1, 1.0 and true apart."""
    return entry.encoding + json.dumps([entry.value, entry.tuples], sort_keys=True)


def _check_cells(cells: list[tuple[Cell, int]]) -> None:
    grids: dict[str, tuple[tuple[int, ...], dict[tuple[int, ...], int]]] = {}
    for cell, rank in cells:
        shape, mains = grids.setdefault(cell.grid_path, (cell.grid_shape, {}))
        if cell.grid_shape != shape:
            raise ShardingError(
                f"{cell.grid_path}: ranks disagree on the grid of the sharded object: "
                f"{list(shape)} and {list(cell.grid_shape)} (rank {rank})"
            )
        if cell.main:
            if cell.offset in mains:
                raise ShardingError(
                    f"{cell.grid_path}: ranks {mains[cell.offset]} and {rank} both hold "
                    f"the main copy of cell "
                    f"{list(cell.offset)}; give copies a nonzero replica_id"
                )
            mains[cell.offset] = rank
    for path, (shape, mains) in grids.items():
        if len(mains) != math.prod(shape):
            missing = next(o for o in _cells_of(shape) if o not in mains)
            raise ShardingError(
                f"{path}: {math.prod(shape) - len(mains)} of the {math.prod(shape)} cells of the sharded "
                f"object's grid {list(shape)} have no main copy, e.g. cell {list(missing)}"
            )


def _cells_of(shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    return itertools.product(*(range(n) for n in shape))


def _check_case_collisions(paths: list[str]) -> None:
    """Refuse a path or a group on its way that equals another ignoring case (spec R4.8)."""
    folded: dict[str, str] = {}
    for path in paths:
        for prefix in [*parent_paths(path), path]:
            other = folded.setdefault(prefix.lower(), prefix)
            if other != prefix:
                raise InvalidKeyError(
                    f"keys {other} and {prefix} differ only in letter case; "
                    "they would collide on case-insensitive file systems"
                )
