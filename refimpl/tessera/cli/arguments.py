"""The ``tessera`` command line's grammar: every subcommand and its arguments, and usage errors.

Kept apart from the subcommands' modules so that ``tessera --help`` and ``tessera --version``
build the whole parser without importing any of them (and with them torch and NumPy): ``main``
imports the module of a subcommand, ``tessera.cli.<name>``, only when that subcommand runs, and
calls its ``run(args)``.
"""

from __future__ import annotations

import argparse

from ..version import __version__

__all__ = ["SUBCOMMANDS", "UsageError", "build_parser"]

SUBCOMMANDS = ("inspect", "verify", "ls")
"""Each subcommand, also the name of its module in ``tessera.cli``."""


class UsageError(Exception):
    """A command was used on the wrong kind of path; ``main`` prints it as argparse does, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Inspect, verify and list Tessera checkpoints (Zarr v3 + manifest).",
        epilog="Exit status: 0 ok, 1 verify found problems, 2 error. "
        "Errors print 'tessera: error[<code>]: <message>'.",
    )
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _inspect(subparsers)
    _verify(subparsers)
    _ls(subparsers)
    return parser


def _inspect(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what a checkpoint holds",
        description=(
            "Show a checkpoint's header (format, writer, save, metadata) and a tree of its "
            "entries with kind, dtype, shape, chunks, size and codecs. PATH may be a run "
            "directory: its latest checkpoint is inspected. Reads the manifest and stats "
            "each chunk; never reads chunk data (use 'tessera verify' for that)."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="a checkpoint or a run directory")
    parser.add_argument("--json", action="store_true", help="print the manifest and computed sizes as JSON")
    parser.add_argument("--values", action="store_true", help="print JSON values and metadata in full")
    parser.add_argument(
        "--depth",
        type=_depth,
        metavar="N",
        help="show N levels of the tree; deeper groups are summed up in one line",
    )


def _depth(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("depth must be at least 1")
    return value


def _verify(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check every chunk and document of a checkpoint",
        description=(
            "Check a checkpoint completely: the manifest and every zarr.json against their "
            "schemas, every chunk present, of the right size and matching its CRC32C. Lists "
            "every problem found as 'code: message'. PATH may be a run directory: its latest "
            "checkpoint is verified, or every checkpoint with --all. Exit status: 0 sound, "
            "1 problems found, 2 error (no checkpoint at PATH, bad usage)."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="a checkpoint or a run directory")
    parser.add_argument(
        "--all", action="store_true", help="verify every checkpoint of the run directory PATH"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print problems only: no progress, no summary"
    )
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")


def _ls(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ls",
        help="list the checkpoints of a run directory",
        description=(
            "List the checkpoints of a run directory: name, step, committed or UNCOMMITTED, "
            "size on disk, creation time; '*' marks the one 'latest' names."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds step-*/ and latest)")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
