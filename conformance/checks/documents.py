"""The JSON documents of a written checkpoint: strict JSON, their schemas, and the exact content the
spec derives for the claim, the groups and the arrays (spec §2, §3.1, §5, §9).

Every document is parsed as a Tessera reader parses it (tessera's strict
loader: no NaN, no duplicate members, no trailing data), keeping ``3.0`` a
float, so that an integer written with a fraction or an exponent is seen
(R3.7). Where the spec fixes a document's content (groups, arrays), it is
compared with that content whole, as JSON values: member order is free
(R2.8), but ``0`` is not ``false`` and ``1`` is not ``1.0``.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tessera import LimitExceededError, TesseraError
from tessera.format import DEFAULT_LIMITS, ArrayLayout, SchemaName, loads, schema_problems

from .findings import Findings, shown

__all__ = [
    "CLAIM",
    "GROUP_DOCUMENT",
    "ROOT",
    "UNREADABLE",
    "check_array_document",
    "check_claim",
    "check_group_documents",
    "integers_as_floats",
    "read_document",
    "same_json",
    "schema_findings",
]

ROOT = "zarr.json"
CLAIM = ".tessera-claim.json"
GROUP_DOCUMENT: dict[str, Any] = {"zarr_format": 3, "node_type": "group", "attributes": {}}
"""R2.4: the whole content of every intermediate group's ``zarr.json``."""

_PROBLEM = re.compile(r"at (\$\S*): (.*)", re.DOTALL)
_NOT_INTEGER = re.compile(r"(-?[0-9][0-9.eE+-]*) is not of type .*'integer'")


class Unreadable:
    """What :func:`read_document` returns for a missing or malformed document (already reported)."""


