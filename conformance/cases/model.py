"""A case, its outcome, and the session it runs in.

A case asks the backend one thing (read a vector, write a state, verify a
checkpoint) and judges the answer against the spec rules it cites. Cases are
data plus a ``run`` function; the runner decides which to run (profiles,
``--only``, the backend's claims) and turns a :class:`ProtocolError` raised
inside ``run`` into an *error*, never a failure (PROTOCOL.md P8).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..protocol.connection import Backend
from ..protocol.declaration import Claims

__all__ = [
    "PROFILES",
    "Case",
    "Finding",
    "Level",
    "Outcome",
    "Requirements",
    "Session",
    "Status",
]

PROFILES = ("reader-core", "writer-core", "multi-rank", "extended")
"""reader-core: read valid vectors and refuse invalid ones; writer-core: write single-process
checkpoints that every reader reads; multi-rank: write from several processes; extended:
verification, optional rules and larger data."""


class Level(enum.Enum):
    """The strength of the weakest rule a case needs (RFC 2119)."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    MAY = "MAY"


class Status(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Finding:
    """One broken rule: the spec (``R6.4``) or protocol (``P15``) rule and what was seen."""

    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    findings: tuple[Finding, ...] = ()
    """For a failure, every rule broken; empty otherwise."""
    note: str = ""
    """For a skip or an error, why; for a pass, anything worth saying (which path ran)."""

    @classmethod
    def judge(cls, findings: Sequence[Finding], note: str = "") -> Outcome:
        """Pass without findings, fail with them."""
        return cls(Status.FAIL if findings else Status.PASS, tuple(findings), note)

    @classmethod
    def skip(cls, reason: str) -> Outcome:
        return cls(Status.SKIP, note=reason)


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a backend must claim for a case to run; anything missing makes it a skip."""

    roles: frozenset[str] = frozenset()
    dtypes: frozenset[str] = frozenset()
    features: frozenset[str] = frozenset()
    subprocess: bool = False
    """The case starts several backend processes (multi-rank), which in-process backends cannot."""

    def unmet(self, claims: Claims, in_process: bool) -> str | None:
        """Why a backend with ``claims`` cannot run the case, or ``None``."""
        for what, needed, claimed in (
            ("role", self.roles, claims.roles),
            ("data type", self.dtypes, claims.dtypes),
            ("feature", self.features, claims.features),
        ):
            missing = sorted(needed - claimed)
            if missing:
                return f"not claimed: {what} {', '.join(missing)}"
        if self.subprocess and in_process:
            return "needs several backend processes; an in-process backend runs one"
        return None


class Session(abc.ABC):
    """What a running case may use: its own scratch folder and the backend's processes."""

    @abc.abstractmethod
    def scratch(self) -> Path:
        """An empty folder for this case's files (inputs, checkpoint, outputs)."""

    @abc.abstractmethod
    def backend(self) -> Backend:
        """The backend process of single-process cases (started on first use, restarted after an error)."""

    @abc.abstractmethod
    def ranks(self, world_size: int) -> list[Backend]:
        """``world_size`` backend processes, one per rank, for a multi-rank case."""

    @abc.abstractmethod
    def free_port(self) -> int:
        """A free TCP port on 127.0.0.1, for a multi-rank case's rendezvous (P13)."""

    @property
    @abc.abstractmethod
    def claims(self) -> Claims:
        """What the backend claims (a case may adapt, e.g. chunk shapes, P12)."""


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    """Unique, ``/``-separated: ``read/invalid/checksum-data``, ``write/dtype-bfloat16``..."""
    profile: str
    title: str
    rules: tuple[str, ...]
    """Every spec rule the case tests, as cited in the report."""
    level: Level
    run: Callable[[Session], Outcome] = field(repr=False, compare=False)
    requires: Requirements = Requirements()
    data: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Free-form facts for ``conformance list --json`` (the expected error, the vector folder...)."""

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"case {self.id}: unknown profile {self.profile!r}")
