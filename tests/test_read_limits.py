"""Work a manifest asks for is bounded before it starts (spec R11.6, issue 15 point 2).

Each case is a small hostile manifest that used to cost minutes or gigabytes (a grid of 2^24
chunks, a 2^34-element array, a key of 100,000 components, 32 MiB of empty objects) or to
crash with a non-Tessera exception; each must now fail with its ``TesseraError`` within 5 s
and a bounded amount of Python memory.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera import ReaderLimits
from tessera.format.limits import physical_memory

from .conftest import edit_manifest, read_json, write_json

BOUND_S = 5.0
BOUND_BYTES = 256 * 2**20


@contextmanager
def bounded() -> Iterator[None]:
    """Fail if the block takes over 5 s or its Python allocations peak over 256 MiB."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < BOUND_S, f"took {elapsed:.1f} s"
    assert peak < BOUND_BYTES, f"peak {peak / 2**20:.0f} MiB"


def _refused(call: Callable[[], Any], code: str) -> tessera.TesseraError:
    with bounded(), pytest.raises(tessera.TesseraError) as info:
        call()
    assert info.value.code == code, info.value
    return info.value


def _declare(root: Path, path: str, shape: list[int], chunk_shape: list[int]) -> None:
    """Make the array at ``path`` declare ``shape`` and ``chunk_shape`` in the manifest and in
    its own ``zarr.json`` (consistently), and delete its chunks.

    The manifest becomes a 1.0 one (no chunk lists, no digest): a 1.1 chunk list holds 8 hex
    digits per chunk (R3.19), so a small 1.1 manifest cannot declare millions of chunks (that
    is refused when the manifest is parsed, see ``test_small_1_1_manifest_cannot_declare_...``);
    a 1.0 manifest can, and it is what must reach the read path's own bounds."""
    layout = tessera.open(root).entry(path).layout  # an array entry
    declared = dataclasses.replace(layout, shape=tuple(shape), chunk_shape=tuple(chunk_shape))

    def edit(manifest: dict[str, Any]) -> None:
        manifest["format_version"] = "1.0"
        manifest.pop("manifest_digest")
        for entry in manifest["entries"]:
            entry.pop("chunk_crc32c", None)
            if entry["path"] == path:
                entry.update(shape=shape, chunk_shape=chunk_shape, chunk_count=declared.chunk_count)

    edit_manifest(root, edit)
    write_json(root / path / "zarr.json", declared.zarr_json())
    for chunk in (root / path / "c").iterdir():
        chunk.unlink()


@pytest.fixture
def small(tmp_path: Path) -> Path:
    tessera.save({"w": torch.zeros(4), "n": 1}, tmp_path / "ck")
    return tmp_path / "ck"


def test_small_1_1_manifest_cannot_declare_2_24_chunks_R3_19(small: Path) -> None:
    """In a 1.1 manifest, declaring 2^24 chunks without listing their CRCs is refused while the
    manifest is parsed (``inconsistent``), before any chunk is looked at."""

    def edit(manifest: dict[str, Any]) -> None:
        for entry in manifest["entries"]:
            if entry["path"] == "w":
                entry.update(shape=[2**24], chunk_shape=[1], chunk_count=2**24)

    edit_manifest(small, edit)
    error = _refused(lambda: tessera.open(small), "inconsistent")
    assert "chunk_crc32c" in str(error)


def test_grid_of_2_24_chunks_fails_fast_R11_6(small: Path) -> None:
    """A 1 KB manifest declaring 2^24 chunks: the first missing chunk fails the load at once
    (no task per chunk is built first), and verify names a few and counts the rest."""
    _declare(small, "w", [2**24], [1])
    assert (small / "zarr.json").stat().st_size < 2048
    error = _refused(lambda: tessera.load(small), "missing_chunk")
    # One of the first chunks the read threads took (each takes at most one after a failure),
    # not one found after walking the grid.
    first = re.search(r"w chunk c/([0-9]+) ", str(error))
    assert first is not None and int(first.group(1)) < 64, error
    _refused(lambda: tessera.load(small, {"w": torch.empty(2**24)}), "missing_chunk")
    with bounded():
        report = tessera.verify(small)
    assert {p.code for p in report.problems} == {"missing_chunk"}
    assert len(report.problems) == 17
    assert f"{2**24 - 16} more of its {2**24} chunks are missing" in report.problems[-1].message