UNREADABLE = Unreadable()


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: member order is free; types are not (``1`` vs ``1.0`` vs ``true``)."""
    return _canonical(a) == _canonical(b)


def _canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, allow_nan=True, default=repr)


def integers_as_floats(got: Any, want: Any) -> bool:
    """``got`` is ``want`` but for integers written with a fraction or an exponent (``3.0``, R3.7)."""
    return not same_json(got, want) and same_json(_integral(got), want)


def _integral(doc: Any) -> Any:
    if isinstance(doc, float) and doc.is_integer():
        return int(doc)
    if isinstance(doc, list):
        return [_integral(v) for v in doc]
    if isinstance(doc, dict):
        return {k: _integral(v) for k, v in doc.items()}
    return doc


def read_document(root: Path, path: str, missing_rule: str | None, out: Findings) -> Any:
    """The parsed document at ``path``, or :data:`UNREADABLE` after reporting why.

    ``missing_rule`` cites the rule that asks for the document; ``None``: its absence is not
    this caller's to report.
    """
    file = root / path
    try:
        status = file.lstat()
        if not stat.S_ISREG(status.st_mode):
            if missing_rule:
                out.add(missing_rule, f"{path} is not a regular file (a symbolic link or a directory)")
            return UNREADABLE
        if status.st_size > DEFAULT_LIMITS.max_json_bytes:
            out.add("R11.5", f"{path} is {status.st_size} bytes, over the limit of R11.6")
            return UNREADABLE
        data = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        if missing_rule:
            out.add(missing_rule, f"{path} is missing")
        return UNREADABLE
    except OSError as exc:
        out.add(missing_rule or "R2.1", f"{path} cannot be read: {exc}")
        return UNREADABLE
    if data.startswith(b"\xef\xbb\xbf"):
        out.add("R2.8", f"{path} starts with a UTF-8 byte-order mark")
        return UNREADABLE
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.add("R2.8", f"{path} is not UTF-8: {exc}")
        return UNREADABLE
    try:
        return loads(data, path)
    except LimitExceededError as exc:
        out.add("R11.5", str(exc))
    except TesseraError as exc:
        out.add("R11.4", str(exc))
    return UNREADABLE


def schema_findings(
    doc: Any, schema: SchemaName, where: str, rule_of: Callable[[str], str], out: Findings
) -> bool:
    """Report every violation of ``schema``, citing the rule ``rule_of(json_path)`` gives; ``True`` if none.

    An integer written as ``3.0`` or ``3e0`` fails the schema's strict integer type: that is R3.7
    wherever it sits.
    """
    problems = schema_problems(doc, schema)
    for problem in problems:
        match = _PROBLEM.fullmatch(problem)
        json_path, message = (match.group(1), match.group(2)) if match else ("$", problem)
        rule = rule_of(json_path)
        number = _NOT_INTEGER.match(message)
        if number and _is_integral(number.group(1)):
            rule = "R3.7"
        out.add(rule, f"{where} violates {schema}.schema.json at {json_path}: {message}")
    return not problems


def _is_integral(token: str) -> bool:
    try:
        return float(token).is_integer()
    except ValueError:
        return False


def check_claim(root: Path, manifest: dict[str, Any], out: Findings) -> None:
    """R9.1, R9.12: the claim exists, satisfies its schema, and names the save that committed."""
    doc = read_document(root, CLAIM, "R9.1", out)
    if doc is UNREADABLE or not schema_findings(doc, "claim", CLAIM, lambda _: "R9.1", out):
        return
    for member, rule in (("save_id", "R9.12"), ("created", "R9.1"), ("writer", "R9.1")):
        if member in manifest and not same_json(doc[member], manifest[member]):
            out.add(
                rule,
                f"{CLAIM} has {member} {shown(doc[member])} but the manifest has {shown(manifest[member])}",
            )


def check_group_documents(root: Path, groups: Iterable[str], out: Findings) -> set[str]:
    """R2.4: each proper prefix of an array path holds exactly the group document; the failures' paths."""
    bad: set[str] = set()
    for group in sorted(groups):
        path = f"{group}/{ROOT}"
        doc = read_document(root, path, "R2.4", out)
        if doc is UNREADABLE:
            bad.add(path)
        elif not same_json(doc, GROUP_DOCUMENT):
            bad.add(path)
            rule = "R3.7" if integers_as_floats(doc, GROUP_DOCUMENT) else "R2.4"
            out.add(rule, f"{path} is {shown(doc)}, not exactly {shown(GROUP_DOCUMENT)}")
    return bad


def check_array_document(root: Path, array_path: str, layout: ArrayLayout | None, out: Findings) -> bool:
    """R5.8, R5.9: the array's ``zarr.json`` holds exactly what its manifest entry implies; ``True`` if so.

    Without a usable entry (``layout`` ``None``, already reported) only the schema is checked; a
    document equal to the derived one satisfies the schema by construction.
    """
    path = f"{array_path}/{ROOT}"
    doc = read_document(root, path, "R2.3", out)
    if doc is UNREADABLE:
        return False
    if layout is None:
        return schema_findings(doc, "array", path, lambda _: "R5.8", out)
    want = layout.zarr_json()
    if not isinstance(doc, dict):
        out.add("R5.8", f"{path} is {shown(doc)}, not a JSON object")
        return False
    ok = True
    extra = sorted(set(doc) - set(want))
    missing = sorted(set(want) - set(doc))
    if extra:
        ok = False
        out.add("R5.8", f"{path} has members {extra} that R5.8 does not list")
    if missing:
        ok = False
        out.add("R5.8", f"{path} lacks members {missing}")
    for member in sorted(set(doc) & set(want)):
        if not same_json(doc[member], want[member]):
            ok = False
            rule = "R5.9" if member == "fill_value" else "R5.8"
            rule = "R3.7" if integers_as_floats(doc[member], want[member]) else rule
            out.add(
                rule,
                f"{path} has {member} {shown(doc[member])}; its manifest entry implies {shown(want[member])}",
            )
    return ok


