"""Compile Tessera's JSON Schemas into plain Python predicates, the fast path of ``schemas``.

``jsonschema`` interprets a schema afresh on every call and walks it keyword by
keyword through generators: about 0.36 ms per manifest entry, paid on every save
and every load. The schemas use a small keyword subset, and compiled once into
nested closures that subset answers "valid or not" some 40 times faster.
The predicate gives no reasons: ``schemas`` asks ``jsonschema`` for the messages
when it says invalid, so the messages stay exactly jsonschema's.

The predicate must accept exactly what ``jsonschema`` accepts under the strict
integer type of ``schemas``. So equality follows JSON Schema (``1 == 1.0``,
``True != 1``, deep for arrays and objects), ``pattern`` is ``re.search``
(unanchored), ``format`` is an annotation (no format checker is configured),
and every keyword outside the subset raises :class:`SchemaCompileError`: a
schema edit can never be silently skipped by the fast path.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

__all__ = ["Check", "SchemaCompileError", "compile_schemas"]

Check = Callable[[Any], bool]
Pointer = tuple[str, ...]

_ANNOTATIONS = frozenset({"title", "description", "$comment", "$defs", "format", "default", "examples"})
_ASSERTIONS = frozenset(
    {
        "type", "properties", "required", "additionalProperties",
        "items", "minItems", "maxItems", "uniqueItems",
        "const", "enum", "pattern", "minLength", "minimum", "maximum",
        "$ref", "allOf", "if", "then", "else",
    }
)  # fmt: skip
_ROOT_ONLY = frozenset({"$id", "$schema"})  # elsewhere they would change the base URI or the dialect


class SchemaCompileError(Exception):
    """A schema uses something outside the compiled subset: a bug in ``schemas/``, not in a document."""


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


_TYPES: dict[str, Check] = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "number": _is_number,
    "integer": lambda x: type(x) is int,  # the strict integer of ``schemas`` (spec R3.7)
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}


def _accept(x: Any) -> bool:
    return True


def _reject(x: Any) -> bool:
    return False


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON Schema: numbers by value, booleans only to booleans, containers deeply."""
    if a is b:
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return False  # two equal booleans are the same object
    if isinstance(a, str) or isinstance(b, str):
        return bool(a == b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_json_equal(v, b[k]) for k, v in a.items())
        )
    if isinstance(b, (list, dict)):
        return False
    return bool(a == b)


def _unique(items: list[Any]) -> bool:
    if all(isinstance(v, str) for v in items):
        return len(set(items)) == len(items)
    return not any(_json_equal(a, b) for i, a in enumerate(items) for b in items[i + 1 :])


def _equals(value: Any) -> Check:
    if isinstance(value, str):
        return lambda x: bool(x == value)
    if value is None or isinstance(value, bool):
        return lambda x: x is value
    return lambda x: _json_equal(x, value)


def _one_of(values: list[Any]) -> Check:
    if all(isinstance(v, str) for v in values):
        strings = frozenset(values)
        return lambda x: isinstance(x, str) and x in strings
    return lambda x: any(_json_equal(x, v) for v in values)


def _all(checks: list[Check]) -> Check:
    checks = [c for c in checks if c is not _accept]
    if not checks:
        return _accept
    if len(checks) == 1:
        return checks[0]

    def check(x: Any) -> bool:
        for c in checks:  # noqa: SIM110 -- all() over a generator makes validation a third slower
            if not c(x):
                return False
        return True

    return check


def _if_then_else(cond: Check, then: Check, otherwise: Check) -> Check:
    return lambda x: then(x) if cond(x) else otherwise(x)


def _object(
    strict: bool,
    required: frozenset[str],
    properties: tuple[tuple[str, Check], ...],
    names: frozenset[str],
    additional: Check,
) -> Check:
    closed = additional is _reject
    open_ = additional is _accept

    def check(x: Any) -> bool:
        if not isinstance(x, dict):
            return not strict
        if not required <= x.keys():
            return False
        for name, sub in properties:
            if name in x and not sub(x[name]):
                return False
        if closed:
            return x.keys() <= names
        return open_ or all(additional(v) for k, v in x.items() if k not in names)

    return check


def _array(strict: bool, low: int, high: float, items: Check, unique: bool) -> Check:
    def check(x: Any) -> bool:
        if not isinstance(x, list):
            return not strict
        if not low <= len(x) <= high:
            return False
        for v in x:
            if not items(v):
                return False
        return not unique or _unique(x)

    return check


def _string(strict: bool, min_length: int, search: Callable[[str], object] | None) -> Check:
    def check(x: Any) -> bool:
        if not isinstance(x, str):
            return not strict
        return len(x) >= min_length and (search is None or search(x) is not None)

    return check


def _number(strict: bool, is_type: Check, low: Any, high: Any) -> Check:
    # ``not x < low`` rather than ``x >= low``: jsonschema's own comparison, also for NaN.
    def check(x: Any) -> bool:
        if not is_type(x):
            return not strict
        return not (low is not None and x < low) and not (high is not None and x > high)

    return check


