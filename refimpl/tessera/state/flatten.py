"""Nested state dicts to keyed leaves and back (spec §8).

A state dict nests dicts (string or integer keys), lists and tuples; a
:class:`~tessera.state.stateful.Stateful` value (a module, an optimizer) stands
for its ``state_dict()``, walked like any other subtree. Any
subtree that is plain JSON (string-keyed dicts, lists, tuples, strings, ints,
finite floats, bools, None) is one leaf, stored inline in the manifest; other
containers are walked, and the keys of those that were lists or tuples are
recorded so that the reader rebuilds lists (or tuples) rather than integer-keyed
dicts. Tuples inside a JSON leaf are the manifest's business (:mod:`tessera.format.tuples`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidKeyError
from ..format.keys import Key, KeyComponent, format_key
from .stateful import is_stateful, state_of

__all__ = ["Flattened", "flatten", "unflatten", "is_json"]


@dataclass(frozen=True, slots=True)
class Flattened:
    leaves: list[tuple[Key, Any]]
    """Every leaf with its key, in the state dict's order."""
    lists: list[Key]
    """Keys of walked containers that were lists or tuples."""
    tuples: list[Key]
    """The keys of ``lists`` whose containers were tuples (a namedtuple is a tuple)."""


def is_json(value: Any) -> bool:
    """Whether ``value`` is a subtree that strict JSON holds exactly (up to tuple -> list)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if node is None or isinstance(node, (str, bool, int)):
            continue
        if isinstance(node, float):
            if not math.isfinite(node):
                return False
            continue
        if isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, dict) and all(type(k) is str for k in node):
            stack.extend(node.values())
        else:
            return False
    return True


def check_state_dict(state_dict: object) -> None:
    """Refuse, as the caller's mistake (``TypeError``), a state dict that is not a mapping.

    ``save`` calls it before its first collective step, so every rank raises it at once rather
    than reporting it through the others as a failed save."""
    if not isinstance(state_dict, Mapping):
        name = type(state_dict).__name__
        hint = f" (a {name} goes in one: {{'model': model}})" if is_stateful(state_dict) else ""
        raise TypeError(f"a state dict must be a dict (a Mapping), got {name}{hint}")


def flatten(state_dict: Mapping[Any, Any]) -> Flattened:
    """Split a state dict into leaves; a top-level JSON subtree is still one leaf per top key."""
    check_state_dict(state_dict)
    leaves: list[tuple[Key, Any]] = []
    lists: list[Key] = []
    tuples: list[Key] = []
    _walk(state_dict, (), leaves, lists, tuples)
    return Flattened(leaves, lists, tuples)


def _children(
    container: Mapping[Any, Any] | list[Any] | tuple[Any, ...],
) -> Iterable[tuple[KeyComponent, Any]]:
    if isinstance(container, Mapping):
        return container.items()
    return enumerate(container)


def _walk(
    container: Mapping[Any, Any] | list[Any] | tuple[Any, ...],
    prefix: Key,
    leaves: list[tuple[Key, Any]],
    lists: list[Key],
    tuples: list[Key],
) -> None:
    for component, value in _children(container):
        key = (*prefix, component)
        value = state_of(value)
        if isinstance(value, (Mapping, list, tuple)) and not is_json(value):
            if isinstance(value, (list, tuple)):
                lists.append(key)
            if isinstance(value, tuple):
                tuples.append(key)
            _walk(value, key, leaves, lists, tuples)
        else:
            leaves.append((key, value))


def unflatten(
    leaves: Iterable[tuple[Key, Any]], lists: Iterable[Key], tuples: Iterable[Key] = ()
) -> dict[Any, Any]:
    """Rebuild the nested state dict from keyed leaves (the inverse of :func:`flatten`): the
    containers at ``lists`` as lists, those also at ``tuples`` as tuples."""
    root: dict[Any, Any] = {}
    for key, value in leaves:
        node = root
        for component in key[:-1]:
            child = node.setdefault(component, {})
            if not isinstance(child, dict):
                raise InvalidKeyError(f"key {format_key(key)} lies under a stored value")
            node = child
        node[key[-1]] = value
    as_tuple = set(tuples)
    for key in sorted(set(lists), key=len, reverse=True):
        _to_list(root, key, key in as_tuple)
    return root


def _to_list(root: dict[Any, Any], key: Key, as_tuple: bool) -> None:
    """Turn the integer-keyed dict at ``key`` into a list or a tuple (indices must be 0..n-1).

    Deeper keys are converted first, so every ancestor is still a dict here; a
    container that a partial load left out is skipped.
    """
    parent: Any = root
    for component in key[:-1]:
        parent = parent.get(component) if isinstance(parent, dict) else None
    node = parent.get(key[-1]) if isinstance(parent, dict) else None
    # A hostile manifest may list a container whose keys mix strings and ints: no list then.
    if not isinstance(node, dict) or not all(type(k) is int for k in node):
        return
    if sorted(node) == list(range(len(node))):
        items = [node[i] for i in range(len(node))]
        parent[key[-1]] = tuple(items) if as_tuple else items
