"""Strict JSON (spec §11): no NaN or Infinity, no duplicate keys, bounded size and depth.

Python's ``json`` accepts ``NaN`` and silently keeps the last of two duplicate
keys; two readers of one manifest could then disagree about what it says. The
format allows neither, and this module is the only place Tessera parses or
writes JSON.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import LimitExceededError, SchemaViolationError
from .limits import DEFAULT_LIMITS, ReaderLimits

__all__ = ["dumps", "loads"]


def dumps(doc: Any) -> bytes:
    """Compact UTF-8 JSON; refuses NaN and Infinity rather than writing non-JSON."""
    return json.dumps(doc, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name, value in pairs:
        if name in doc:
            raise ValueError(f"duplicate key {name!r}")
        doc[name] = value
    return doc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} overflows a double")
    return value


def _check_tree(doc: Any, where: str, limits: ReaderLimits) -> None:
    """Bounded depth, and strings that are valid Unicode (JSON escapes allow lone surrogates)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise SchemaViolationError(f"{where}: string {node[:40]!r} is not valid Unicode") from None
        elif isinstance(node, (dict, list)):
            if depth > limits.max_json_depth:
                raise LimitExceededError(f"{where}: JSON nests deeper than {limits.max_json_depth}")
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _check_containers(data: bytes, where: str, limits: ReaderLimits) -> None:
    """Refuse, before parsing, a document of more objects and arrays than ``max_json_containers``.

    Each ``{`` or ``[`` outside a string opens one. Counting every such byte is a fast upper
    bound; only a document over the limit by it is counted exactly, strings blanked first.
    """
    if data.count(b"{") + data.count(b"[") <= limits.max_json_containers:
        return
    bare = _STRING.sub(b'""', data)
    containers = bare.count(b"{") + bare.count(b"[")
    if containers > limits.max_json_containers:
        raise LimitExceededError(
            f"{where}: {containers} JSON objects and arrays exceed the limit of {limits.max_json_containers}"
        )


def loads(data: bytes, where: str, limits: ReaderLimits = DEFAULT_LIMITS) -> Any:
    """Parse one JSON document read from ``where`` (named in every error)."""
    if len(data) > limits.max_json_bytes:
        raise LimitExceededError(
            f"{where}: {len(data)} bytes of JSON exceed the limit of {limits.max_json_bytes}"
        )
    _check_containers(data, where, limits)
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise LimitExceededError(f"{where}: JSON nests deeper than {limits.max_json_depth}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SchemaViolationError(f"{where}: not strict JSON: {exc}") from None
    _check_tree(doc, where, limits)
    return doc
