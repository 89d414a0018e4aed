"""The hostile corpus (``fuzz/corpus/``, issue 15): every case refused with its exact error code,
within 5 s and 256 MiB of memory growth, never a hang, a traceback or a quoted secret.

All cases run in one child process (:class:`fuzz.harness.Worker`), one operation per request: a
request that gets no answer in 5 s is a hang, and the child is killed and replaced. Memory is the
child's peak resident set during the request over its resident set before (the kernel's peak mark
is reset per request, see :mod:`fuzz.worker`); ``RLIMIT_AS`` is useless with torch imported, which
maps far more address space than it touches. After a hang the case's remaining operations are not
run. Rule numbers: R11 (reading safely), R13 (errors), R10 (run directories), R15 (security).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from fuzz.generate import CORPUS, NEEDS_ROOT, load_expect, prepare_case
from fuzz.harness import Worker

SECONDS = 5.0
MEMORY_MIB = 256.0
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "expect.json").is_file())
CLASSES = ("hang", "deadlock", "crash", "memory", "leak", "data_loss", "verify_gap", "silent")


def _needs_root(expect: dict[str, Any]) -> bool:
    return any(s["make"] in NEEDS_ROOT for s in expect.get("setup", []))


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Every case's operations and answers, run once for the module."""
    scratch = tmp_path_factory.mktemp("attacks")
    cache = tmp_path_factory.mktemp("attack-cache")
    found: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    with Worker() as worker:
        for name in CASES:
            expect = load_expect(CORPUS / name)
            if _needs_root(expect) and os.geteuid() != 0:
                continue
            root = prepare_case(CORPUS / name, scratch, cache)
            answers = found.setdefault(name, [])
            for op in expect["ops"]:
                request = {"op": op, "root": str(root), "state": expect.get("state")}
                answer = worker.ask(request, SECONDS)
                for intact in op.get("intact", []):
                    answer.setdefault("lost", [])
                    if not (root / intact / "zarr.json").is_file():
                        answer["lost"].append(intact)
                answers.append((op, answer))
                if answer["outcome"] in ("hang", "over-memory", "died"):
                    break
    return found


def _problem(op: dict[str, Any], answer: dict[str, Any], secret: str | None) -> str | None:
    """What is wrong with one operation's answer, or ``None``."""
    outcome, got = answer["outcome"], answer.get("code")
    if outcome in ("hang", "over-memory", "died", "crash"):
        return f"{op['op']}: {outcome} {got or ''} {answer.get('text', '')[-800:]}"
    if answer["seconds"] > SECONDS:
        return f"{op['op']}: took {answer['seconds']} s"
    if answer["memory_mib"] > MEMORY_MIB:
        return f"{op['op']}: grew by {answer['memory_mib']} MiB"
    if secret and secret in answer.get("text", ""):
        return f"{op['op']}: the output quotes the secret file: {answer['text'][:300]}"
    if answer.get("lost"):
        return f"{op['op']}: deleted checkpoints outside the run directory: {answer['lost']}"
    want = op.get("code")
    if op["op"] == "verify":
        codes = answer.get("problems", []) if outcome == "ok" else [got]
        if want is None:
            return None if not codes else f"verify: expected no problem, got {codes}: {answer['text'][:300]}"
        return (
            None
            if want in codes
            else f"verify: expected a {want!r} problem, got {codes}: {answer['text'][:300]}"
        )
    if op["op"] == "cli":
        text = answer["text"]
        if "Traceback" in text:
            return f"cli {op['argv']}: printed a traceback"
        if answer.get("status") != op["status"]:
            status = answer.get("status")
            return f"cli {op['argv']}: exit status {status}, expected {op['status']}: {text[-300:]}"
        if op["status"] == 2:
            lines = [line for line in text.splitlines() if line.strip()]
            if len(lines) != 1 or not lines[0].startswith(f"tessera: error[{want}]: "):
                return (
                    f"cli {op['argv']}: expected one line 'tessera: error[{want}]: ...', got {text[:300]!r}"
                )
        return None
    if want is None:
        return None if outcome == "ok" else f"{op['op']}: expected success, got {got}: {answer['text'][:300]}"
    if outcome == "ok":
        return f"{op['op']}: expected {want!r}, but it succeeded"
    return None if got == want else f"{op['op']}: expected {want!r}, got {got!r}: {answer['text'][:300]}"


@pytest.mark.parametrize("name", CASES)
def test_attack(name: str, results: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]) -> None:
    expect = load_expect(CORPUS / name)
    if name not in results:
        pytest.skip("makes a device node, which needs root")
    problems = [p for op, answer in results[name] for p in [_problem(op, answer, expect.get("secret"))] if p]
    ran = len(results[name])
    if ran < len(expect["ops"]):
        problems.append(f"{len(expect['ops']) - ran} operation(s) not run after the hang")
    assert not problems, f"{name} ({expect['description']}):\n" + "\n".join(problems)


def test_corpus_covers_every_class() -> None:
    """Issue 15's list of bad outcomes, each with cases in the corpus."""
    classes = {load_expect(CORPUS / name)["class"] for name in CASES}
    assert classes == set(CLASSES)


def test_corpus_is_small() -> None:
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file() and not p.is_symlink())
    assert total < 5 * 2**20


def test_corpus_matches_its_generator() -> None:
    """Every case's expect.json is what ``python -m fuzz.make_corpus`` writes: regenerate the corpus
    after changing a case (its checkpoints change with every save; its expectations do not)."""
    from fuzz.make_corpus import CASES as DEFINED

    assert sorted(DEFINED) == CASES
    for name, spec in DEFINED.items():
        assert load_expect(CORPUS / name) == {k: v for k, v in spec.items() if k != "build"}, name
