"""A backend folder's ``backend.json``: who it is, how to start it, what it claims (P1-P4)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .messages import ProtocolError, check

__all__ = ["Claims", "Declaration", "DeclarationError"]

DEFAULT_TIMEOUT_S = 60.0


class DeclarationError(Exception):
    """The backend folder cannot be used: no ``backend.json``, or one that breaks its schema."""


@dataclass(frozen=True, slots=True)
class Claims:
    roles: frozenset[str]
    """``reader``, ``writer``, ``verifier``."""
    dtypes: frozenset[str]
    features: frozenset[str]
    """``compression``, ``objects``, ``regions``, ``multi_rank``, ``chunk_shapes``."""

    @classmethod
    def from_json(cls, doc: dict[str, list[str]]) -> Claims:
        return cls(frozenset(doc["roles"]), frozenset(doc["dtypes"]), frozenset(doc["features"]))

    def to_json(self) -> dict[str, list[str]]:
        return {"roles": sorted(self.roles), "dtypes": sorted(self.dtypes), "features": sorted(self.features)}


@dataclass(frozen=True, slots=True)
class Declaration:
    folder: Path
    name: str
    version: str
    command: tuple[str, ...] | None
    """The argument vector that starts a subprocess backend, run in ``folder``."""
    python: str | None
    """``file.py:Class`` of an in-process backend (P20)."""
    claims: Claims
    timeout_s: float

    @property
    def in_process(self) -> bool:
        return self.python is not None

    @classmethod
    def load(cls, folder: str | Path) -> Declaration:
        folder = Path(folder).resolve()
        path = folder / "backend.json"
        if not path.is_file():
            raise DeclarationError(f"{folder} holds no backend.json; see conformance/PROTOCOL.md P1")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeclarationError(f"{path} is not JSON: {exc}") from None
        try:
            check(doc, "backend", "P1", str(path))
        except ProtocolError as exc:
            raise DeclarationError(str(exc)) from None
        start = doc["start"]
        return cls(
            folder=folder,
            name=doc["name"],
            version=doc["version"],
            command=tuple(start["command"]) if "command" in start else None,
            python=start.get("python"),
            claims=Claims.from_json(doc["claims"]),
            timeout_s=float(doc.get("timeout_s", DEFAULT_TIMEOUT_S)),
        )