class _Compiler:
    """Compiles every subschema once, keyed by (document ``$id``, JSON pointer), so ``$ref`` shares it."""

    def __init__(self, documents: dict[str, Any]) -> None:
        self._documents = documents
        self._done: dict[tuple[str, Pointer], Check] = {}
        self._busy: set[tuple[str, Pointer]] = set()

    def at(self, uri: str, pointer: Pointer) -> Check:
        key = (uri, pointer)
        if key in self._done:
            return self._done[key]
        where = _where(uri, pointer)
        if key in self._busy:
            raise SchemaCompileError(f"{where}: a recursive $ref is outside the compiled subset")
        if uri not in self._documents:
            raise SchemaCompileError(f"{where}: no schema document has this $id")
        node = self._documents[uri]
        try:
            for token in pointer:
                node = node[int(token)] if isinstance(node, list) else node[token]
        except (KeyError, IndexError, ValueError, TypeError):
            raise SchemaCompileError(f"{where}: the pointer leads nowhere") from None
        self._busy.add(key)
        check = self._node(node, uri, pointer)
        self._busy.discard(key)
        self._done[key] = check
        return check

    def _ref(self, ref: str, uri: str, where: str) -> Check:
        target, _, fragment = ref.partition("#")
        if fragment and not fragment.startswith("/"):
            raise SchemaCompileError(f"{where}: $ref {ref!r} names an anchor, outside the compiled subset")
        tokens = [unquote(t).replace("~1", "/").replace("~0", "~") for t in fragment.split("/")[1:]]
        return self.at(target or uri, tuple(tokens))

    def _node(self, node: Any, uri: str, pointer: Pointer) -> Check:
        where = _where(uri, pointer)
        if isinstance(node, bool):
            return _accept if node else _reject
        if not isinstance(node, dict):
            raise SchemaCompileError(f"{where}: a schema must be an object or a boolean")
        unsupported = node.keys() - _ANNOTATIONS - _ASSERTIONS - (_ROOT_ONLY if not pointer else set())
        if unsupported:
            raise SchemaCompileError(
                f"{where}: keywords {sorted(unsupported)} are outside the compiled subset"
            )

        # Every subschema is compiled, used or not (a dangling "then", "$defs", "properties" under
        # another type), so that no keyword anywhere escapes the check above.
        subs: dict[str, Check] = {}
        for keyword in ("additionalProperties", "items", "if", "then", "else"):
            if keyword in node:
                subs[keyword] = self.at(uri, (*pointer, keyword))
        props = {n: self.at(uri, (*pointer, "properties", n)) for n in node.get("properties", {})}
        all_of = [self.at(uri, (*pointer, "allOf", str(i))) for i in range(len(node.get("allOf", ())))]
        for name in node.get("$defs", {}):
            self.at(uri, (*pointer, "$defs", name))

        types = node.get("type")
        names = [types] if isinstance(types, str) else types
        if names is not None and not (isinstance(names, list) and set(names) <= _TYPES.keys()):
            raise SchemaCompileError(f"{where}: type {types!r} is outside the compiled subset")
        only = names[0] if names is not None and len(names) == 1 else None
        checks: list[Check] = []
        if names is not None and only is None:
            tests = [_TYPES[n] for n in names]
            checks.append(lambda x: any(t(x) for t in tests))

        # Type-specific keywords apply only to instances of their type; where "type" names that
        # single type they become one closure that also checks the type.
        def wanted(kind: str, *keywords: str) -> bool | None:
            """``True``: strict, ``False``: a guard, ``None``: nothing to check for this kind."""
            if only == kind or (kind == "number" and only == "integer"):
                return True
            if only is not None or not any(k in node for k in keywords):
                return None  # "type" rules instances of this kind out, or nothing asks about them
            return False

        strict = wanted("object", "properties", "required", "additionalProperties")
        if strict is not None:
            checks.append(
                _object(
                    strict,
                    frozenset(node.get("required", ())),
                    tuple((n, c) for n, c in props.items() if c is not _accept),
                    frozenset(props),
                    subs.get("additionalProperties", _accept),
                )
            )
        strict = wanted("array", "items", "minItems", "maxItems", "uniqueItems")
        if strict is not None:
            checks.append(
                _array(
                    strict,
                    node.get("minItems", 0),
                    node.get("maxItems", float("inf")),
                    subs.get("items", _accept),
                    node.get("uniqueItems", False),
                )
            )
        strict = wanted("string", "minLength", "pattern")
        if strict is not None:
            pattern = node.get("pattern")
            checks.append(
                _string(strict, node.get("minLength", 0), re.compile(pattern).search if pattern else None)
            )
        strict = wanted("number", "minimum", "maximum")
        if strict is not None:
            is_type = _TYPES[only] if strict and only else _is_number
            checks.append(_number(strict, is_type, node.get("minimum"), node.get("maximum")))
        if only is not None and only not in ("object", "array", "string", "number", "integer"):
            checks.append(_TYPES[only])

        if "const" in node:
            checks.append(_equals(node["const"]))
        if "enum" in node:
            checks.append(_one_of(node["enum"]))
        if "$ref" in node:
            checks.append(self._ref(node["$ref"], uri, where))
        checks.extend(all_of)
        then, otherwise = subs.get("then", _accept), subs.get("else", _accept)
        if "if" in node and not (then is _accept and otherwise is _accept):
            checks.append(_if_then_else(subs["if"], then, otherwise))
        return _all(checks)


def _where(uri: str, pointer: Pointer) -> str:
    return f"{uri}#/{'/'.join(pointer)}" if pointer else uri


def compile_schemas(schemas: Mapping[str, Mapping[str, Any]]) -> dict[str, Check]:
    """One predicate per named schema document; each document carries its ``$id``, the key of ``$ref``s."""
    compiler = _Compiler({doc["$id"]: doc for doc in schemas.values()})
    return {name: compiler.at(doc["$id"], ()) for name, doc in schemas.items()}
