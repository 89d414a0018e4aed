"""``conformance run ./mybackend`` and ``conformance list``.

Exit status of ``run`` (PROTOCOL.md P22): 0 when every MUST case the backend
claims passes and none ends in an error, 1 otherwise, 2 when the command
line or the backend folder is wrong.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

from .cases.catalog import all_cases
from .cases.model import PROFILES, Case, Status
from .checks.readers import INTEROP_EXTRA, missing_stock_readers
from .protocol.declaration import Declaration, DeclarationError
from .report import CaseResult
from .runner import run_cases

__all__ = ["main"]

_DETAIL_LINES = 12


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.command(args))
    except DeclarationError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`conformance list | head`): no traceback; exit as
        # a process killed by SIGPIPE would, with stdout pointed at /dev/null for the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conformance",
        description="Score a Tessera implementation against the format's conformance cases "
        "(see conformance/README.md and PROTOCOL.md).",
    )
    sub = parser.add_subparsers(required=True, metavar="{run,list}")

    def selection(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--profile",
            action="append",
            choices=PROFILES,
            help="run only this profile (repeatable; default: all)",
        )
        p.add_argument(
            "--only",
            action="append",
            metavar="PATTERN",
            help="only cases whose id matches PATTERN (shell wildcards; else a substring; repeatable)",
        )

    run = sub.add_parser("run", help="run the cases against a backend folder")
    run.add_argument("backend", type=Path, help="a folder holding backend.json (PROTOCOL.md P1)")
    selection(run)
    run.add_argument("--report", type=Path, metavar="FILE", help="also write a JSON report here")
    run.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    run.add_argument("--keep", action="store_true", help="keep every case's scratch files")
    run.set_defaults(command=_run)

    listing = sub.add_parser("list", help="list the cases")
    selection(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per case")
    listing.set_defaults(command=_list)
    return parser


def _selected(args: argparse.Namespace) -> list[Case]:
    cases = all_cases()
    if args.profile:
        cases = [c for c in cases if c.profile in args.profile]
    if args.only:
        cases = [c for c in cases if any(_matches(c.id, p) for p in args.only)]
    return cases


def _matches(case_id: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(case_id, pattern)
    return pattern in case_id


def _list(args: argparse.Namespace) -> int:
    for case in _selected(args):
        if args.json:
            print(json.dumps({
                "id": case.id,
                "profile": case.profile,
                "level": case.level.value,
                "title": case.title,
                "rules": list(case.rules),
                "requires": {
                    "roles": sorted(case.requires.roles),
                    "dtypes": sorted(case.requires.dtypes),
                    "features": sorted(case.requires.features),
                },
            }))
        else:
            print(f"{case.id:<56} {case.profile:<12} {case.level.value:<6} {' '.join(case.rules)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    declaration = Declaration.load(args.backend)
    cases = _selected(args)
    if not cases:
        print("conformance: no case matches the selection", file=sys.stderr)
        return 2
    writes = [c for c in cases if c.requires.unmet(declaration.claims, declaration.in_process) is None]
    writes = [c for c in writes if "writer" in c.requires.roles]
    missing = missing_stock_readers() if writes else None
    if missing is not None:
        print(
            f"conformance: the {len(writes)} writer cases selected read what the backend writes with "
            f"zarr-python and tensorstore, which this installation lacks ({missing}): "
            f"pip install '{INTEROP_EXTRA}' (or select --profile reader-core)",
            file=sys.stderr,
        )
        return 2
    print(f"backend {declaration.name} {declaration.version} ({declaration.folder}); {len(cases)} cases")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tessera-conformance-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run_cases(declaration, cases, workdir, keep=args.keep, on_result=_print_result)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    for line in report.summary_lines():
        print(line)
    if args.report:
        report.write(args.report)
        print(f"report: {args.report}")
    if args.keep:
        print(f"scratch files: {workdir}")
    return report.exit_status


def _print_result(number: int, total: int, result: CaseResult) -> None:
    outcome = result.outcome
    width = len(str(total))
    level = "" if result.case.level.value == "MUST" else f" ({result.case.level.value})"
    line = f"[{number:>{width}}/{total}] {outcome.status.value.upper():<5} {result.case.id}{level}"
    if outcome.status is Status.SKIP:
        line += f"  -- {outcome.note}"
    print(line, flush=True)
    details = [str(f) for f in outcome.findings]
    if outcome.status is Status.ERROR:
        details = outcome.note.splitlines()
    for detail in details[:_DETAIL_LINES]:
        print(textwrap.indent(detail, " " * (2 * width + 4)))
    if len(details) > _DETAIL_LINES:
        print(" " * (2 * width + 4) + f"... {len(details) - _DETAIL_LINES} more")
