"""A Lightning checkpoint dict to a Tessera state dict and back, with no pickle.

Tessera stores tensors, arrays, bytes, JSON values, lists and tuples, under dict keys that are
non-empty strings or ints (spec §4). A Lightning checkpoint holds a little more: callback state
keyed by strings such as ``"ModelCheckpoint{'monitor': None, ...}"`` (fine once escaped, unless
too long), ``OrderedDict`` model state with its ``_metadata`` (module versions that
``load_state_dict`` reads), ``AttributeDict`` hyper-parameters, ``torch.Size``, enums, numpy
scalars. :func:`encode` turns each of those into what Tessera stores plus a *note*, a JSON
object at the value's key, and :func:`decode` applies the notes after loading so that Lightning
gets back the types it wrote. Notes travel in the manifest's metadata (``NOTES``), never in a
file of their own.

A value with no such encoding (a class object, a ``functools.partial`` in the hyper-parameters)
is an :class:`~tessera.UnsafeEncodingError` naming its key, unless the caller opted in to pickle
(then the key goes to ``SaveOptions.pickle_keys``, and loading needs the same opt-in).
"""

from __future__ import annotations

import enum
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import InconsistentCheckpointError, InvalidKeyError, UnsafeEncodingError
from ..format.keys import Key, format_key, key_to_path

__all__ = ["Encoded", "NOTES", "decode", "encode"]

NOTES = "tessera.lightning"
"""The manifest metadata member holding ``{"version": 1, "notes": [[key, note], ...]}``."""

_NOTES_VERSION = 1
_PICKLE_HINT = "TesseraCheckpointIO(allow_pickle=True)"


@dataclass
class Encoded:
    """What :func:`encode` made of a checkpoint dict."""

    state: dict[Any, Any]
    """The state dict for ``tessera.save``."""
    notes: list[list[Any]] = field(default_factory=list)
    """``[key as a JSON list, note]`` for each value whose type Tessera does not keep."""
    pickle_paths: list[str] = field(default_factory=list)
    """Paths of values to pickle (only when the caller opted in)."""

    def metadata(self) -> dict[str, Any]:
        return {NOTES: {"version": _NOTES_VERSION, "notes": self.notes}}


def encode(checkpoint: Mapping[Any, Any], *, allow_pickle: bool = False) -> Encoded:
    """The checkpoint as a Tessera state dict; raises :class:`UnsafeEncodingError` naming the
    first key whose value has no encoding (when ``allow_pickle`` is off)."""
    _register_attribute_dict()
    out = Encoded({})
    encoder = _Encoder(out, allow_pickle)
    state = encoder.value(checkpoint, ())
    if not isinstance(state, dict):  # the whole checkpoint pickled: refuse, it is not a state dict
        raise UnsafeEncodingError(f"a Lightning checkpoint is a dict, not a {type(checkpoint).__name__}")
    out.state = state
    return out


