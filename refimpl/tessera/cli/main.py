"""The ``tessera`` command: parses the command line and dispatches to one module per subcommand.

``arguments`` holds the grammar of every subcommand; each subcommand's module,
``tessera.cli.<name>``, has ``run(args) -> int``, the exit status, and is
imported only when that subcommand runs, so that ``--help`` and ``--version``
import neither torch nor NumPy. This module owns the exit-status contract: 0
success, 1 ``verify`` found problems, 2 an error. Every
:class:`~tessera.TesseraError` ends the program with one line
``tessera: error[<code>]: <message>`` on stderr, never a traceback, so scripts
can branch on the code; bad usage exits 2 through argparse. Whatever the
input (a hostile ``latest``, special files, unreadable paths), the output is
that one line: an exception that is not a ``TesseraError`` is a bug, still
reported in one line (``error[internal]``) that names only its type, since
its text could quote a file's content. Warnings (a run directory entry
skipped, a symlinked step) print as ``tessera: warning: <message>``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from ..errors import StorageError, TesseraError
from .arguments import UsageError, build_parser
from .text import one_line

__all__ = ["main"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_ERROR = 2


def _error(code: str, message: str) -> int:
    print(f"tessera: error[{code}]: {one_line(message)}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    if hasattr(sys.stdout, "reconfigure"):
        # A key or a value may hold characters the terminal's encoding lacks: escape them
        # rather than fail halfway through a listing.
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or bad usage (argparse printed why)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show_warning
            command = importlib.import_module(f"{__package__}.{args.command}")
            status: int = command.run(args)
        sys.stdout.flush()
        return status
    except TesseraError as exc:
        return _error(exc.code, str(exc))
    except UsageError as exc:
        print(f"tessera {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader of our output went away (`tessera inspect ... | head`): no traceback;
        # point stdout at /dev/null so the final flush stays quiet, and exit as a process
        # killed by SIGPIPE would (128 + 13), not with a status that means something else.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        return _error(StorageError.code, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, and never the text (it may quote a file)
        return _error("internal", f"{type(exc).__name__} in tessera {args.command}; please report this bug")


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    print(f"tessera: warning: {one_line(str(message))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
