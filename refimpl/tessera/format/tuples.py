"""Tuples inside a JSON value (spec R3.22, format 1.2): JSON has arrays only, so a ``value``
entry lists the positions of its arrays that were tuples, and a reader rebuilds them.

A position is the path from the value's root to an array: an integer steps into an array
element, a string into an object member; ``[]`` is the value itself. Writers list positions in
the order a depth-first walk meets them (an array before the arrays it holds).
"""

from __future__ import annotations

from typing import Any

from ..errors import InconsistentCheckpointError

__all__ = ["Position", "check_positions", "join_tuples", "split_tuples"]

Position = tuple[int | str, ...]


def split_tuples(value: Any) -> tuple[Any, tuple[Position, ...]]:
    """``value`` as JSON spells it (every tuple a list), and the positions of its tuples.

    ``value`` is a JSON subtree (spec R8.1), so its depth is what the writer's strict JSON
    bounds; a namedtuple is a tuple here (its field names are not kept)."""
    positions: list[Position] = []
    return _split(value, (), positions), tuple(positions)


def _split(node: Any, at: Position, positions: list[Position]) -> Any:
    if isinstance(node, tuple):
        positions.append(at)
    if isinstance(node, (list, tuple)):
        return [_split(child, (*at, i), positions) for i, child in enumerate(node)]
    if isinstance(node, dict):
        return {k: _split(child, (*at, k), positions) for k, child in node.items()}
    return node


def check_positions(value: Any, positions: tuple[Position, ...], where: str) -> None:
    """Refuse (``inconsistent``) a position that does not address an array of ``value``."""
    for position in positions:
        node = value
        for depth, step in enumerate(position):
            in_list = isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node)
            if in_list or (isinstance(step, str) and isinstance(node, dict) and step in node):
                node = node[step]
            else:
                raise InconsistentCheckpointError(
                    f"{where}: tuples lists position {list(position)[:20]}, but the value holds "
                    f"no {'element' if isinstance(step, int) else 'member'} {step!r} at "
                    f"{list(position[:depth])[:20]}; the manifest was damaged or badly written"
                )
        if not isinstance(node, list):
            raise InconsistentCheckpointError(
                f"{where}: tuples lists position {list(position)[:20]}, which holds a "
                f"{type(node).__name__}, not an array; the manifest was damaged or badly written"
            )


def join_tuples(value: Any, positions: tuple[Position, ...]) -> Any:
    """A copy of ``value`` (already checked by :func:`check_positions`) with the arrays at
    ``positions`` rebuilt as tuples; ``value`` itself is left as it is (the manifest's)."""
    if not positions:
        return value
    return _join(value, (), frozenset(positions))


def _join(node: Any, at: Position, tuples: frozenset[Position]) -> Any:
    if isinstance(node, list):
        items = [_join(child, (*at, i), tuples) for i, child in enumerate(node)]
        return tuple(items) if at in tuples else items
    if isinstance(node, dict):
        return {k: _join(child, (*at, k), tuples) for k, child in node.items()}
    return node
