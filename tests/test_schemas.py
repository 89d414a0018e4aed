"""The JSON Schemas of ``schemas/`` (R3.1, R5.8, R9.1): valid draft 2020-12, loaded from disk only,
satisfied by every document the writer produces, and not vacuous."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from .conftest import SCHEMA_DIR, SPEC, read_json

NAMES = ["root", "manifest", "array", "group", "claim"]


def _schemas() -> dict[str, dict[str, Any]]:
    return {n: json.loads((SCHEMA_DIR / f"{n}.schema.json").read_text()) for n in NAMES}


def _validator(name: str) -> Draft202012Validator:
    schemas = _schemas()
    registry: Registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in schemas.values()
    )
    return Draft202012Validator(schemas[name], registry=registry)


def _errors(name: str, doc: Any) -> list[str]:
    return [e.message for e in _validator(name).iter_errors(doc)]


def test_schema_files_are_exactly_these() -> None:
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(f"{n}.schema.json" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_schemas_are_valid_draft_2020_12(name: str) -> None:
    doc = _schemas()[name]
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(doc)
    assert doc["$id"].startswith("urn:tessera:schema:1:")


def test_schema_ids_are_unique_and_references_resolve_locally() -> None:
    schemas = _schemas()
    ids = [d["$id"] for d in schemas.values()]
    assert len(set(ids)) == len(ids)
    refs: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(schemas)
    for ref in refs:
        assert ref.startswith(("#", "urn:tessera:schema:1:")), f"{ref} would need a network"


def test_package_uses_the_same_schemas() -> None:
    from tessera.format.schemas import SCHEMA_DIR as PACKAGED

    for name in NAMES:
        assert (PACKAGED / f"{name}.schema.json").read_bytes() == (
            SCHEMA_DIR / f"{name}.schema.json"
        ).read_bytes()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint with every kind of entry, every dtype, zstd and raw arrays, lists, nesting."""
    from .conftest import every_dtype_state

    root = tmp_path_factory.mktemp("schemas") / "ckpt"
    state = {
        "tensors": every_dtype_state((3, 4)),
        "numpy": np.arange(6, dtype=np.int32).reshape(2, 3),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 2),
        "layers": [{"w": torch.ones(2)}, {"w": torch.zeros(2)}],
        "opt": {0: {"step": torch.tensor(3.0)}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
        "rng": b"\x00\x01",
        "pickled": {1, 2},
        "nan": float("nan"),
        "cfg": {"a": 1, "b": None, "c": "ü"},
    }
    tessera.save(
        state,
        root,
        options=tessera.SaveOptions(compression=tessera.Zstd(), chunk_bytes=16, pickle_keys=["pickled"]),
        metadata={"step": 3, "config": {"x": [1, 2]}},
    )
    return root


def test_root_validates(written: Path) -> None:
    doc = read_json(written / "zarr.json")
    assert _errors("root", doc) == []
    assert _errors("manifest", doc["attributes"]["tessera"]) == []


def test_every_array_and_group_document_validates(written: Path) -> None:
    arrays = groups = 0
    for path in written.rglob("zarr.json"):
        if path == written / "zarr.json":
            continue
        doc = read_json(path)
        if doc["node_type"] == "array":
            arrays += 1
            assert _errors("array", doc) == [], path
        else:
            groups += 1
            assert _errors("group", doc) == [], path
            assert doc == {"zarr_format": 3, "node_type": "group", "attributes": {}}  # R2.4
    manifest = read_json(written / "zarr.json")["attributes"]["tessera"]
    assert arrays == sum(e["kind"] != "value" for e in manifest["entries"])
    assert groups >= 5


def test_claim_validates_and_matches_the_manifest_R9_1(written: Path) -> None:
    claim = read_json(written / ".tessera-claim.json")
    assert _errors("claim", claim) == []
    manifest = read_json(written / "zarr.json")["attributes"]["tessera"]
    assert {k: claim[k] for k in ("save_id", "created", "writer")} == {
        k: manifest[k] for k in ("save_id", "created", "writer")
    }