class _Encoder:
    def __init__(self, out: Encoded, allow_pickle: bool) -> None:
        self.out = out
        self.allow_pickle = allow_pickle
        self.names: dict[Key, Any] = {}
        """The original dict key of each stored key that a ``keys`` note renamed, for messages."""

    def shown(self, key: Key) -> str:
        """``key`` as the user wrote it: renamed components given back their names."""
        return "/".join(str(self.names.get(key[: i + 1], c)) for i, c in enumerate(key))

    def note(self, key: Key, note: dict[str, Any]) -> None:
        self.out.notes.append([list(key), note])

    def value(self, value: Any, key: Key) -> Any:
        if isinstance(value, np.generic) and value.dtype.kind in "biufc":  # np.float64 is a float too
            self.note(key, {"type": "numpy_scalar"})
            return value
        if value is None or isinstance(value, (str, int, float, torch.Tensor, np.ndarray)):
            if isinstance(value, enum.Enum):  # IntEnum, StrEnum...
                return self.enum(value, key)
            return value
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, enum.Enum):
            return self.enum(value, key)
        if isinstance(value, Mapping) and type(value) in _MAPPINGS:
            return self.mapping(value, key)
        if type(value) in (list, tuple, torch.Size):
            items = [self.value(item, (*key, i)) for i, item in enumerate(value)]
            if type(value) is torch.Size:
                self.note(key, {"type": "torch.Size"})
            return items if type(value) is list else tuple(items)
        return self.unrepresentable(value, key, f"a {_type_name(value)}")

    def enum(self, value: enum.Enum, key: Key) -> Any:
        if not _is_scalar(value.value):
            return self.unrepresentable(value, key, f"the enum {_type_name(value)} (its value is not JSON)")
        self.note(key, {"type": "enum", "class": _type_name(value)})
        return value.value

    def mapping(self, value: Mapping[Any, Any], key: Key) -> Any:
        note: dict[str, Any] = {}
        kind = _MAPPINGS[type(value)]
        if kind != "dict":
            note["type"] = kind
        if kind == "AttributeDict":  # lightning's or lightning_fabric's: give back the same one
            note["module"] = type(value).__module__
        versions = getattr(value, "_metadata", None)
        if kind == "OrderedDict" and versions is not None:
            if not _is_json(versions):
                return self.unrepresentable(value, key, "an OrderedDict whose _metadata is not JSON")
            note["metadata"] = _jsonable(versions)
        if all(_usable(k, key) for k in value):
            out = {k: self.value(v, (*key, k)) for k, v in value.items()}
        elif all(_is_scalar(k) for k in value):
            note["keys"] = list(value)
            self.names.update(((*key, i), k) for i, k in enumerate(value))
            out = {i: self.value(v, (*key, i)) for i, v in enumerate(value.values())}
        else:
            bad = next(k for k in value if not _is_scalar(k))
            return self.unrepresentable(value, key, f"a dict with a {type(bad).__name__} key ({bad!r})")
        if note:
            self.note(key, note)
        return out

    def unrepresentable(self, value: Any, key: Key, what: str) -> Any:
        where = self.shown(key) if key else "the checkpoint"
        if not self.allow_pickle:
            raise UnsafeEncodingError(
                f"{where}: {what} is neither a tensor, an array, bytes nor JSON, so Tessera cannot "
                f"store it without pickle; convert it (or leave it out of the checkpoint), or pass "
                f"{_PICKLE_HINT} to store it pickled (loading it then needs the same flag)"
            )
        if not key:
            raise UnsafeEncodingError(f"a Lightning checkpoint is a dict, not {what}")
        self.out.pickle_paths.append(key_to_path(key))
        return value


_MAPPINGS: dict[type, str] = {dict: "dict", OrderedDict: "OrderedDict"}


def _register_attribute_dict() -> None:
    """Lightning's ``AttributeDict`` (hyper-parameters), from whichever package is imported."""
    for name in ("lightning.fabric.utilities.data", "lightning_fabric.utilities.data"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "AttributeDict"):
            _MAPPINGS[module.AttributeDict] = "AttributeDict"


def _usable(component: Any, parent: Key) -> bool:
    """Whether Tessera takes ``component`` as a key as it is (escaping keeps odd characters)."""
    if type(component) not in (str, int):
        return False
    try:
        key_to_path((*parent, component))
    except InvalidKeyError:  # empty, a lone surrogate, or over 255 bytes once escaped
        return False
    return True


def _is_scalar(value: Any) -> bool:
    return value is None or type(value) in (str, int, bool) or (type(value) is float and math.isfinite(value))