def test_declared_huge_array_refused_before_allocating_R11_6(small: Path) -> None:
    """A declared 2^34-element array: a load into a new dict (or ``Checkpoint.read``) refuses
    with ``limit_exceeded`` before allocating; a template allocates nothing and is not refused."""
    _declare(small, "w", [2**34], [2**20])
    limits = ReaderLimits(max_load_bytes=2**30)
    error = _refused(lambda: tessera.load(small, limits=limits), "limit_exceeded")
    assert "max_load_bytes" in str(error)
    ck = tessera.open(small, limits=limits)
    _refused(lambda: ck.read("w"), "limit_exceeded")
    _refused(lambda: ck.read("w", [slice(0, 2**31)]), "limit_exceeded")
    _refused(lambda: ck.read("w", [slice(0, 8)]), "missing_chunk")  # a small region is read


def test_max_load_bytes_defaults_to_physical_memory_R11_6() -> None:
    assert ReaderLimits().max_load_bytes == physical_memory() > 2**26


def test_key_of_100000_components_refused_R11_6(small: Path) -> None:
    """A 300 KB key of 100,000 components: ``limit_exceeded`` (max_key_depth) at once."""

    def deep(manifest: dict[str, Any]) -> None:
        entry = next(e for e in manifest["entries"] if e["path"] == "n")
        entry.update(key=["a"] * 100_000, path="/".join(["a"] * 100_000))

    edit_manifest(small, deep)
    error = _refused(lambda: tessera.open(small), "limit_exceeded")
    assert "max_key_depth" in str(error)


def test_deep_keys_within_the_limit_load(tmp_path: Path) -> None:
    """Keys of 100 components (under max_key_depth) save, verify and load as usual."""
    state: dict[str, Any] = {"leaf": torch.ones(2)}
    for depth in range(99):
        state = {f"d{depth}": state}
    tessera.save(state, tmp_path / "deep")
    assert tessera.verify(tmp_path / "deep").ok
    loaded = tessera.load(tmp_path / "deep")
    for depth in reversed(range(99)):
        loaded = loaded[f"d{depth}"]
    assert torch.equal(loaded["leaf"], torch.ones(2))


def test_32_mib_of_empty_objects_refused_before_parsing_R11_5(small: Path) -> None:
    """User metadata of 32 MiB of ``{}`` (1.5 GiB once parsed): ``limit_exceeded`` unparsed."""
    doc = read_json(small / "zarr.json")
    count = 11 * 2**20
    doc["attributes"]["tessera"]["metadata"] = {"x": "@"}
    text = json.dumps(doc, separators=(",", ":")).replace('"@"', "[" + ",".join(["{}"] * count) + "]")
    (small / "zarr.json").write_text(text)
    assert (small / "zarr.json").stat().st_size > 32 * 2**20
    error = _refused(lambda: tessera.open(small), "limit_exceeded")
    assert "objects and arrays" in str(error)


def test_braces_inside_strings_do_not_count_R11_5(small: Path) -> None:
    """The container count skips strings: metadata holding ``{[`` text loads under a small limit."""

    def braces(manifest: dict[str, Any]) -> None:
        manifest["metadata"] = {"text": "{[" * 5000 + '\\"{'}

    edit_manifest(small, braces)
    limits = ReaderLimits(max_json_containers=100)
    assert tessera.open(small, limits=limits).metadata["text"].startswith("{[{[")
    edit_manifest(small, lambda m: m.update(metadata={"many": [{}] * 200}))
    _refused(lambda: tessera.open(small, limits=limits), "limit_exceeded")


def test_float_value_that_is_a_list_is_schema_violation_R3_16(small: Path) -> None:
    """Was ``TypeError: unhashable type: 'list'`` (issue 15)."""

    def hostile(manifest: dict[str, Any]) -> None:
        entry = next(e for e in manifest["entries"] if e["path"] == "n")
        entry.update(encoding="float", value=["NaN"])

    edit_manifest(small, hostile)
    _refused(lambda: tessera.open(small), "schema_violation")


def test_list_holding_a_string_key_is_inconsistent_R3_8(tmp_path: Path) -> None:
    """``lists`` naming a container with a string child: ``inconsistent`` (was ``TypeError:
    '<' not supported between 'str' and 'int'`` while rebuilding the lists)."""
    tessera.save({"m": {"a": 1, 0: 2}}, tmp_path / "ck")
    edit_manifest(tmp_path / "ck", lambda m: m.update(lists=[["m"]]))
    error = _refused(lambda: tessera.load(tmp_path / "ck"), "inconsistent")
    assert "'m'" in str(error)


def test_allocation_the_machine_cannot_make_is_limit_exceeded(small: Path) -> None:
    """With ``max_load_bytes`` raised past what the machine has, the allocator's failure is
    still a ``limit_exceeded`` error naming the key, not a bare ``RuntimeError`` (issue 15, point 4)."""
    _declare(small, "w", [2**47], [2**28])  # 512 TiB: beyond any address space
    error = _refused(lambda: tessera.load(small, limits=ReaderLimits(max_load_bytes=2**50)), "limit_exceeded")
    assert "w: cannot allocate" in str(error)
