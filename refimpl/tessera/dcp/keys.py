"""Between DCP's flat keys and Tessera's nested keys.

DCP flattens a state dict into dotted keys (``optim.state.fc.weight.exp_avg``)
and keeps each key's path of dict keys (strings) and list positions (ints);
Tessera keys are those same paths. A writer rebuilds each rank's nested state
from the paths, so that ``tessera.save`` stores it exactly as it would the
user's dict (a JSON subtree such as ``param_groups`` becomes one JSON entry).
A reader walks each stored JSON value the way DCP walks the state dict it
loads into, so that every key DCP asks for exists (``param_groups.0.lr``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import InvalidKeyError
from ..format.keys import Key, KeyComponent

__all__ = ["dcp_key", "json_leaves", "nest", "value_at"]


def dcp_key(path: Sequence[KeyComponent]) -> str:
    """DCP's flat key of a path (``torch.distributed.checkpoint._nested_dict.flatten_state_dict``)."""
    return ".".join(map(str, path))


def nest(leaves: Sequence[tuple[Key, Any]]) -> dict[str, Any]:
    """A nested state dict of ``(path, value)`` leaves; an int-keyed level that holds positions
    ``0..n-1`` becomes a list (as it was in the user's state), any other stays a dict."""
    root: dict[Any, Any] = {}
    for path, value in leaves:
        node = root
        for component in path[:-1]:
            child = node.setdefault(component, {})
            if not isinstance(child, dict):
                raise InvalidKeyError(f"{dcp_key(path)}: a value is stored at a prefix of this key")
            node = child
        if path[-1] in node:
            raise InvalidKeyError(f"{dcp_key(path)}: two values have this key")
        node[path[-1]] = value
    return _with_lists(root)


def _with_lists(node: dict[Any, Any]) -> Any:
    for k, v in node.items():
        if isinstance(v, dict):
            node[k] = _with_lists(v)
    if node and all(type(k) is int for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node


def json_leaves(path: Key, value: Any) -> Iterator[tuple[str, Key]]:
    """The DCP keys of a stored JSON value and each one's path inside the value.

    DCP (``_traverse.traverse_state_dict``) walks mappings, and lists that hold a mapping
    somewhere below; any other value (a list of numbers, a tuple, a string) is one leaf."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            for key, inner in json_leaves((*path, str(k)), v):
                yield key, (str(k), *inner)
    elif isinstance(value, list) and not _is_terminal(value):
        for i, v in enumerate(value):
            for key, inner in json_leaves((*path, i), v):
                yield key, (i, *inner)
    else:
        yield dcp_key(path), ()


def _is_terminal(value: list[Any]) -> bool:
    return not any(isinstance(v, Mapping) or (isinstance(v, list) and not _is_terminal(v)) for v in value)


def value_at(value: Any, inner: Key) -> Any:
    """The part of a JSON value at ``inner``, a path that :func:`json_leaves` gave."""
    for component in inner:
        value = value[component]
    return value