def _is_json(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(type(k) is str and _is_json(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    return _is_scalar(value)


def _jsonable(value: Any) -> Any:
    """A plain-dict copy of a JSON value held in mappings (``_metadata`` is an ``OrderedDict``)."""
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


# -- decoding -------------------------------------------------------------------------------


def decode(state: Any, metadata: Mapping[str, Any], location: str) -> dict[str, Any]:
    """The Lightning checkpoint from what ``tessera.load`` returned and the manifest's metadata
    (a checkpoint saved by ``tessera.save`` has no notes, and loads as it was saved)."""
    record = metadata.get(NOTES, {"version": _NOTES_VERSION})  # tessera.save's: nothing to rebuild
    if not isinstance(record, dict) or record.get("version") != _NOTES_VERSION:
        raise InconsistentCheckpointError(
            f"{location}: its {NOTES!r} metadata is not a version {_NOTES_VERSION} record; "
            "it was written by another version of tessera.lightning: load it with tessera.load"
        )
    notes: dict[Key, dict[str, Any]] = {}
    for entry in record.get("notes", []):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise InconsistentCheckpointError(f"{location}: a malformed note {entry!r} in {NOTES!r}")
        notes[tuple(entry[0])] = entry[1]
    below = {key[:n] for key in notes for n in range(len(key))}
    result = _Decoder(notes, below, location).value(state, ())
    if not isinstance(result, dict):
        raise InconsistentCheckpointError(f"{location}: the checkpoint decodes to a {type(result).__name__}")
    return result


@dataclass
class _Decoder:
    notes: dict[Key, dict[str, Any]]
    below: set[Key]
    location: str

    def value(self, node: Any, key: Key) -> Any:
        if key in self.below:
            if isinstance(node, dict):
                node = {k: self.value(v, (*key, k)) for k, v in node.items()}
            elif isinstance(node, (list, tuple)):
                items = [self.value(v, (*key, i)) for i, v in enumerate(node)]
                node = items if isinstance(node, list) else tuple(items)
        note = self.notes.get(key)
        return node if note is None else self.apply(note, node, key)

    def apply(self, note: dict[str, Any], node: Any, key: Key) -> Any:
        kind = note.get("type", "dict")
        where = f"{self.location}: {format_key(key) if key else 'the checkpoint'}"
        if "keys" in note:
            keys = note["keys"]
            if not isinstance(node, dict) or sorted(node) != list(range(len(keys))):
                raise InconsistentCheckpointError(f"{where}: the stored keys do not match its note")
            node = {k: node[i] for i, k in enumerate(keys)}
        builder = _BUILDERS.get(kind)
        if builder is None:
            raise InconsistentCheckpointError(f"{where}: unknown note type {kind!r}")
        try:
            return builder(node, note)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise InconsistentCheckpointError(f"{where}: cannot rebuild a {kind}: {error}") from None


def _ordered_dict(node: Any, note: dict[str, Any]) -> Any:
    out: Any = OrderedDict(node)
    if "metadata" in note:
        out._metadata = OrderedDict(note["metadata"])
    return out


def _attribute_dict(node: Any, note: dict[str, Any]) -> Any:
    """The ``AttributeDict`` of the package that saved it, if imported; else the other one's."""
    _register_attribute_dict()
    found = [k for k, v in _MAPPINGS.items() if v == "AttributeDict"]
    same = [k for k in found if k.__module__ == note.get("module")]
    return (same or found or [dict])[0](node)


def _enum(node: Any, note: dict[str, Any]) -> Any:
    """The member of an enum class that is already imported: loading never imports code."""
    module_name, _, qualname = str(note["class"]).rpartition(".")
    owner: Any = None
    while module_name and owner is None:  # the class may be nested: peel qualname off the module
        owner = sys.modules.get(module_name)
        if owner is None:
            module_name, _, outer = module_name.rpartition(".")
            qualname = f"{outer}.{qualname}"
    for part in qualname.split("."):
        owner = getattr(owner, part, None)
    if not (isinstance(owner, type) and issubclass(owner, enum.Enum)):
        raise ValueError(f"the enum class {note['class']} is not imported; import it before loading")
    return owner(node)


def _numpy_scalar(node: Any, note: dict[str, Any]) -> Any:
    return np.asarray(node)[()]


_BUILDERS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "dict": lambda node, note: node,
    "OrderedDict": _ordered_dict,
    "AttributeDict": _attribute_dict,
    "torch.Size": lambda node, note: torch.Size(node),
    "enum": _enum,
    "numpy_scalar": _numpy_scalar,
}
