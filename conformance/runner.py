"""Run cases against a backend: requirements first, then each case, one line as each ends.

A case whose requirements the backend does not claim is skipped without
starting anything. A :class:`ProtocolError` inside a case (crash, timeout,
malformed answer) is an error (P8), and the backend's processes are
replaced. An exception of the harness itself is also an error, reported
with its traceback: it must never pass for a backend's failure.
"""

from __future__ import annotations

import datetime as dt
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from .cases.model import Case, Outcome, Status
from .protocol.declaration import Declaration
from .protocol.messages import ProtocolError
from .report import CaseResult, RunReport
from .session import RunSession

__all__ = ["run_cases"]

Listener = Callable[[int, int, CaseResult], None]
"""Called after each case with its number (from 1), the number of cases and its result."""


def run_cases(
    declaration: Declaration,
    cases: Sequence[Case],
    workdir: Path,
    *,
    keep: bool = False,
    on_result: Listener | None = None,
) -> RunReport:
    """Run ``cases`` in order; ``keep`` leaves every case's scratch folder in ``workdir``."""
    started = dt.datetime.now(dt.UTC)
    clock = time.perf_counter()
    session = RunSession(declaration, workdir)
    results: list[CaseResult] = []
    try:
        for number, case in enumerate(cases, 1):
            result = _run_one(session, number, case, keep)
            results.append(result)
            if on_result is not None:
                on_result(number, len(cases), result)
    finally:
        session.close()
    return RunReport(declaration, tuple(results), started, time.perf_counter() - clock)


def _run_one(session: RunSession, number: int, case: Case, keep: bool) -> CaseResult:
    unmet = case.requires.unmet(session.claims, session.declaration.in_process)
    if unmet is not None:
        return CaseResult(case, Outcome.skip(unmet), 0.0)
    session.begin(number, case.id)
    clock = time.perf_counter()
    try:
        outcome = case.run(session)
    except ProtocolError as exc:
        tail = session.log_tail().strip()
        outcome = Outcome(Status.ERROR, note=str(exc) + (f"\nbackend stderr (end):\n{tail}" if tail else ""))
        session.discard_backends()
    except Exception:
        outcome = Outcome(Status.ERROR, note="the harness itself failed:\n" + traceback.format_exc())
        session.discard_backends()
    duration = time.perf_counter() - clock
    session.end(keep)
    return CaseResult(case, outcome, duration)
