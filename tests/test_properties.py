"""Property-based tests (hypothesis) of every decoder of untrusted bytes (issue 15, spec §11, §13).

Each decoder of the reader, given arbitrary or mutated input, either gives back a valid object
or raises a :class:`tessera.TesseraError`, never anything else: the root manifest
(``check_root_document``: strict JSON, version, schema, entries), the array ``zarr.json`` check,
the chunk decoder, keys and paths, and a run directory's ``latest``. Examples are bounded and
derandomized so the file runs in seconds and the same on every machine.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import crc32c
import pytest
import tessera
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tessera.format.chunk_codec import decode_chunk
from tessera.format.dtypes import DTYPES
from tessera.format.keys import key_to_path, path_to_key
from tessera.format.layout import ArrayLayout
from tessera.format.manifest import Manifest
from tessera.format.root import check_root_document
from tessera.format.strict_json import loads

from fuzz.states import make_checkpoint

FAST = settings(
    max_examples=150,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "tensor",
            "object",
            "value",
            "float32",
            "uint8",
            "bool",
            "crc32c",
            "zstd",
            "NaN",
            "json",
            "bytes",
            "pickle",
            "tessera",
            "1.0",
            "1.1",
            "~0",
            "..",
            "a/b",
            "c",
        ]
    ),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@pytest.fixture(scope="module")
def root_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = make_checkpoint(tmp_path_factory.mktemp("prop") / "ckpt", "small", compression="zstd")
    return (path / "zarr.json").read_bytes()


def _refused_or_valid(call: Any, valid: type | tuple[type, ...] | None = None) -> None:
    try:
        result = call()
    except tessera.TesseraError:
        return
    if valid is not None:
        assert isinstance(result, valid), f"returned {type(result).__name__}"


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every node's path in a JSON document, the root first."""
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*prefix, i))
    return found


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return doc


@st.composite
def mutated_json(draw: st.DrawFn, original: Any) -> Any:
    """``original`` with one to three nodes replaced by arbitrary JSON (or deleted)."""
    doc = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        if path and draw(st.booleans()) and isinstance(_parent(doc, path), dict):
            del _parent(doc, path)[path[-1]]
        else:
            doc = _replace(doc, path, draw(JSON))
    return doc


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    node = doc
    for step in path[:-1]:
        node = node[step]
    return node


# ---- the root manifest (R11.1-R11.4, R3)


@FAST
@given(data=st.binary(max_size=2000))
def test_root_document_arbitrary_bytes(data: bytes) -> None:
    _refused_or_valid(lambda: check_root_document(data, "zarr.json"), Manifest)


@FAST
@given(data=st.data())
def test_root_document_mutated_json(root_bytes: bytes, data: st.DataObject) -> None:
    doc = data.draw(mutated_json(json.loads(root_bytes)))
    text = json.dumps(doc).encode()
    _refused_or_valid(lambda: check_root_document(text, "zarr.json"), Manifest)


@FAST
@given(data=st.data())
def test_root_document_mutated_manifest_entries(root_bytes: bytes, data: st.DataObject) -> None:
    """Mutations aimed at the manifest's entries, lists and metadata, where the parser works hardest."""
    doc = json.loads(root_bytes)
    manifest = doc["attributes"]["tessera"]
    field = data.draw(st.sampled_from(["entries", "lists", "metadata", "provenance", "writer"]))
    manifest[field] = data.draw(mutated_json(manifest[field]))
    text = json.dumps(doc).encode()
    _refused_or_valid(lambda: check_root_document(text, "zarr.json"), Manifest)


@FAST
@given(data=st.data())
def test_root_document_mutated_bytes(root_bytes: bytes, data: st.DataObject) -> None:
    raw = bytearray(root_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    _refused_or_valid(lambda: check_root_document(bytes(raw), "zarr.json"), Manifest)


@FAST
@given(data=st.binary(max_size=500))
def test_strict_json_arbitrary_bytes(data: bytes) -> None:
    _refused_or_valid(lambda: loads(data, "doc.json"))


# ---- the array document check (R5.10)


LAYOUTS = [
    ArrayLayout(DTYPES[i % len(DTYPES)], shape, chunk, level)
    for i, (shape, chunk, level) in enumerate(
        [((4, 6), (1, 6), None), ((7,), (3,), 3), ((), (), None), ((0, 2), (1, 2), 1)]
    )
]


@FAST
@given(layout=st.sampled_from(LAYOUTS), data=st.data())
def test_array_document_mutated(layout: ArrayLayout, data: st.DataObject) -> None:
    doc = data.draw(mutated_json(layout.zarr_json()))
    _refused_or_valid(lambda: layout.check_zarr_json(doc, "w/zarr.json"))


@FAST
@given(layout=st.sampled_from(LAYOUTS), doc=JSON)
def test_array_document_arbitrary(layout: ArrayLayout, doc: Any) -> None:
    _refused_or_valid(lambda: layout.check_zarr_json(doc, "w/zarr.json"))


# ---- the chunk decoder (R6.4-R6.8)


@FAST
@given(layout=st.sampled_from(LAYOUTS), body=st.binary(max_size=300), with_crc=st.booleans())
def test_chunk_decoder(layout: ArrayLayout, body: bytes, with_crc: bool) -> None:
    """Arbitrary bytes, with a valid CRC appended half the time so that decoding proper runs."""
    raw = body + struct.pack("<I", crc32c.crc32c(body)) if with_crc else body
    try:
        decoded = decode_chunk(raw, layout, "w/c/0")
    except tessera.TesseraError:
        return
    assert decoded.shape == layout.chunk_shape
    assert decoded.nbytes == math.prod(layout.chunk_shape) * layout.dtype.itemsize


# ---- keys and paths (R4)


COMPONENTS = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=2), max_size=2),
)


@FAST
@given(path=st.one_of(st.text(max_size=60), st.text(alphabet="a~%0123456789ABCDEF./_-", max_size=40)))
def test_path_to_key(path: str) -> None:
    try:
        key = path_to_key(path)
    except tessera.TesseraError:
        return
    assert key_to_path(key) == path


@FAST
@given(key=st.lists(COMPONENTS, max_size=6))
def test_key_to_path(key: list[Any]) -> None:
    try:
        path = key_to_path(key)
    except tessera.TesseraError:
        return
    assert path_to_key(path) == tuple(key)


# ---- a run directory's latest (R10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    make_checkpoint(run / "step-00000001", "tiny")
    return run


@FAST
@given(
    pointer=st.one_of(
        st.binary(max_size=400),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from(
            [
                b"step-00000001\n",
                b"step-00000001",
                b"..",
                b".",
                b"/etc",
                b"step-00000002\n",
                b"step-" + b"9" * 400,
                b"\xff\xfe",
                b"",
                b"\n\n",
                b"step-00000001/..\n",
            ]
        ),
    )
)
def test_latest_pointer(run_dir: Path, pointer: bytes) -> None:
    latest = run_dir / "latest"
    if latest.is_dir() and not latest.is_symlink():
        shutil.rmtree(latest)
    latest.write_bytes(pointer)
    run = tessera.RunDirectory(run_dir)
    try:
        found = run.latest()
    except tessera.TesseraError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert found is None or found == run_dir / "step-00000001"
    run.checkpoints()
