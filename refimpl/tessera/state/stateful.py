"""Objects that save and restore themselves through ``state_dict()`` / ``load_state_dict()``.

A model, an optimizer, an LR scheduler or a user's object is not a value the
format can hold, but each gives its state as a nested state dict and takes it
back. As PyTorch DCP does, such a value is saved as its ``state_dict()``,
flattened like any other subtree, and loaded in place: its own ``state_dict()``
is the template (tensors that share storage with the object, such as a module's
parameters, are filled where they are), then its ``load_state_dict`` receives
what was read. The object itself is never replaced in the caller's state dict.

Who calls what: :func:`tessera.state.flatten.flatten` and the host snapshot of
``save_async`` call :func:`state_of` on every value they walk; ``load`` calls
:func:`swap_stateful` on its template before matching keys, reads everything
into the swapped tree, and only then calls the returned :class:`Restore`, which
hands each object its state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from ..errors import TensorMismatchError, TesseraError
from ..format.keys import Key, format_key

__all__ = ["Restore", "Stateful", "is_stateful", "state_of", "swap_stateful"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with callable ``state_dict()`` and ``load_state_dict(state)``: ``torch.nn.Module``,
    ``torch.optim.Optimizer``, LR schedulers, samplers, your own objects.

    ``state_dict()`` returns the object's state as a nested state dict (tensors, arrays, JSON
    values); ``load_state_dict`` takes the same structure back. Containers come back as the
    object's own ``state_dict()`` had them when loading into it (tuples stay tuples)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


Restore = Callable[[Any], Any]
"""Takes the loaded counterpart of a swapped node; returns the node to keep in its place."""


def is_stateful(value: Any) -> bool:
    """Whether ``value`` is saved through its ``state_dict()``.

    The methods are looked up on the type, as Python looks up special methods: it is quick
    for the many tensors a state dict holds, and a class (whose methods are unbound) is not
    taken for an instance."""
    cls = type(value)
    return callable(getattr(cls, "state_dict", None)) and callable(getattr(cls, "load_state_dict", None))


def state_of(value: Any) -> Any:
    """What a save stores for ``value``: its ``state_dict()`` if it is :class:`Stateful`, else itself."""
    return value.state_dict() if is_stateful(value) else value


def swap_stateful(node: Any, key: Key = ()) -> tuple[Any, Restore | None]:
    """``node`` (a load's template) with every :class:`Stateful` in it replaced by its
    ``state_dict()``, and the function that puts the loaded state back; ``(node, None)`` when
    it holds none.

    Only the containers on the way to a stateful object are copied, so the rest of the template
    is loaded into as before. The restore call, made once every tensor is filled and every value
    read, gives each object its loaded state dict (inner objects first), writes the other loaded
    values back into the caller's containers and returns the caller's template, objects kept.
    What an object's ``load_state_dict`` refuses is raised as :class:`TensorMismatchError`
    naming its key (``key`` is the prefix of ``node``'s keys).
    """
    if is_stateful(node):
        state, inner = swap_stateful(node.state_dict(), key)

        def restore_object(loaded: Any) -> Any:
            try:
                node.load_state_dict(inner(loaded) if inner is not None else loaded)
            except TesseraError:
                raise
            except Exception as exc:
                name = type(node).__qualname__
                raise TensorMismatchError(
                    f"{format_key(key) if key else 'the template'}: {name}.load_state_dict refused the "
                    f"stored state ({type(exc).__name__}: {exc}); the checkpoint holds the state of a "
                    f"differently configured {name}"
                ) from exc
            return node

        return state, restore_object
    if isinstance(node, Mapping):
        items = list(node.items())
    elif isinstance(node, (list, tuple)):
        items = list(enumerate(node))
    else:
        return node, None
    swaps = {k: swap_stateful(v, (*key, k)) for k, v in items}
    if all(restore is None for _, restore in swaps.values()):
        return node, None
    children = {k: swapped for k, (swapped, _) in swaps.items()}
    # A list stands for a tuple too: the loaded values are assigned into the copy.
    copy: Any = children if isinstance(node, Mapping) else [children[i] for i in range(len(items))]

    def restore_container(loaded: Any) -> Any:
        values = {k: restore(loaded[k]) if restore else loaded[k] for k, (_, restore) in swaps.items()}
        return _written_back(node, values)

    return copy, restore_container


def _written_back(node: Any, values: dict[Any, Any]) -> Any:
    """``node`` holding ``values``: updated in place where it is mutable, rebuilt if it is a tuple."""
    changed = {k: v for k, v in values.items() if node[k] is not v}
    if not changed:
        return node
    if isinstance(node, tuple):
        items = [values[i] for i in range(len(node))]
        return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
    for k, v in changed.items():
        node[k] = v
    return node
