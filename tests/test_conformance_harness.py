"""The conformance harness itself: misbehaving backends are errors, not failures (PROTOCOL.md P8).

Each backend here is a few lines of Python written into a temporary folder,
each wrong in one way, as bowtie tests its harness with deliberately broken
miniature implementations. The cases are synthetic, so these tests do not
depend on the catalog.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conformance.cases.model import Case, Finding, Level, Outcome, Requirements, Session, Status
from conformance.cli import main
from conformance.protocol.declaration import Declaration, DeclarationError
from conformance.protocol.messages import problems
from conformance.runner import run_cases

CLAIMS = {"roles": ["reader"], "dtypes": ["float32"], "features": []}

# A backend that answers hello and then behaves as BEHAVIOUR says on every other request.
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    BEHAVIOUR = sys.argv[1]
    CLAIMS = json.loads(sys.argv[2])
    for line in sys.stdin:
        request = json.loads(line)
        answer = {"id": request["id"], "ok": True}
        if request["op"] == "hello":
            claims = dict(CLAIMS, roles=["writer"]) if BEHAVIOUR == "lies" else CLAIMS
            answer.update(name="mini", version="1", protocol=1, claims=claims)
        elif request["op"] == "stop":
            print(json.dumps(answer), flush=True)
            break
        elif BEHAVIOUR == "crash":
            sys.exit(3)
        elif BEHAVIOUR == "garbage":
            print("this is not JSON", flush=True)
            continue
        elif BEHAVIOUR == "silent":
            time.sleep(30)
        elif BEHAVIOUR == "wrong-id":
            answer["id"] += 1
        elif BEHAVIOUR == "bad-code":
            answer = {"id": request["id"], "ok": False, "error": {"code": "oops", "message": ""}}
        elif BEHAVIOUR == "stdout-noise":
            print("loading...", flush=True)
        elif BEHAVIOUR == "refuses":
            answer = {"id": request["id"], "ok": False,
                      "error": {"code": "checksum_mismatch", "message": "c/0: CRC-32C differs"}}
        print(json.dumps(answer), flush=True)
    """
)


def _backend(tmp_path: Path, behaviour: str, **declaration: Any) -> Path:
    folder = tmp_path / behaviour
    folder.mkdir()
    (folder / "backend.py").write_text(SCRIPT)
    doc = {
        "name": "mini",
        "version": "1",
        "protocol": 1,
        "start": {"command": [sys.executable, "backend.py", behaviour, json.dumps(CLAIMS)]},
        "claims": CLAIMS,
        "timeout_s": 5,
        **declaration,
    }
    (folder / "backend.json").write_text(json.dumps(doc))
    return folder


def _verify_case(case_id: str = "mini/verify", level: Level = Level.MUST, **requires: Any) -> Case:
    """A case that asks for a verify and passes on ``ok``, fails on a refusal."""

    def run(session: Session) -> Outcome:
        answer = session.backend().request({"op": "verify", "checkpoint": str(session.scratch())})
        if answer["ok"]:
            return Outcome.judge([])
        return Outcome.judge([Finding("R6.4", f"refused: {answer['error']['code']}")])

    return Case(case_id, "reader-core", "mini", ("R6.4",), level, run, Requirements(**requires))


def _run(folder: Path, tmp_path: Path, *cases: Case) -> list[Outcome]:
    report = run_cases(Declaration.load(folder), cases or (_verify_case(),), tmp_path / "work")
    return [r.outcome for r in report.results]


def test_a_sound_backend_passes(tmp_path: Path) -> None:
    assert [o.status for o in _run(_backend(tmp_path, "ok"), tmp_path)] == [Status.PASS]


def test_a_refusal_is_a_failure_citing_the_rule(tmp_path: Path) -> None:
    (outcome,) = _run(_backend(tmp_path, "refuses"), tmp_path)
    assert outcome.status is Status.FAIL
    assert outcome.findings == (Finding("R6.4", "refused: checksum_mismatch"),)


