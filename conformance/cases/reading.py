"""The reader and verifier cases: one per probe of every vector (``conformance/vectors/``).

A read probe asks the backend to read a vector's checkpoint and compares
what comes back with the vector's expected tensors (bit for bit), bytes and
values, or with the error class the spec gives (where the spec lets a reader
refuse, ``or_error``, that refusal passes too); a verify probe compares the
problems a verifier reports. The backend works on a copy of the vector in
the case's scratch folder, so a faulty backend cannot damage the checked-in
files. A MAY probe that the backend answers by accepting the checkpoint is a
skip: it did not take an option the spec leaves open. Ids: ``read/<group>/<name>`` (the probe named ``read``),
``read/<group>/<name>/<probe>`` (the others), ``verify/<group>/<name>``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol.arrays import as_bits, load_bits
from ..protocol.messages import problems
from .model import Case, Finding, Level, Outcome, Requirements, Session

__all__ = ["VECTORS_DIR", "VectorError", "cases"]

VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"
_GROUPS = ("valid", "malformed", "invalid", "unsupported")
_ROLES = {"read": "reader", "verify": "verifier"}


class VectorError(ValueError):
    """A vector.json that breaks vector.schema.json: a bug of the suite, not of a backend."""


def cases(vectors: Path = VECTORS_DIR) -> list[Case]:
    """One case per probe of every vector under ``vectors``, group by group."""
    found: list[Case] = []
    for doc_path in sorted(vectors.glob("*/*/vector.json"), key=_order):
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
        wrong = problems(doc, "vector")
        if wrong:
            raise VectorError(f"{doc_path} violates vector.schema.json: {'; '.join(wrong[:3])}")
        found.extend(_case(doc_path.parent, doc, probe) for probe in doc["probes"])
    return found


def _order(path: Path) -> tuple[int, str, str]:
    group, name = path.parent.parent.name, path.parent.name
    return (_GROUPS.index(group) if group in _GROUPS else len(_GROUPS), group, name)


def _case(folder: Path, vector: dict[str, Any], probe: dict[str, Any]) -> Case:
    op = probe["op"]
    label = f"{folder.parent.name}/{folder.name}"
    rules = tuple(dict.fromkeys([*vector["rules"], *probe.get("rules", ())]))
    expect_error = probe["expect"].get("error")
    return Case(
        id=f"{op}/{label}" if probe["name"] == op else f"{op}/{label}/{probe['name']}",
        profile=probe["profile"],
        title=vector["title"] if probe["name"] == op else f"{vector['title']} [{probe['name']}]",
        rules=rules,
        level=Level(probe["level"]),
        run=_Probe(folder, rules, probe),
        requires=Requirements(
            roles=frozenset({_ROLES[op]}),
            dtypes=frozenset(vector["dtypes"]),
            features=frozenset([*vector["features"], *probe.get("features", ())]),
        ),
        data={"vector": label, "op": op, "expect_error": expect_error},
    )


@dataclass(frozen=True, slots=True)
class _Probe:
    """Runs one probe: copy the vector, send the request, judge the answer."""

    folder: Path
    rules: tuple[str, ...]
    probe: dict[str, Any]

    def __call__(self, session: Session) -> Outcome:
        scratch = session.scratch()
        vector = scratch / "vector"
        shutil.copytree(self.folder, vector, symlinks=True)
        checkpoint = str(vector / "checkpoint")
        cite = ", ".join(self.rules)
        expect = self.probe["expect"]
        if self.probe["op"] == "verify":
            answer = session.backend().request({"op": "verify", "checkpoint": checkpoint})
            if answer["ok"] and self._optional_refusal():
                return Outcome.skip("verify accepted it; the spec allows that (MAY): the check is optional")
            return Outcome.judge(_judge_verify(answer, expect, cite))
        out = scratch / "out"
        out.mkdir()
        request = {
            "op": "read",
            "checkpoint": checkpoint,
            "out": str(out),
            "requests": self.probe["requests"],
        }
        answer = session.backend().request(request)
        if answer["ok"] and self._optional_refusal():
            return Outcome.skip("read it without refusing; the spec allows that (MAY): the check is optional")
        if "error" in expect:
            return Outcome.judge(_judge_refusal(answer, expect["error"], cite))
        allowed = expect.get("or_error")
        if not answer["ok"] and answer["error"]["code"] == allowed:
            return Outcome.judge([], note=f"refused with {allowed}, which the spec allows here")
        return Outcome.judge(_judge_results(answer, expect["results"], vector, out, cite))


    def _optional_refusal(self) -> bool:
        """A MAY probe expects a refusal the spec allows but does not require: a backend that
        accepts the checkpoint has not taken the option, which is neither a pass nor a failure."""
        return self.probe["level"] == "MAY" and "error" in self.probe["expect"]


def _error_of(answer: dict[str, Any]) -> str:
    return f"{answer['error']['code']} ({answer['error']['message']})"


def _judge_refusal(answer: dict[str, Any], code: str, cite: str) -> list[Finding]:
    if answer["ok"]:
        got = len(answer.get("results", []))
        return [Finding(cite, f"expected the read to fail with {code}, but it succeeded with {got} results")]
    if answer["error"]["code"] != code:
        return [Finding(cite, f"expected {code}, got {_error_of(answer)}")]
    return []


def _judge_results(
    answer: dict[str, Any], expected: list[dict[str, Any]], vector: Path, out: Path, cite: str
) -> list[Finding]:
    if not answer["ok"]:
        return [Finding(cite, f"expected {len(expected)} results, but the read failed: {_error_of(answer)}")]
    results = answer.get("results", [])
    if len(results) != len(expected):
        return [Finding("P15", f"{len(results)} results for {len(expected)} requests")]
    findings: list[Finding] = []
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        if got["key"] != want["key"]:
            findings.append(Finding("P15", f"result {i} is key {got['key']}, expected {want['key']}"))
            continue
        findings.extend(_judge_result(i, got, want, vector, out, cite))
    return findings


def _judge_result(
    i: int, got: dict[str, Any], want: dict[str, Any], vector: Path, out: Path, cite: str
) -> list[Finding]:
    where = f"result {i} ({'/'.join(map(str, want['key']))})"
    if got["kind"] != want["kind"]:
        return [Finding(cite, f"{where} is a {got['kind']}, expected a {want['kind']}")]
    if want["kind"] == "value":
        if got["encoding"] != want["encoding"] or not _same_json(got["value"], want["value"]):
            seen = json.dumps([got["encoding"], got["value"]])
            return [
                Finding(
                    cite,
                    f"{where}: got value {seen}, expected {json.dumps([want['encoding'], want['value']])}",
                )
            ]
        if got.get("tuples", []) != want.get("tuples", []):
            # R3.22: a 1.2 reader gives back the tuples the entry lists, and no others (P11).
            seen, wanted = json.dumps(got.get("tuples", [])), json.dumps(want.get("tuples", []))
            return [Finding("R3.22", f"{where}: got tuples at {seen}, expected at {wanted}")]
        return []
    if want["kind"] == "object":
        path = out / f"{i}.bin"
        if not path.is_file():
            return [Finding("P15", f"{where}: no file {path.name} in the output folder")]
        if path.read_bytes() != (vector / want["file"]).read_bytes():
            return [Finding(cite, f"{where}: the bytes differ from {want['file']}")]
        return []
    if (got["dtype"], got["shape"]) != (want["dtype"], want["shape"]):
        return [
            Finding(cite, f"{where}: {got['dtype']} {got['shape']}, expected {want['dtype']} {want['shape']}")
        ]
    return _judge_tensor(where, out / f"{i}.npy", vector / want["file"], want["dtype"], cite)


def _judge_tensor(where: str, got_path: Path, want_path: Path, dtype: str, cite: str) -> list[Finding]:
    if not got_path.is_file():
        return [Finding("P15", f"{where}: no file {got_path.name} in the output folder")]
    try:
        got = load_bits(got_path, dtype)
    except (ValueError, OSError) as exc:
        return [Finding("P19", f"{where}: {exc}")]
    want = load_bits(want_path, dtype)
    if got.shape != want.shape:
        return [
            Finding(
                "P19", f"{where}: {got_path.name} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
        ]
    got_bits, want_bits = as_bits(got), as_bits(want)
    if not np.array_equal(got_bits, want_bits):
        wrong = np.argwhere(got_bits != want_bits)
        first = tuple(int(x) for x in wrong[0])
        return [
            Finding(cite, f"{where}: {len(wrong)} elements differ in their bits, the first at {list(first)}")
        ]
    return []


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (``1`` and ``1.0`` are one number), never ``true`` for 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _judge_verify(answer: dict[str, Any], expect: dict[str, Any], cite: str) -> list[Finding]:
    reported = _codes(answer)
    if expect.get("ok"):
        if answer["ok"]:
            return []
        return [Finding(cite, f"the checkpoint is sound, but verify reported {', '.join(reported)}: "
                              f"{answer['error']['message']}")]  # fmt: skip
    code = expect["error"]
    if answer["ok"]:
        return [Finding(cite, f"verify found nothing wrong; expected {code}")]
    findings = []
    if code not in reported:
        findings.append(Finding(cite, f"verify reported {', '.join(reported)}, not {code}"))
    others = sorted(set(reported) - {code, *expect.get("also", ())})
    if others:
        findings.append(
            Finding(cite, f"verify also reported {', '.join(others)}, which this fault does not cause")
        )
    return findings


def _codes(answer: dict[str, Any]) -> Sequence[str]:
    """Every code a failed answer reports, the error's first, without repeats."""
    if answer["ok"]:
        return []
    listed = [answer["error"]["code"], *(p["code"] for p in answer.get("problems", ()))]
    return list(dict.fromkeys(listed))
