"""The root document and the manifest's header against what the case asked to write (spec §3.1-§3.8, §12).

Schema violations cite the rule of the member they sit in (a bad ``save_id``
is R3.3, a bad entry path R3.11), so that a case citing one rule sees its own
findings; what the schemas cannot say (a version 4 UUID, ``"1.1"`` or ``"1.2"``,
the case's world size, metadata and lists, the manifest digest) is checked here by hand.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessera.format import key_to_path

from .documents import ROOT, UNREADABLE, read_document, same_json, schema_findings
from .entries import key_path
from .expected import ExpectedCheckpoint
from .findings import Findings, shown

__all__ = ["check_root"]

_MANIFEST = "$.attributes.tessera"
_HEADER_RULES = {
    "save_id": "R3.3",
    "created": "R3.4",
    "format_version": "R12.5",
    "must_understand": "R12.5",
    "manifest_digest": "R3.20",
    "provenance": "R3.5",
    "metadata": "R3.6",
    "lists": "R3.8",
    "tuples": "R3.8",
}
_ENTRY_RULES = {"key": "R3.7", "path": "R3.11", "codecs": "R6.1", "chunk_crc32c": "R3.19", "tuples": "R3.22"}
WRITTEN_VERSIONS = ("1.1", "1.2")
"""The versions a writer under test may write: this suite's (1.2) and the one before it."""
_KIND_RULES = {"tensor": "R3.14", "object": "R3.15", "value": "R3.16"}
_ENTRY_PATH = re.compile(r"\.entries\[(\d+)\](?:\.(\w+))?")
_MEMBER_PATH = re.compile(r"\.(\w+)")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ROOT_MEMBERS = {"zarr_format", "node_type", "attributes"}


def check_root(root: Path, expected: ExpectedCheckpoint, out: Findings) -> dict[str, Any] | None:
    """R2.2, R3.1-R3.8, R12.5: the manifest, if the root document is sound enough to go on; else ``None``."""
    if not (root / ROOT).exists() and not (root / ROOT).is_symlink():
        out.add("R2.2", f"there is no root {ROOT}: the checkpoint was never committed (R9.9)")
        return None
    doc = read_document(root, ROOT, "R2.2", out)
    if doc is UNREADABLE:
        return None
    if not isinstance(doc, dict):
        out.add("R3.1", f"{ROOT} is {shown(doc)}, not a JSON object")
        return None
    schema_findings(doc, "root", ROOT, _rule_of(doc), out)
    if isinstance(doc.get("zarr_format"), float):  # the schema's const 3 lets 3.0 pass
        out.add("R3.7", f"{ROOT} has zarr_format {doc['zarr_format']}; integers are written without fraction")
    extra = sorted(set(doc) - _ROOT_MEMBERS)
    if extra:
        out.add("R3.1", f"{ROOT} has members {extra} besides zarr_format, node_type and attributes")
    attributes = doc.get("attributes")
    if not isinstance(attributes, dict) or not isinstance(attributes.get("tessera"), dict):
        return None
    extra = sorted(set(attributes) - {"tessera"})
    if extra:
        out.add("R3.1", f"{ROOT} has attributes {extra} besides tessera")
    manifest: dict[str, Any] = attributes["tessera"]
    _check_header(manifest, expected, out)
    _check_digest((root / ROOT).read_bytes(), manifest.get("manifest_digest"), out)
    return manifest


def _check_digest(data: bytes, value: Any, out: Findings) -> None:
    """R3.20, by the spec's own words: ``sha256:`` and the SHA-256 of the file's bytes with the 64
    digits read as ASCII ``0``, the value once in the file, unescaped."""
    if value is None:
        out.add("R3.20", "the manifest has no manifest_digest; a 1.1 writer writes one")
        return
    if not isinstance(value, str) or _DIGEST.fullmatch(value) is None:
        out.add("R3.20", f"manifest_digest is {shown(value)}, not 'sha256:' and 64 lowercase hex digits")
        return
    literal = f'"{value}"'.encode()
    count = data.count(literal)
    if count != 1:
        out.add("R3.20", f"the manifest_digest value occurs {count} times in {ROOT}'s bytes, not once")
        return
    at = data.index(literal) + len('"sha256:')
    actual = hashlib.sha256(data[:at] + b"0" * 64 + data[at + 64 :]).hexdigest()
    if "sha256:" + actual != value:
        out.add("R3.20", f"manifest_digest is {value}, but {ROOT}'s bytes give sha256:{actual}")


