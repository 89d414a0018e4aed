"""What a run found: per case, per profile, and as the JSON report of ``--report``.

The JSON report satisfies ``schemas/report.schema.json``, so that CI systems
and dashboards can read it without knowing the harness.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cases.model import PROFILES, Case, Level, Outcome, Status
from .protocol.declaration import Declaration
from .protocol.messages import check

__all__ = ["CaseResult", "RunReport"]


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    outcome: Outcome
    duration_s: float

    @property
    def breaks_conformance(self) -> bool:
        """A failed MUST case, or any error (P22): either makes the run exit 1."""
        status = self.outcome.status
        return status is Status.ERROR or (status is Status.FAIL and self.case.level is Level.MUST)


@dataclass(frozen=True, slots=True)
class RunReport:
    declaration: Declaration
    results: tuple[CaseResult, ...]
    started: dt.datetime
    duration_s: float

    @property
    def exit_status(self) -> int:
        return 1 if any(r.breaks_conformance for r in self.results) else 0

    def counts(self) -> dict[str, Counter[str]]:
        """Per profile that has cases, how many of them passed, failed, errored, were skipped."""
        counts: dict[str, Counter[str]] = {}
        for result in self.results:
            counts.setdefault(result.case.profile, Counter())[result.outcome.status.value] += 1
        return {p: counts[p] for p in PROFILES if p in counts}

    def summary_lines(self) -> list[str]:
        lines = [f"{'profile':<12} {'pass':>5} {'fail':>5} {'error':>5} {'skip':>5}"]
        for profile, n in self.counts().items():
            lines.append(f"{profile:<12} {n['pass']:>5} {n['fail']:>5} {n['error']:>5} {n['skip']:>5}")
        broken = [r for r in self.results if r.breaks_conformance]
        optional = [r for r in self.results if r.outcome.status is Status.FAIL and not r.breaks_conformance]
        if broken:
            lines.append(f"NOT CONFORMANT: {len(broken)} case(s) failed a MUST rule or ended in an error")
        else:
            lines.append("CONFORMANT: every case the backend claims passed its MUST rules")
        if optional:
            lines.append(f"({len(optional)} SHOULD/MAY case(s) failed; they do not affect the exit status)")
        return lines

    def to_json(self) -> dict[str, Any]:
        decl = self.declaration
        doc = {
            "report_version": 1,
            "backend": {
                "name": decl.name,
                "version": decl.version,
                "folder": str(decl.folder),
                "in_process": decl.in_process,
                "claims": decl.claims.to_json(),
            },
            "harness": {
                "version": _harness_version(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
            },
            "started": self.started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "duration_s": round(self.duration_s, 3),
            "profiles": {
                p: {s.value: n[s.value] for s in (Status.PASS, Status.FAIL, Status.ERROR, Status.SKIP)}
                for p, n in self.counts().items()
            },
            "cases": [
                {
                    "id": r.case.id,
                    "profile": r.case.profile,
                    "level": r.case.level.value,
                    "title": r.case.title,
                    "rules": list(r.case.rules),
                    "status": r.outcome.status.value,
                    "findings": [{"rule": f.rule, "message": f.message} for f in r.outcome.findings],
                    "note": r.outcome.note,
                    "duration_s": round(r.duration_s, 4),
                }
                for r in self.results
            ],
            "exit_status": self.exit_status,
        }
        check(doc, "report", "report", "the run report")
        return doc

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")


def _harness_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tessera-checkpoint")
    except PackageNotFoundError:
        return "unknown"
