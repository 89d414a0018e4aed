"""Format 1.2 tuples (spec R3.8, R3.22): a checkpoint holding them, one of format 1.1 that a 1.2
reader still reads, and damaged records of them, which a reader refuses before reading any data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bases import save_base
from .damage import edit_manifest
from .data import tensor
from .vector import VectorWriter

__all__ = ["build"]

Change = Callable[[dict[str, Any]], Any]


def build(out: Path) -> None:
    """Write every vector of this module under ``out``."""
    _tuples(out)
    _format_1_1(out)
    for name, group, error, title, change in _DAMAGED:
        _damaged(out, name, group, error, title, change)


def _state() -> dict[str, Any]:
    return {
        "pair": (tensor("float32", (2,), 201), (tensor("int64", (3,), 202), 7)),
        "rng": (3, tuple(range(10)), None),
        "config": {"betas": (0.9, 0.95), "groups": [{"shape": (2, 3)}, ()], "name": "x"},
        "plain": [1, [2]],
    }


def _tuples(out: Path) -> None:
    v = VectorWriter(out, "valid", "tuples")
    v.save(_state())
    v.finish(
        "format 1.2 tuples: a walked tuple of tensors holding a tuple (manifest tuples), and JSON values "
        "whose arrays were tuples at the positions their entries list (a random.getstate()-like value, "
        "betas, tuples inside lists inside objects, an empty tuple)",
        ["R3.8", "R3.22", "R8.2", "R8.8", "R12.5"],
        [v.read(), v.verify()],
    )


def _as_1_1(manifest: dict[str, Any]) -> None:
    manifest["format_version"] = "1.1"
    del manifest["tuples"]
    for entry in manifest["entries"]:
        entry.pop("tuples", None)


def _format_1_1(out: Path) -> None:
    v = VectorWriter(out, "valid", "format-1.1")
    save_base(v, blob=True)
    edit_manifest(v.checkpoint, _as_1_1)
    v.finish(
        "a checkpoint of format 1.1 (no tuples members): a 1.2 reader reads it, lists for tuples",
        ["R12.3", "R12.5"],
        [v.read(), v.verify()],
    )


def _value(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(e for e in manifest["entries"] if e["key"] == [key])
    return entry


_DAMAGED: tuple[tuple[str, str, str, str, Change], ...] = (
    ("tuples-not-in-lists", "invalid", "inconsistent",
     'manifest tuples names ["config"], which is a value, not a key of lists (R3.8)',
     lambda m: m["tuples"].append(["config"])),
    ("tuple-position-not-array", "invalid", "inconsistent",
     'the rng value lists the position [0], which holds the number 3, not an array (R3.22)',
     lambda m: _value(m, "rng")["tuples"].append([0])),
    ("tuple-position-missing", "invalid", "inconsistent",
     'the config value lists the position ["nope"], a member it does not have (R3.22)',
     lambda m: _value(m, "config")["tuples"].append(["nope"])),
    ("tuple-position-wrong-step", "invalid", "inconsistent",
     'the config value lists the position [0]: an integer step into an object (R3.22)',
     lambda m: _value(m, "config")["tuples"].append([0])),
    ("tuples-missing", "malformed", "schema_violation",
     "a 1.2 manifest without its tuples member (R3.2, R12.5)",
     lambda m: m.pop("tuples")),
    ("tuple-positions-duplicate", "malformed", "schema_violation",
     "the rng value lists the position [] twice (R3.22)",
     lambda m: _value(m, "rng")["tuples"].append([])),
)  # fmt: skip


def _damaged(out: Path, name: str, group: str, error: str, title: str, change: Change) -> None:
    v = VectorWriter(out, group, name)
    v.save(_state())
    edit_manifest(v.checkpoint, change)
    v.finish(title, ["R3.8", "R3.22", "R11.1"], [v.read(error=error), v.verify(error)])
