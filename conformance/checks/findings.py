"""A bounded list of findings: a damaged checkpoint must give a readable report, not a flood.

A writer that gets one thing wrong often gets it wrong everywhere (every chunk
of every array); the report keeps the first few findings of each rule and
counts the rest, so that memory and the report stay small however large the
checkpoint is.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..cases.model import Finding

__all__ = ["PER_RULE", "Findings", "shown"]

PER_RULE = 20
"""Findings kept per rule; the others are counted in one closing finding of that rule."""


class Findings:
    """Findings in the order they were made, at most ``limit`` per rule."""

    def __init__(self, limit: int = PER_RULE) -> None:
        self._limit = limit
        self._kept: list[Finding] = []
        self._seen: Counter[str] = Counter()

    def add(self, rule: str, message: str) -> None:
        self._seen[rule] += 1
        if self._seen[rule] <= self._limit:
            self._kept.append(Finding(rule, message))

    def extend(self, findings: Iterable[Finding]) -> None:
        for finding in findings:
            self.add(finding.rule, finding.message)

    def __len__(self) -> int:
        return sum(self._seen.values())

    def __bool__(self) -> bool:
        return bool(self._seen)

    def result(self) -> list[Finding]:
        """The kept findings, then one per rule that had more, saying how many were left out."""
        more = [
            Finding(rule, f"... and {count - self._limit} more findings of this rule")
            for rule, count in self._seen.items()
            if count > self._limit
        ]
        return [*self._kept, *more]


def shown(value: Any, limit: int = 200) -> str:
    """A JSON value as a finding quotes it: as JSON (``3.0`` stays ``3.0``), cut at ``limit`` characters."""
    text = json.dumps(value, allow_nan=True, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."
