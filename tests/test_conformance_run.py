"""``conformance run`` end to end: the reference backend passes, each broken backend fails exactly
the cases that name its fault (issue 4, "what it must show").

The broken backends (``tests/conformance_backends/``) are each wrong in one way. The cases each
must fail are computed from the catalog (``Case.data``), never listed by hand, so that a new case
is covered as soon as it exists: a writer that breaks a rule on every array must fail every write
case that succeeds with an array, and nothing else; a reader that skips one check must fail the
reads that expect that check's error, and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conformance.cases.catalog import all_cases
from conformance.cases.model import Case, Level, Status
from conformance.protocol.declaration import Declaration
from conformance.protocol.messages import problems
from conformance.report import RunReport
from conformance.runner import run_cases

from .conftest import ROOT, run_conformance

REFERENCE = ROOT / "conformance" / "backends" / "reference"
BROKEN = Path(__file__).resolve().parent / "conformance_backends"


def test_the_reference_backend_passes_every_profile(tmp_path: Path) -> None:
    """Through the real command: exit 0, a report that satisfies its schema, no MUST case lost."""
    report_path = tmp_path / "report.json"
    done = run_conformance(REFERENCE, "--report", str(report_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert problems(report, "report") == []
    assert set(report["profiles"]) == {"reader-core", "writer-core", "multi-rank", "extended"}
    by_status: dict[str, list[str]] = {}
    for case in report["cases"]:
        by_status.setdefault(case["status"], []).append(case["id"])
    assert not by_status.get("fail") and not by_status.get("error"), by_status
    # The reference claims everything: only optional (MAY) refusals it does not make are skipped.
    levels = {case["id"]: case["level"] for case in report["cases"]}
    assert all(levels[case_id] == "MAY" for case_id in by_status.get("skip", [])), by_status["skip"]
    assert len(by_status["pass"]) == len(all_cases()) - len(by_status.get("skip", []))
    assert "CONFORMANT" in done.stdout and f"[{len(report['cases'])}/{len(report['cases'])}]" in done.stdout


def _run(backend: str, profile: str, workdir: Path) -> RunReport:
    cases = [c for c in all_cases() if c.profile == profile]
    return run_cases(Declaration.load(BROKEN / backend), cases, workdir)


def _writes_an_array(case: Case) -> bool:
    return case.data["expect_error"] is None and case.data["arrays"] > 0


def _reads_expecting(code: str) -> Callable[[Case], bool]:
    return lambda case: case.data["op"] == "read" and case.data["expect_error"] == code


@pytest.mark.parametrize(
    ("backend", "profile", "faulty", "rule"),
    [
        ("root_first", "writer-core", _writes_an_array, "R9.9"),
        ("no_checksum", "writer-core", _writes_an_array, "R6.1"),
        ("accepts_corruption", "reader-core", _reads_expecting("checksum_mismatch"), None),
        ("fills_missing_chunks", "reader-core", _reads_expecting("missing_chunk"), None),
    ],
)
def test_a_broken_backend_fails_exactly_the_cases_that_name_its_fault(
    tmp_path: Path, backend: str, profile: str, faulty: Callable[[Case], bool], rule: str | None
) -> None:
    """``rule``: the rule a writer's fault breaks, which every failed case must name."""
    report = _run(backend, profile, tmp_path)
    failed = {r.case.id for r in report.results if r.outcome.status is Status.FAIL}
    errors = {r.case.id: r.outcome.note for r in report.results if r.outcome.status is Status.ERROR}
    expected = {r.case.id for r in report.results if faulty(r.case)}
    assert not errors, errors
    assert expected, f"no {profile} case exercises the fault of {backend}"
    assert failed == expected, {"missed": sorted(expected - failed), "wrongly": sorted(failed - expected)}
    assert report.exit_status == 1
    if rule is not None:
        for result in report.results:
            if result.case.id in failed:
                assert rule in {f.rule for f in result.outcome.findings}, (result.case.id, result.outcome)
    assert all(r.case.level is Level.MUST for r in report.results if r.case.id in failed)
