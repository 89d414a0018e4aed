"""Validation of every JSON document of a checkpoint against ``schemas/`` (spec §3).

Schemas load from the package's own ``schemas`` folder (the repository's
``schemas/``), never from a network; cross-references resolve through a local
registry. All violations of a document are reported together, each with its
JSON path, so that one run of ``tessera verify`` lists every problem.

Every save and every load validates its root, so a valid document is first
answered by the schemas compiled to Python predicates (``schema_compiler``),
some 40 times faster than ``jsonschema``; only a document they reject
goes through ``jsonschema``, which alone decides and words the problems.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator, validators
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from ..errors import SchemaViolationError
from .schema_compiler import Check, compile_schemas

__all__ = ["SCHEMA_DIR", "SchemaName", "schema_problems", "validate"]

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

SchemaName = Literal["root", "manifest", "array", "group", "claim"]


def _is_integer(checker: object, instance: object) -> bool:
    """JSON Schema counts ``3.0`` as an integer; a Tessera document must write ``3`` (spec R3.7)."""
    return type(instance) is int


_StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


@cache
def _schemas() -> dict[str, dict[str, Any]]:
    # Each file declares "$schema" (draft 2020-12). jsonschema switches to its stock
    # validator wherever a "$ref" lands in a document that declares one, which would
    # drop the strict integer type; so the loaded copies leave it out and the
    # registry is told the draft explicitly.
    return {
        p.name.removesuffix(".schema.json"): {
            k: v for k, v in json.loads(p.read_text()).items() if k != "$schema"
        }
        for p in sorted(SCHEMA_DIR.glob("*.schema.json"))
    }


@cache
def _validators() -> dict[str, Any]:
    schemas = _schemas()
    registry: Registry = Registry().with_resources(
        (doc["$id"], DRAFT202012.create_resource(doc)) for doc in schemas.values()
    )
    return {name: _StrictValidator(doc, registry=registry) for name, doc in schemas.items()}


@cache
def _compiled() -> dict[str, Check]:
    return compile_schemas(_schemas())


def schema_problems(doc: Any, schema: SchemaName) -> list[str]:
    """Every violation of ``schema`` by ``doc``, as ``"at <json path>: <message>"`` lines."""
    if _compiled()[schema](doc):
        return []
    validator = _validators()[schema]
    return [
        f"at {error.json_path}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]


def validate(doc: Any, schema: SchemaName, where: str) -> None:
    """Raise one :class:`SchemaViolationError` naming ``where`` and listing every violation."""
    problems = schema_problems(doc, schema)
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SchemaViolationError(f"{where} violates {schema}.schema.json:\n  {listed}{more}")