def _rule_of(doc: dict[str, Any]) -> Callable[[str], str]:
    """The rule a schema violation at a JSON path of the root document breaks."""

    def rule(json_path: str) -> str:
        if not json_path.startswith(_MANIFEST):
            return "R3.1"
        rest = json_path[len(_MANIFEST) :]
        entry = _ENTRY_PATH.match(rest)
        if entry:
            if entry.group(2) in _ENTRY_RULES:
                return _ENTRY_RULES[entry.group(2)]
            item = doc["attributes"]["tessera"]["entries"][int(entry.group(1))]
            kind = item.get("kind") if isinstance(item, dict) else None
            return _KIND_RULES.get(kind, "R3.10") if isinstance(kind, str) else "R3.10"
        member = _MEMBER_PATH.match(rest)
        return _HEADER_RULES.get(member.group(1), "R3.2") if member else "R3.2"

    return rule


def _check_header(manifest: dict[str, Any], expected: ExpectedCheckpoint, out: Findings) -> None:
    """What the schema leaves open: version "1.1" or "1.2", a v4 save id, the case's world size,
    metadata, lists. A 1.1 writer is still a conforming writer: the cases' states hold no tuples
    (the protocol's JSON has none), so the two write the same data (spec R12.6)."""
    version = manifest.get("format_version")
    if isinstance(version, str) and version not in WRITTEN_VERSIONS:
        out.add("R12.5", f"format_version is {version!r}; a writer writes one of {list(WRITTEN_VERSIONS)}")
    understood = manifest.get("must_understand")
    if isinstance(understood, list) and understood:
        out.add("R12.5", f"must_understand is {shown(understood)}; a 1.1 or 1.2 writer writes []")
    if manifest.get("tuples", []) != []:
        out.add("R3.8", f"tuples is {shown(manifest['tuples'])}; the case's state holds no tuple container")
    save_id = manifest.get("save_id")
    if (
        isinstance(save_id, str)
        and _UUID.fullmatch(save_id)
        and (save_id[14] != "4" or save_id[19] not in "89ab")
    ):
        out.add("R3.3", f"save_id {save_id} is not a random (version 4) UUID")
    provenance = manifest.get("provenance")
    world_size = provenance.get("world_size") if isinstance(provenance, dict) else None
    if type(world_size) is int and world_size != expected.world_size:
        rule = "R16.8" if expected.world_size > 1 else "R3.5"
        ranks = f"{expected.world_size} rank{'s' if expected.world_size > 1 else ''}"
        out.add(rule, f"provenance.world_size is {world_size}; the case wrote it from {ranks}")
    metadata = manifest.get("metadata")
    if isinstance(metadata, dict) and not same_json(metadata, expected.metadata):
        out.add("R3.6", f"metadata is {shown(metadata)}; the case gave {shown(expected.metadata)}")
    _check_lists(manifest.get("lists"), expected, out)


def _check_lists(lists: Any, expected: ExpectedCheckpoint, out: Findings) -> None:
    """R3.8: the list containers, in any order, each once."""
    if not isinstance(lists, list):
        return
    paths = [key_path(k) for k in lists]
    got = {p for p in paths if p is not None}
    want = {key_to_path(k) for k in expected.lists}
    for path in sorted(want - got):
        out.add("R3.8", f"lists lacks {path}, a list of the state")
    for path in sorted(got - want):
        out.add("R3.8", f"lists names {path}, which is not a list of the state")
    twice = sorted(p for p, n in Counter(paths).items() if p is not None and n > 1)
    if twice:
        out.add("R3.8", f"lists names {twice} more than once")
