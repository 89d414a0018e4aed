"""``tessera verify PATH``: every document, every chunk and every checksum; exit 1 on any problem.

Output: one ``code: message`` line per problem, then one summary line per
checkpoint. The progress bar goes to stderr, and only when stderr is a
terminal (never in logs or pipes) and ``--quiet`` is not given. ``--quiet``
prints the problems only, so that an empty output means a sound checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..api.run_dir import RunDirectory
from ..api.verify import VerifyReport, verify
from ..errors import CheckpointNotFoundError
from ..storage.base import Storage
from ..storage.resolve import storage_for
from .arguments import UsageError
from .common import is_present, is_run_directory, resolve
from .text import human_bytes, one_line, plural

__all__ = ["report_document", "run", "summary_line"]


def _targets(location: str, every: bool) -> tuple[list[Storage], str | None]:
    """The checkpoints to verify, and the run directory they belong to, if any."""
    if not every:
        target = resolve(location)
        return [target.storage], target.run_dir.storage.location if target.run_dir else None
    root = storage_for(location)
    if not is_present(root):
        raise CheckpointNotFoundError(f"no run directory at {root.location}")
    if not (is_run_directory(root) or not root.list("")):
        raise UsageError(f"--all needs a run directory; {root.location} is not one (no 'latest', no step-*)")
    return [root.child(info.name) for info in RunDirectory(root).checkpoints()], root.location


def summary_line(report: VerifyReport, seconds: float) -> str:
    """``OK  <path>: 12 arrays, 40 chunks, 4.3 MiB in 0.05 s`` (``FAILED`` with a count)."""
    status = "OK" if report.ok else f"FAILED ({plural(len(report.problems), 'problem')})"
    return (
        f"{status}  {report.location}: {plural(report.arrays, 'array')}, "
        f"{plural(report.chunks, 'chunk')}, "
        f"{human_bytes(report.nbytes)} in {seconds:.2f} s"
    )


def report_document(report: VerifyReport, seconds: float) -> dict[str, Any]:
    return {
        "location": report.location,
        "ok": report.ok,
        "problems": [{"code": p.code, "message": p.message} for p in report.problems],
        "arrays": report.arrays,
        "chunks": report.chunks,
        "bytes": report.nbytes,
        "seconds": round(seconds, 6),
    }


def run(args: argparse.Namespace) -> int:
    paths, run_dir = _targets(args.path, args.all)
    progress = sys.stderr.isatty() and not args.quiet and not args.json
    documents = []
    ok = True
    for path in paths:
        start = time.monotonic()
        report = verify(path, progress=progress)
        seconds = time.monotonic() - start
        ok = ok and report.ok
        if args.json:
            documents.append(report_document(report, seconds))
            continue
        for problem in report.problems:
            print(f"{problem.code}: {one_line(problem.message)}")
        if not args.quiet:
            print(summary_line(report, seconds))
    if args.json:
        if args.all:
            doc: dict[str, Any] = {
                "ok": ok,
                "run_directory": run_dir,
                "checkpoints": documents,
            }
            print(json.dumps(doc, indent=2, ensure_ascii=False))
        else:
            print(json.dumps(documents[0], indent=2, ensure_ascii=False))
    elif args.all and not paths and not args.quiet:
        print(f"{args.path}: no checkpoints to verify")
    return 0 if ok else 1
