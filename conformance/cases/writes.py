"""Send one checkpoint's write to a backend or to all its ranks at once, and judge what comes of it.

Shared by the single-process cases (``writing``) and the multi-rank ones (``multi_rank``). A write
that must succeed is judged by every answer, by the order in which the files appeared (watched while
the write ran) and by the checkpoint left behind. A write that must be refused is judged by the error
codes and by what it left behind: a refused save must not commit, and where the spec says so must not
touch the root at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..checks.commit_order import WriteWatch
from ..checks.expected import ExpectedCheckpoint
from ..checks.written import check_written
from ..protocol.connection import Backend
from .model import Finding, Outcome

__all__ = ["expect_refused", "expect_written", "timeout_for", "write_request"]

Message = dict[str, Any]

SCALE_BYTES = 32 << 20
"""A case moving more than this many bytes gets the backend's timeout once per such amount (P4)."""
SCALE_ARRAYS = 100
"""Likewise per this many arrays: each is a few files, each file durable (fsync) before the commit."""


def write_request(
    root: Path,
    entries: list[Message],
    lists: Sequence[Sequence[str | int]],
    metadata: Any,
    compression: Message | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    rendezvous: Message | None = None,
) -> Message:
    """A ``write`` request (PROTOCOL.md §3), without its ``id``."""
    return {
        "op": "write",
        "checkpoint": str(root),
        "rank": rank,
        "world_size": world_size,
        "rendezvous": rendezvous,
        "entries": entries,
        "lists": [list(key) for key in lists],
        "metadata": metadata,
        "compression": compression,
    }


def timeout_for(backend: Backend, nbytes: int, arrays: int) -> float:
    """The backend's answer timeout, scaled for a case that moves much data or writes many files (P4)."""
    return backend.declaration.timeout_s * max(1.0, nbytes / SCALE_BYTES, arrays / SCALE_ARRAYS)


def expect_written(
    backends: Sequence[Backend],
    requests: Sequence[Message],
    root: Path,
    expected: ExpectedCheckpoint,
    rule: str,
    timeout_s: float,
) -> Outcome:
    """A write that must succeed: every rank says ok, and the files, their bytes and their order are right.

    ``rule`` is the one a refusal breaks: the main rule of the case.
    """
    with WriteWatch(root) as watch:
        answers = _send(backends, requests, timeout_s)
    refused = [
        Finding(
            rule,
            f"{_who(rank, len(answers))} refused the write: {a['error']['code']}: {a['error']['message']}",
        )
        for rank, a in enumerate(answers)
        if not a["ok"]
    ]
    if refused:
        return Outcome.judge(refused)
    # The watch's notes say what it could not see (no inotify, a root made with its parents...).
    return Outcome.judge([*watch.findings(), *check_written(root, expected)], "; ".join(watch.notes))


def expect_refused(
    backends: Sequence[Backend],
    requests: Sequence[Message],
    root: Path,
    code: str,
    rule: str,
    untouched_by: str | None,
    timeout_s: float,
) -> Outcome:
    """A write that must fail with ``code``: on rank 0, and on the others that or ``collective_failed``.

    ``untouched_by`` names the rule under which the root must stay exactly as it was (R9.6, R16.7...);
    without one, the refused write must only not have committed.
    """
    before = _snapshot(root)
    answers = _send(backends, requests, timeout_s)
    findings: list[Finding] = []
    for rank, answer in enumerate(answers):
        allowed = {code} if rank == 0 else {code, "collective_failed"}
        who = _who(rank, len(answers))
        if answer["ok"]:
            findings.append(Finding(rule, f"{who} accepted the write; it must be refused with {code}"))
        elif answer["error"]["code"] not in allowed:
            error, wanted = answer["error"], " or ".join(sorted(allowed))
            findings.append(
                Finding(rule, f"{who} refused with {error['code']} ({error['message']}), not {wanted}")
            )
    after = _snapshot(root)
    if untouched_by is not None and after != before:
        changes = "; ".join(_changes(before, after))
        findings.append(Finding(untouched_by, f"the refused write changed {root}: {changes}"))
    elif "zarr.json" in after and "zarr.json" not in before:
        findings.append(
            Finding(rule, f"the refused write committed a checkpoint at {root} (it wrote zarr.json)")
        )
    return Outcome.judge(findings)


def _send(backends: Sequence[Backend], requests: Sequence[Message], timeout_s: float) -> list[Message]:
    """Send each backend its request, all at once: the ranks of one save wait for each other (P13)."""
    if len(backends) == 1:
        return [backends[0].request(requests[0], timeout_s)]
    with ThreadPoolExecutor(len(backends)) as pool:
        futures = [pool.submit(b.request, r, timeout_s) for b, r in zip(backends, requests, strict=True)]
        return [future.result() for future in futures]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (``None``) under ``root``, by relative path."""
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def _changes(before: dict[str, bytes | None], after: dict[str, bytes | None]) -> list[str]:
    added = [f"added {p}" for p in after if p not in before]
    removed = [f"removed {p}" for p in before if p not in after]
    changed = [f"changed {p}" for p in before if p in after and before[p] != after[p]]
    return [*added, *removed, *changed][:10]


def _who(rank: int, world_size: int) -> str:
    return "the backend" if world_size == 1 else f"rank {rank}"
