"""Invalid storage: symbolic links, roots that were never committed or do not exist, a foreign claim,
a stray chunk file.

Symbolic links are relative and point at files inside the vector folder, so
that they keep their meaning wherever the folder is copied (with links kept
as links): ``outside/`` is beside ``checkpoint/``, never in it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .bases import GOOD_KEYS, save_base
from .damage import edit_json
from .identity import save_id
from .vector import VectorWriter

__all__ = ["build"]


def build(out: Path) -> None:
    """Write every vector of this module under ``out/invalid``."""
    _symlinks(out)
    _uncommitted(out)
    _not_found(out)
    _claims(out)
    _extra_chunk_file(out)


def _link(link: Path, target: Path) -> None:
    """Replace ``link`` by a relative symbolic link to ``target``, moving the file there first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(link, target)
    os.symlink(os.path.relpath(target, link.parent), link)


def _symlinks(out: Path) -> None:
    cases = [
        ("symlink-chunk-outside", "chunk w/c/0/0 is a symbolic link to a file outside the checkpoint",
         "w/c/0/0", "../outside/0-0"),
        ("symlink-dir-outside", "the directory w/c/1 is a symbolic link to a folder outside the checkpoint",
         "w/c/1", "../outside/c1"),
        ("symlink-chunk-inside", "chunk w/c/1/1 is a symbolic link to a file inside the checkpoint",
         "w/c/1/1", "data/1-1"),
        ("symlink-array-json", "the array zarr.json of w is a symbolic link (inside the checkpoint)",
         "w/zarr.json", "data/w.json"),
        ("symlink-root-json", "the root zarr.json is a symbolic link to a file outside the checkpoint",
         "zarr.json", "../outside/zarr.json"),
    ]  # fmt: skip
    for name, title, source, target in cases:
        v = VectorWriter(out, "invalid", name)
        save_base(v)
        _link(v.checkpoint / source, v.checkpoint / target)
        probes = [v.read(error="bad_key")]
        if source != "zarr.json":
            probes.append(v.read("subset", GOOD_KEYS, rules=["R14.1"]))
        probes.append(v.verify("bad_key"))
        v.finish(f"{title}; the file itself is intact", ["R11.3", "R11.2", "R15.3"], probes)


def _uncommitted(out: Path) -> None:
    cases = [
        ("uncommitted-claimed", "claimed and written, never committed: no root zarr.json", (),
         ("zarr.json",)),
        ("uncommitted-tmp", "the root was written to zarr.json.<save_id>.tmp and never linked to zarr.json",
         (("zarr.json", "zarr.json.{save_id}.tmp"),), ()),
        ("uncommitted-unclaimed", "chunks and array documents, but neither claim nor root zarr.json",
         (), ("zarr.json", ".tessera-claim.json")),
    ]  # fmt: skip
    for name, title, renames, removals in cases:
        v = VectorWriter(out, "invalid", name)
        save_base(v)
        for old, new in renames:
            (v.checkpoint / old).rename(v.checkpoint / new.format(save_id=save_id(f"invalid/{name}")))
        for removed in removals:
            (v.checkpoint / removed).unlink()
        v.finish(title, ["R9.13", "R13.2"], [v.read(error="uncommitted"), v.verify("uncommitted")])


def _not_found(out: Path) -> None:
    v = VectorWriter(out, "invalid", "not-found")
    v.finish(
        "the checkpoint path does not exist",
        ["R9.13"],
        [v.read(error="not_found"), v.verify("not_found")],
    )


def _claims(out: Path) -> None:
    v = VectorWriter(out, "invalid", "claim-mismatch")
    save_base(v)
    edit_json(v.checkpoint / ".tessera-claim.json", lambda d: d.update(save_id=save_id("another save")))
    v.finish(
        "the claim names another save than the manifest: a verifier reports it, a reader MAY refuse",
        ["R9.12", "R11.9"],
        [
            v.read(or_error="inconsistent"),
            v.read("refuse", error="inconsistent", level="MAY"),
            v.verify("inconsistent"),
        ],
    )
    v = VectorWriter(out, "invalid", "claim-schema")
    save_base(v)
    edit_json(v.checkpoint / ".tessera-claim.json", lambda d: d.pop("writer"))
    v.finish(
        "the claim file violates claim.schema.json: a verifier reports it; readers do not need the claim",
        ["R11.9", "R9.12", "R9.1"],
        [v.read(), v.verify("schema_violation")],
    )


def _extra_chunk_file(out: Path) -> None:
    v = VectorWriter(out, "invalid", "extra-chunk-file")
    save_base(v)
    stray = v.checkpoint / "w" / "c" / "2" / "0"
    stray.parent.mkdir()
    shutil.copyfile(v.checkpoint / "w" / "c" / "1" / "0", stray)
    v.finish(
        "a file w/c/2/0 outside the grid of w (2 x 2 chunks): reads ignore it, a verifier reports it",
        ["R11.9", "R2.6"],
        [v.read(), v.verify("inconsistent")],
    )
