"""The compiled schemas (``schema_compiler``) accept exactly what ``jsonschema`` accepts.

``schemas.schema_problems`` trusts a compiled "valid" without asking jsonschema,
so a compiled predicate more lenient than jsonschema would let a broken document
through: every check here compares the two, on the conformance vectors, on
seeded random mutations of valid documents, and on the equality and type traps
of JSON Schema (``1 == 1.0``, ``True != 1``, strict integers, unanchored patterns).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tessera.format import schemas
from tessera.format.schema_compiler import SchemaCompileError, compile_schemas

from .conftest import REPO

VECTORS = REPO / "conformance" / "vectors"
NAMES = ["root", "manifest", "array", "group", "claim"]
UUID = "0123abcd-4567-89ef-0123-456789abcdef"


def _agree(doc: Any, name: str) -> bool:
    """Assert that both validators give one answer for ``doc``; return it."""
    compiled = schemas._compiled()[name](doc)
    reference = schemas._validators()[name].is_valid(doc)
    assert compiled == reference, f"{name}: compiled says {compiled}, jsonschema {reference} for {doc!r}"
    return reference


def _vector_documents() -> Iterator[tuple[str, Path, Any]]:
    """``(schema it must satisfy, file, parsed document)`` for every JSON document of every vector."""
    for checkpoint in sorted(VECTORS.glob("*/*/checkpoint")):
        for path in sorted(checkpoint.rglob("*.json")):
            if path.name not in ("zarr.json", ".tessera-claim.json") or not path.is_file():
                continue
            try:
                doc = json.loads(path.read_bytes())
            except (ValueError, RecursionError):
                continue  # not JSON at all: refused before any schema
            if path.name == ".tessera-claim.json":
                name = "claim"
            elif path.parent == checkpoint:
                name = "root"
            else:
                name = "array" if isinstance(doc, dict) and doc.get("node_type") == "array" else "group"
            yield name, path, doc


def test_vectors_agree_under_every_schema() -> None:
    verdicts: dict[tuple[str, bool], int] = {}
    for name, path, doc in _vector_documents():
        group = path.relative_to(VECTORS).parts[0]
        valid = _agree(doc, name)
        verdicts[group, valid] = verdicts.get((group, valid), 0) + 1
        # A valid vector may hold stray documents a reader ignores (valid/extra-files), never a bad root.
        assert valid or group != "valid" or name not in ("root", "claim"), path
        for other in NAMES:  # any document under any schema: more disagreements to find
            _agree(doc, other)
        if name == "root" and isinstance(doc.get("attributes"), dict):
            _agree(doc["attributes"].get("tessera"), "manifest")
    assert verdicts["valid", True] > 100
    assert verdicts["malformed", False] > 0  # not vacuous: the schema-breaking vectors do fail


# Replacement values: each type, 3 / 3.0 / True, enum and const members of the schemas,
# near-misses of their patterns, empty and odd strings, empty containers.
POOL: list[Any] = [
    3, 3.0, True, False, None, 0, 0.0, -0.0, 1, 1.0, -1, 2.5, 2**70, float("nan"),
    "", " ", "x", "3", "é", "a/b", "~1", "~01", "a\n", "%41",
    "tessera", "group", "array", "regular", "default", "/", ".", "little", "big",
    "bytes", "zstd", "crc32c", "pickle", "json", "float", "torch", "numpy",
    "tensor", "object", "value", "uint8", "float32", "bfloat16", "int",
    "1.0", "1.0\n", "01.0", "2.10", UUID, UUID.upper(), UUID + "\n", UUID[:-1],
    "2024-01-02T03:04:05Z", "2024-01-02T03:04:05.123Z", "2024-01-02 03:04:05Z",
    [], {}, [3], [3.0], [True], ["x"], ["x", "x"], [0, -1], {"name": "bytes"},
    {"separator": "/"}, {"name": "default"}, {"name": "default", "configuration": {"separator": "/"}},
    {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
    {"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"},
]  # fmt: skip
MEMBERS = [
    "extra", "name", "configuration", "origin", "encoding", "value", "dtype", "attributes",
    "dimension_names", "storage_transformers", "checksum", "level", "endian", "kind", "key", "path",
]  # fmt: skip


def _nodes(doc: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield at, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nodes(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nodes(v, (*at, i))


def _mutate(doc: Any, rng: random.Random) -> Any:
    """``doc`` with one random node replaced, dropped, extended, shortened or retyped."""
    at, node = rng.choice(list(_nodes(doc)))
    if isinstance(node, dict) and node and rng.random() < 0.5:
        new: Any = dict(node)
        if rng.random() < 0.5:
            del new[rng.choice(list(new))]
        else:
            new[rng.choice(MEMBERS)] = copy.deepcopy(rng.choice(POOL))
    elif isinstance(node, list) and rng.random() < 0.6:
        new = list(node)
        choice = rng.randrange(4)
        if choice == 0 and new:
            del new[rng.randrange(len(new))]
        elif choice == 1 and new:
            new.append(copy.deepcopy(rng.choice(new)))
        elif choice == 2:
            new.append(copy.deepcopy(rng.choice(POOL)))
        else:
            new = []
    elif isinstance(node, bool) or not isinstance(node, (int, float, str)) or rng.random() < 0.5:
        new = copy.deepcopy(rng.choice(POOL))
    elif isinstance(node, str):
        new = rng.choice([node + "\n", " " + node, node.upper(), node[1:], node + "x"])
    else:
        new = rng.choice([float(node), bool(node), -node, node + 1, [node], str(node)])
    if not at:
        return new
    parent = doc
    for step in at[:-1]:
        parent = parent[step]
    parent[at[-1]] = new
    return doc


def test_random_mutations_agree() -> None:
    bases = {
        (name, json.dumps(doc, sort_keys=True)): (name, doc)
        for name, path, doc in _vector_documents()
        if path.relative_to(VECTORS).parts[0] == "valid"
    }
    docs = sorted(bases.values(), key=lambda nd: (nd[0], json.dumps(nd[1], sort_keys=True)))
    rng = random.Random(20240611)
    verdicts = {True: 0, False: 0}
    for _ in range(4000):
        name, base = rng.choice(docs)
        doc = copy.deepcopy(base)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            doc = _mutate(doc, rng)
        verdicts[_agree(doc, name)] += 1
    assert min(verdicts.values()) > 400  # both answers well represented


def _compile_one(schema: dict[str, Any]) -> tuple[Any, Any]:
    """The compiled predicate and the strict jsonschema validator of one ad hoc schema."""
    schema = {"$id": "urn:test", **schema}
    return compile_schemas({"t": schema})["t"], schemas._StrictValidator(schema)


TRAPS: list[tuple[dict[str, Any], list[Any]]] = [
    ({"const": 1}, [1, 1.0, True, "1", [1], None]),
    ({"const": 0}, [0, 0.0, -0.0, False, None]),
    ({"const": True}, [True, 1, 1.0, "true"]),
    ({"const": False}, [False, 0, 0.0, None, []]),
    ({"const": None}, [None, False, 0, "null", []]),
    ({"const": "a"}, ["a", "A", "a ", ["a"]]),
    (
        {"const": {"a": [1, 2]}},
        [{"a": [1, 2]}, {"a": [1.0, 2.0]}, {"a": [True, 2]}, {"a": [1, 2], "b": 1}, {}],
    ),
    ({"const": [0, [1]]}, [[0, [1]], [False, [1]], [0.0, [1.0]], [0, [True]], [0, 1], [[1], 0]]),
    (
        {"enum": [1, "a", None, [1, {"a": True}]]},
        [1.0, True, "a", None, [1.0, {"a": True}], [1, {"a": 1}], 0],
    ),
    ({"enum": [False, "bytes"]}, [False, 0, "bytes", "Bytes", b"bytes"]),
    (
        {"uniqueItems": True},
        [
            [1, 1.0],
            [1, True],
            [0, False],
            [[1], [1.0]],
            [{"a": 1}, {"a": 1.0}],
            ["a", "b"],
            ["a", "a"],
            [],
            [{"a": 1}, {"b": 1}],
            [None, None],
            [True, True],
            [[0], [False]],
            7,
        ],
    ),
    ({"type": "integer"}, [3, 3.0, True, 2**80, -0.0, "3", None]),
    ({"type": "number"}, [3, 3.0, True, float("nan"), float("inf"), "3"]),
    ({"type": ["string", "integer"], "minLength": 1}, ["", "a", 0, 0.0, False, []]),
    ({"type": ["null", "boolean"]}, [None, True, 0, "null"]),
    ({"type": "object"}, [{}, [], "x", None]),
    ({"type": "array", "minItems": 1, "maxItems": 2}, [[], [1], [1, 2], [1, 2, 3], {}]),
    ({"minItems": 1}, [[], "", {}]),
    ({"pattern": "b"}, ["abc", "ac", 5]),
    ({"pattern": "^a$"}, ["a", "a\n", "\na", "ba"]),  # Python's $ also matches before a final newline
    ({"minLength": 2}, ["é", "😀", "ab", "é\u0301", 5, ""]),  # code points, not bytes or UTF-16 units
    ({"minimum": 0}, [0, -1, -0.5, -0.0, True, False, "x", float("nan")]),
    ({"maximum": 1}, [1, 1.0, 1.5, 2, True, None]),
    ({"type": "integer", "minimum": 1}, [1, 0, 1.0, True]),
    ({"format": "date-time"}, ["nonsense", 5]),  # an annotation: no format checker is configured
    ({"if": {"type": "string"}, "then": {"minLength": 2}, "else": {"type": "integer"}}, ["a", "ab", 3, 3.0]),
    ({"if": {"required": ["a"]}, "then": {"required": ["b"]}}, [{}, {"a": 1}, {"a": 1, "b": 2}, "x"]),
    ({"then": False}, [1]),  # "then" without "if" is ignored
    (
        {"properties": {"a": True}, "additionalProperties": {"type": "integer"}},
        [{"a": "x", "b": 1}, {"b": "x"}, "x"],
    ),
    (
        {"properties": {"a": {"type": "string"}}, "additionalProperties": False},
        [{"a": "x"}, {"a": 1}, {"b": 1}, 2],
    ),
    ({"required": ["a"]}, [{"a": None}, {}, [], "a"]),
    ({"items": False}, [[], [1], "x"]),
    ({"items": {"type": "integer", "minimum": 0}}, [[0, 1], [0, -1], [0, 1.0], [True], {"0": -1}]),
    ({"allOf": [{"type": "string"}, {"minLength": 2}]}, ["ab", "a", 2]),
    ({"$defs": {"a/b": {"type": "integer"}}, "$ref": "#/$defs/a~1b", "minimum": 2}, [2, 1, "2"]),
    ({"$defs": {"%": {"const": 1}}, "items": {"$ref": "#/$defs/%25"}}, [[1, 1.0], [True]]),
    ({"title": "t", "description": "d", "$comment": "c", "default": 1, "examples": [1]}, [None, {}]),
]


@pytest.mark.parametrize(("schema", "instances"), TRAPS, ids=[json.dumps(s)[:60] for s, _ in TRAPS])
def test_traps_agree(schema: dict[str, Any], instances: list[Any]) -> None:
    compiled, reference = _compile_one(schema)
    for instance in instances:
        assert compiled(instance) == reference.is_valid(instance), f"{schema} on {instance!r}"


def test_traps_of_the_real_schemas() -> None:
    array = {
        "zarr_format": 3, "node_type": "array", "shape": [4], "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    }  # fmt: skip
    assert _agree(array, "array")
    for path, value, valid in [
        (("zarr_format",), 3.0, False),
        (("zarr_format",), True, False),
        (("shape", 0), 4.0, False),
        (("shape", 0), True, False),
        (("fill_value",), "NaN", True),
        (("chunk_key_encoding",), {"name": "default"}, True),
        (("chunk_key_encoding",), {"name": "default", "configuration": {"separator": "."}}, False),
        (("codecs", 0, "configuration", "endian"), "big", False),
        (("codecs", 1), {"name": "crc32c", "configuration": {}}, False),
        (("codecs", 1), {"name": "zstd", "configuration": {"level": 3.0, "checksum": False}}, False),
        (("codecs", 1), {"name": "zstd", "configuration": {"level": 3, "checksum": 0}}, False),
        (("codecs", 1), {"name": "zstd", "configuration": {"level": True, "checksum": False}}, False),
    ]:
        doc = copy.deepcopy(array)
        parent: Any = doc
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = value
        assert _agree(doc, "array") is valid, (path, value)
    claim = {"format": "tessera", "save_id": UUID, "created": "2024-01-02T03:04:05Z", "writer": {}}
    assert not _agree(claim, "claim")  # writer lacks name and version
    claim["writer"] = {"name": "t", "version": ""}
    assert _agree(claim, "claim")
    assert not _agree({**claim, "save_id": UUID.upper()}, "claim")
    assert _agree({**claim, "save_id": UUID + "\n"}, "claim")  # jsonschema's re.search: "$" before "\n"


def test_schema_problems_still_words_every_problem() -> None:
    doc = {"zarr_format": 3.0, "node_type": "array"}
    problems = schemas.schema_problems(doc, "group")
    assert problems == [
        "at $.node_type: 'group' was expected",
        "at $.zarr_format: 3.0 is not of type 'integer'",
    ]
    assert schemas.schema_problems({"zarr_format": 3, "node_type": "group"}, "group") == []


@pytest.mark.parametrize(
    "schema",
    [
        {"oneOf": [{"type": "string"}]},
        {"properties": {"a": {"maxLength": 3}}},
        {"type": "string", "properties": {"a": {"not": {}}}},  # never applies, still refused
        {"$defs": {"unused": {"patternProperties": {}}}},
        {"then": {"contains": {}}},
        {"items": [{"type": "string"}]},
        {"type": "int"},
        {"$ref": "#anchor"},
        {"$ref": "urn:elsewhere"},
        {"$ref": "#/$defs/missing"},
        {"properties": {"a": {"$ref": "#"}}},
        {"properties": {"a": {"$id": "urn:nested"}}},
    ],
)
def test_unsupported_schemas_fail_to_compile(schema: dict[str, Any]) -> None:
    with pytest.raises(SchemaCompileError):
        compile_schemas({"t": {"$id": "urn:test", **schema}})
