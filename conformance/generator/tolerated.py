"""Valid checkpoints that differ from what the reference writes, in ways readers must accept or
ignore: a newer minor version, unknown files, other spellings of a document, no claim, no group
documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tessera.format import reseal_root

from .bases import save_base
from .damage import edit_json, edit_manifest
from .data import tensor
from .vector import VectorWriter

__all__ = ["build"]


def build(out: Path) -> None:
    """Write every vector of this module under ``out/valid``."""
    for builder in (
        _newer_minor,
        _extra_files,
        _zarr_json_spellings,
        _json_formatting,
        _no_claim,
        _no_group_docs,
    ):
        builder(out)


def _newer_minor(out: Path) -> None:
    v = VectorWriter(out, "valid", "newer-minor")
    save_base(v)

    def newer(manifest: dict[str, Any]) -> None:
        manifest["format_version"] = "1.7"
        manifest["signature"] = {"alg": "ed25519", "value": "AAAA"}
        manifest["writer"]["build"] = "abc123"
        manifest["provenance"]["hosts"] = ["node-0"]
        for entry in manifest["entries"]:
            entry["digest"] = "sha256:0000"

    edit_manifest(v.checkpoint, newer)
    edit_json(v.checkpoint / "zarr.json", lambda doc: doc["attributes"].update(other_tool={"x": 1}))
    v.finish(
        "format 1.7 with members 1.0 does not know (manifest, writer, provenance, entries, root "
        "attributes) and must_understand []: read as 1.0",
        ["R12.3", "R3.18", "R3.1", "R12.6"],
        [v.read(), v.verify()],
    )


def _extra_files(out: Path) -> None:
    v = VectorWriter(out, "valid", "extra-files")
    save_base(v)
    extras = {
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        ".tessera-lock": b"",
        "zarr.json.0a1b2c3d.tmp": b'{"not": ',
        "zarr.json.bak": b"garbage",
        "README.txt": b"notes about this run\n",
        "notes/todo.md": b"- check the loss\n",
        "w/NOTES.txt": b"an unknown file inside an array folder, outside c/\n",
        "grp/.hidden": b"x",
        "orphan/zarr.json": json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode(),
        "orphan/x/zarr.json": b'{"zarr_format": 3, "node_type": "array"}',
    }
    for name, data in extras.items():
        (v.checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (v.checkpoint / name).write_bytes(data)
    v.finish(
        "files the format does not name (dot files, zarr.json.*.tmp, unknown files and folders, a node "
        "the manifest does not list): readers ignore them and never list the storage",
        ["R2.6"],
        [v.read(), v.verify()],
    )


def _zarr_json_spellings(out: Path) -> None:
    v = VectorWriter(out, "valid", "zarr-json-spellings")
    state = {
        "a": tensor("float32", (2, 3), 110),
        "b": tensor("int16", (4,), 111),
        "c": tensor("bfloat16", (3,), 112),
        "d": tensor("uint8", (2, 2), 113),
    }
    v.save(state)
    ckpt = v.checkpoint
    edit_json(ckpt / "a" / "zarr.json", lambda d: d.update(chunk_key_encoding={"name": "default"}))
    edit_json(ckpt / "b" / "zarr.json", lambda d: d.update(dimension_names=None))
    edit_json(ckpt / "c" / "zarr.json", lambda d: d.update(storage_transformers=[]))
    doc = json.loads((ckpt / "d" / "zarr.json").read_bytes())
    doc["attributes"] = {"note": "user attributes, which readers ignore"}
    reordered = dict(reversed(list(doc.items())))
    (ckpt / "d" / "zarr.json").write_text(json.dumps(reordered, indent=4) + "\n", encoding="utf-8")
    v.finish(
        "array zarr.json spellings readers accept: chunk_key_encoding without configuration, "
        "dimension_names null, storage_transformers [], other member order and whitespace, user attributes",
        ["R5.10", "R5.11", "R2.8"],
        [v.read(), v.verify()],
    )


def _json_formatting(out: Path) -> None:
    v = VectorWriter(out, "valid", "json-formatting")
    v.save({"w": tensor("float32", (2, 2), 120), "ü": {"n": tensor("int8", (3,), 121), "s": "é"}})
    root = v.checkpoint / "zarr.json"
    doc = json.loads(root.read_bytes())
    manifest = doc["attributes"]["tessera"]
    doc["attributes"]["tessera"] = dict(reversed(list(manifest.items())))
    text = json.dumps(dict(reversed(list(doc.items()))), indent="\t", ensure_ascii=True)
    root.write_bytes(reseal_root(("\n  " + text + "\r\n\n").encode()))  # the digest covers every byte
    v.finish(
        "a root zarr.json with other member order, tabs, CRLF and \\u escapes for non-ASCII keys",
        ["R2.8", "R11.4"],
        [v.read(), v.verify()],
    )


def _no_claim(out: Path) -> None:
    v = VectorWriter(out, "valid", "no-claim")
    save_base(v)
    (v.checkpoint / ".tessera-claim.json").unlink()
    v.finish(
        "no claim file (copies may drop dot files): readers do not need it",
        ["R9.12", "R2.6"],
        [v.read(), v.verify()],
    )


def _no_group_docs(out: Path) -> None:
    v = VectorWriter(out, "valid", "no-group-docs")
    save_base(v)
    (v.checkpoint / "grp" / "zarr.json").unlink()
    v.finish(
        "the group document grp/zarr.json is missing: readers do not need it (one that validates groups "
        "refuses it as inconsistent), a verifier reports it",
        ["R2.7"],
        [v.read(or_error="inconsistent"), v.verify("inconsistent", rules=["R11.9"])],
    )