@pytest.mark.parametrize(
    ("behaviour", "rule"),
    [
        ("crash", "P8"),
        ("garbage", "P6"),
        ("silent", "P8"),
        ("wrong-id", "P7"),
        ("bad-code", "P7"),
        ("stdout-noise", "P6"),
        ("lies", "P10"),
    ],
)
def test_a_misbehaving_backend_is_an_error_not_a_failure(tmp_path: Path, behaviour: str, rule: str) -> None:
    folder = _backend(tmp_path, behaviour, timeout_s=1)
    (outcome,) = _run(folder, tmp_path)
    assert outcome.status is Status.ERROR
    assert f"PROTOCOL.md {rule}" in outcome.note


def test_after_an_error_the_next_case_gets_a_fresh_process(tmp_path: Path) -> None:
    outcomes = _run(_backend(tmp_path, "crash"), tmp_path, _verify_case("a"), _verify_case("b"))
    assert [o.status for o in outcomes] == [Status.ERROR, Status.ERROR]
    assert "exit status 3" in outcomes[1].note
    assert len(list((tmp_path / "work" / "logs").glob("*.log"))) == 2


def test_unclaimed_cases_are_skipped_without_starting_the_backend(tmp_path: Path) -> None:
    folder = _backend(tmp_path, "crash")
    outcomes = _run(
        folder,
        tmp_path,
        _verify_case("a", roles=frozenset({"writer"})),
        _verify_case("b", dtypes=frozenset({"bfloat16"})),
        _verify_case("c", features=frozenset({"regions"})),
    )
    assert [o.status for o in outcomes] == [Status.SKIP] * 3
    assert outcomes[0].note == "not claimed: role writer"
    assert outcomes[1].note == "not claimed: data type bfloat16"
    assert not list((tmp_path / "work" / "logs").glob("*.log"))


def test_an_in_process_backend_answers_through_handle(tmp_path: Path) -> None:
    folder = tmp_path / "inproc"
    folder.mkdir()
    (folder / "impl.py").write_text(
        textwrap.dedent(
            f"""
            class Backend:
                def handle(self, request):
                    answer = {{"id": request["id"], "ok": True}}
                    if request["op"] == "hello":
                        answer.update(name="inproc", version="1", protocol=1, claims={CLAIMS!r})
                    if request["op"] == "verify":
                        raise RuntimeError("boom")
                    return answer
            """
        )
    )
    doc = {"name": "inproc", "version": "1", "protocol": 1, "claims": CLAIMS}
    doc["start"] = {"python": "impl.py:Backend"}
    (folder / "backend.json").write_text(json.dumps(doc))
    declaration = Declaration.load(folder)
    assert declaration.in_process
    (outcome,) = _run(folder, tmp_path)
    assert outcome.status is Status.ERROR and "RuntimeError: boom" in outcome.note
    several = _verify_case("ranks", subprocess=True)
    (skipped,) = _run(folder, tmp_path, several)
    assert skipped.status is Status.SKIP and "in-process" in skipped.note


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (None, "holds no backend.json"),
        ("{", "is not JSON"),
        ({"name": "x"}, "violates backend.schema.json"),
    ],
)
def test_a_bad_backend_folder_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: Any, message: str
) -> None:
    if doc is not None:
        (tmp_path / "backend.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(DeclarationError, match=message):
        Declaration.load(tmp_path)
    assert main(["run", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_exit_status_counts_must_failures_and_errors_only(tmp_path: Path) -> None:
    folder = _backend(tmp_path, "refuses")
    may = run_cases(Declaration.load(folder), [_verify_case(level=Level.MAY)], tmp_path / "w1")
    must = run_cases(Declaration.load(folder), [_verify_case(level=Level.MUST)], tmp_path / "w2")
    assert (may.exit_status, must.exit_status) == (0, 1)
    for report in (may, must):
        assert problems(report.to_json(), "report") == []
