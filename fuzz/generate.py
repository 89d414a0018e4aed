"""Preparing a corpus case to run: its committed files copied to a scratch directory, then what git
cannot hold (special files, symbolic links, sparse files) and what is too large to commit (a
1,500-tensor checkpoint, a 32 MiB manifest) made at run time, as the case's ``expect.json`` says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import tessera
import torch

from .sealing import read_root, upgrade, write_root
from .special_files import make_special
from .states import METADATA, template_of

__all__ = ["prepare_case", "template_for", "load_expect", "CORPUS", "many_tensors_state", "NEEDS_ROOT"]

CORPUS = Path(__file__).resolve().parent / "corpus"
NEEDS_ROOT = frozenset({"chardev"})
"""Special files only root can make: a case using one is skipped elsewhere, with that reason."""


def load_expect(case: Path) -> dict[str, Any]:
    expect: dict[str, Any] = json.loads((case / "expect.json").read_text(encoding="utf-8"))
    return expect


def many_tensors_state(count: int) -> dict[str, Any]:
    return {f"t{i:05d}": torch.full((4,), float(i)) for i in range(count)}


def template_for(state: str) -> dict[str, Any]:
    """The load template of a case's ``state``: a named state of :mod:`fuzz.states`, or ``many:N``."""
    if state.startswith("many:"):
        return {k: torch.zeros_like(v) for k, v in many_tensors_state(int(state[5:])).items()}
    return template_of(state)


def _generate(root: Path, spec: dict[str, Any], cache: Path) -> None:
    kind = spec["kind"]
    target = root / spec.get("path", "ckpt")
    if kind == "many_tensors":
        source = cache / f"many-{spec['tensors']}"
        if not source.exists():
            tessera.save(many_tensors_state(spec["tensors"]), source.with_suffix(".tmp"))
            write_root(source.with_suffix(".tmp"), upgrade(source.with_suffix(".tmp")))
            source.with_suffix(".tmp").rename(source)
        shutil.copytree(source, target, symlinks=True)
        first = read_root(target)["attributes"]["tessera"]["entries"][0]["path"]
        damage = spec["damage"]
        if damage == "flip":
            chunk = target / first / "c" / "0"
            data = bytearray(chunk.read_bytes())
            data[0] ^= 0x01
            chunk.write_bytes(bytes(data))
        elif damage == "delete":
            (target / first / "c" / "0").unlink()
        elif damage == "array_json":
            doc = json.loads((target / first / "zarr.json").read_text())
            doc["shape"] = [5]
            (target / first / "zarr.json").write_text(json.dumps(doc))
        else:
            raise ValueError(f"unknown damage {damage!r}")
        return
    doc = read_root(target)
    manifest = doc["attributes"]["tessera"]
    if kind == "many_entries":  # valid value entries, the last one repeating the first's key
        count = spec["count"]
        manifest["entries"] = [
            {"kind": "value", "key": [f"v{i:06d}"], "path": f"v{i:06d}", "encoding": "json", "value": i}
            for i in range(count - 1)
        ] + [{"kind": "value", "key": ["v000000"], "path": "v000000", "encoding": "json", "value": 0}]
        manifest["lists"] = []
    elif kind == "long_key":
        components = ["a"] * spec["components"]
        manifest["entries"].append(
            {"kind": "value", "key": components, "path": "/".join(components), "encoding": "json", "value": 1}
        )
    elif kind == "huge_metadata":
        count = spec["mib"] * 2**20 // 3  # "{}," per empty object
        manifest["metadata"] = {**METADATA, "blob": [{}] * count}
    else:
        raise ValueError(f"unknown generator {kind!r}")
    write_root(target, json.dumps(doc, separators=(",", ":")).encode("utf-8"))


def prepare_case(case: Path, scratch: Path, cache: Path) -> Path:
    """A runnable copy of corpus case ``case`` under ``scratch``; returns the copy's directory."""
    expect = load_expect(case)
    root = scratch / case.name
    shutil.copytree(case, root, symlinks=True, ignore=shutil.ignore_patterns("expect.json"))
    for spec in expect.get("generate", []):
        _generate(root, spec, cache)
    for spec in expect.get("setup", []):
        make_special(root / spec["path"], spec)
    return root