def test_spec_example_root_validates_R3_1() -> None:
    """The root document printed in §3.4 satisfies root.schema.json."""
    text = SPEC.read_text(encoding="utf-8")
    section = text.split("### 3.4 Example", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block, "no JSON example in §3.4"
    doc = json.loads(block.group(1))
    assert _errors("root", doc) == []


# -- the schemas refuse what the spec refuses -----------------------------------------------


@pytest.fixture(scope="module")
def root_doc(written: Path) -> dict[str, Any]:
    return read_json(written / "zarr.json")


def _entry(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(e for e in doc["attributes"]["tessera"]["entries"] if e["kind"] == kind)


@pytest.mark.parametrize(
    "path",
    [
        "..",
        ".",
        "../a",
        "a/..",
        "/a",
        "a/",
        "a//b",
        "a\\b",
        "~01",
        "~-0",
        "~",
        "_a",
        ".a",
        "a b",
        "ü",
        "",
        "a\u0000",
    ],
    ids=repr,
)
def test_path_pattern_refuses_R15_3(root_doc: dict[str, Any], path: str) -> None:
    doc = copy.deepcopy(root_doc)
    _entry(doc, "tensor")["path"] = path
    assert _errors("root", doc)


@pytest.mark.parametrize("path", ["a", "a.b", "A-b_c.d", "%2E.", "%5F_x", "~0", "~-12", "x/~3/%C3%BC"])
def test_path_pattern_accepts(root_doc: dict[str, Any], path: str) -> None:
    doc = copy.deepcopy(root_doc)
    _entry(doc, "tensor")["path"] = path
    assert _errors("root", doc) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(format="zarr"),
        lambda m: m.update(format_version="1.0.0"),
        lambda m: m.update(format_version="01.0"),
        lambda m: m.update(must_understand=["x", "x"]),
        lambda m: m.update(must_understand=[""]),
        lambda m: m.update(save_id="16E80BF0-9CFE-4E25-9C79-E4C89F79AA36"),
        lambda m: m.update(created="2026-11-21T08:36:42+01:00"),
        lambda m: m["writer"].update(name=""),
        lambda m: m["provenance"].pop("world_size"),
        lambda m: m.update(lists=[[1.5]]),
        lambda m: _entry({"attributes": {"tessera": m}}, "tensor").update(dtype="float8_e4m3"),
        lambda m: _entry({"attributes": {"tessera": m}}, "tensor").update(origin="jax"),
        lambda m: _entry({"attributes": {"tessera": m}}, "tensor").update(chunk_count=-1),
        lambda m: _entry({"attributes": {"tessera": m}}, "tensor").update(
            codecs=[{"name": "gzip"}, {"name": "crc32c"}]
        ),
        lambda m: _entry({"attributes": {"tessera": m}}, "tensor").update(codecs=[{"name": "crc32c"}]),
        lambda m: _entry({"attributes": {"tessera": m}}, "object").update(encoding="marshal"),
        lambda m: _entry({"attributes": {"tessera": m}}, "value").pop("value"),
    ],
    ids=[
        "format",
        "version-3-parts",
        "version-leading-zero",
        "must_understand-dup",
        "must_understand-empty",
        "save_id-upper",
        "created-offset",
        "writer-name",
        "world_size",
        "list-key",
        "float8_e4m3-R7_8",
        "origin",
        "chunk_count",
        "codec-name",
        "one-codec",
        "object-encoding",
        "value-missing",
    ],
)
def test_manifest_schema_refuses(root_doc: dict[str, Any], mutate: Any) -> None:
    doc = copy.deepcopy(root_doc)
    mutate(doc["attributes"]["tessera"])
    assert _errors("root", doc)


def test_manifest_schema_allows_unknown_members_R3_18(root_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(root_doc)
    doc["attributes"]["tessera"]["future"] = {"x": 1}
    _entry(doc, "tensor")["digest"] = "abc"
    doc["attributes"]["other"] = 1
    assert _errors("root", doc) == []


@pytest.mark.parametrize(
    ("name", "doc"),
    [
        ("array", {"zarr_format": 3, "node_type": "array"}),
        ("group", {"zarr_format": 2, "node_type": "group"}),
        ("group", {"zarr_format": 3, "node_type": "array"}),
        (
            "claim",
            {"format": "tessera", "created": "2026-11-21T00:00:00Z", "writer": {"name": "x", "version": ""}},
        ),
        (
            "claim",
            {
                "format": "other",
                "save_id": "16e80bf0-9cfe-4e25-9c79-e4c89f79aa36",
                "created": "2026-11-21T00:00:00Z",
                "writer": {"name": "x", "version": ""},
            },
        ),
    ],
)
def test_other_schemas_refuse(name: str, doc: dict[str, Any]) -> None:
    assert _errors(name, doc)


def test_array_schema_refuses_extra_members(written: Path) -> None:
    path = next(p for p in written.rglob("zarr.json") if read_json(p).get("node_type") == "array")
    doc = read_json(path)
    for mutate in (
        lambda d: d.update(extra=1),
        lambda d: d.update(chunk_grid={"name": "rectilinear", "configuration": {"chunk_shape": [1]}}),
        lambda d: d.update(storage_transformers=[{}]),
        lambda d: d.update(codecs=[d["codecs"][0]]),
        lambda d: d.update(data_type="float8_e4m3"),
    ):
        bad = copy.deepcopy(doc)
        mutate(bad)
        assert _errors("array", bad), bad
