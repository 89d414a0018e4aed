"""Every message that crosses the harness-backend boundary is checked against its schema.

The schemas live in ``conformance/schemas/`` and cross-reference each other by
relative ``$ref`` ; they resolve through a local registry, never a network.
A violation is a :class:`ProtocolError`, which makes the case an *error*
(PROTOCOL.md P8): a backend that cannot hold up its end of the protocol has
not shown anything about the format.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

__all__ = ["SCHEMA_DIR", "ProtocolError", "SchemaName", "check", "problems"]

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

SchemaName = Literal["backend", "request", "response", "vector", "report"]


class ProtocolError(Exception):
    """A backend broke the protocol: a crash, a timeout, a malformed or mismatched answer.

    ``rule`` is the PROTOCOL.md rule it broke (``"P8"``), so that a report
    tells an implementer where to read.
    """

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} (PROTOCOL.md {rule})")
        self.rule = rule


@cache
def _validators() -> dict[str, Draft202012Validator]:
    docs = {p.name.removesuffix(".schema.json"): json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.json")}
    registry: Registry = Registry().with_resources(
        (doc["$id"], DRAFT202012.create_resource(doc)) for doc in docs.values()
    )
    return {name: Draft202012Validator(doc, registry=registry) for name, doc in docs.items()}


def problems(doc: Any, schema: SchemaName) -> list[str]:
    """Every violation of ``schema`` by ``doc``, one ``"at <json path>: <message>"`` line each."""
    return [
        f"at {error.json_path}: {error.message}"
        for error in sorted(_validators()[schema].iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]


def check(doc: Any, schema: SchemaName, rule: str, what: str) -> None:
    """Raise a :class:`ProtocolError` citing ``rule`` if ``doc`` violates ``schema``."""
    found = problems(doc, schema)
    if found:
        listed = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise ProtocolError(rule, f"{what} violates {schema}.schema.json: {listed}")
