"""What the subcommands share: finding the checkpoint a path names, and formatting sizes and codecs.

A path given to ``inspect`` or ``verify`` may be a checkpoint or a run
directory; a run directory stands for the checkpoint its ``latest`` names,
because that is the one a resumed training run would load.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..api.run_dir import LATEST, RunDirectory
from ..errors import CheckpointNotFoundError
from ..format.layout import ArrayLayout
from ..storage.base import ROOT_METADATA

__all__ = [
    "Target",
    "UsageError",
    "codecs_label",
    "compact_json",
    "disk_usage",
    "human_bytes",
    "is_run_directory",
    "one_line",
    "plural",
    "resolve",
    "shorten",
    "unicode_ok",
]


class UsageError(Exception):
    """A command was used on the wrong kind of path; ``main`` prints it as argparse does, exit 2."""


@dataclass(frozen=True, slots=True)
class Target:
    """The checkpoint a command works on, and the run directory it was reached through, if any."""

    path: Path
    run_dir: Path | None = None


def is_run_directory(path: Path) -> bool:
    """A directory that is not itself a checkpoint and holds ``latest`` or ``step-*`` checkpoints."""
    if not path.is_dir() or os.path.lexists(path / ROOT_METADATA):
        return False
    return os.path.lexists(path / LATEST) or bool(RunDirectory(path).checkpoints())


def resolve(path: str | os.PathLike[str]) -> Target:
    """The checkpoint ``path`` names: itself, or the ``latest`` of a run directory.

    Raises ``CheckpointNotFoundError`` for a path that does not exist, or a
    run directory with no committed checkpoint yet. A directory that is
    neither is returned as is, so that opening it gives the precise error
    (uncommitted, not a Tessera checkpoint...).
    """
    target = Path(path)
    if not target.exists():
        raise CheckpointNotFoundError(f"no checkpoint or run directory at {target}")
    if is_run_directory(target):
        latest = RunDirectory(target).latest()
        if latest is None:
            raise CheckpointNotFoundError(
                f"run directory {target} has no committed checkpoint yet (no {LATEST!r} file)"
            )
        return Target(latest, target)
    return Target(target)


def human_bytes(n: int | float) -> str:
    """IEC units with one decimal (``4.3 MiB``); plain bytes below 1 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def codecs_label(layout: ArrayLayout) -> str:
    """The codecs after ``bytes`` (which every array has): ``crc32c`` or ``zstd(3)+crc32c``."""
    parts: list[str] = []
    for codec in layout.codecs[1:]:
        name = codec["name"]
        level = codec.get("configuration", {}).get("level")
        parts.append(f"{name}({level})" if level is not None else name)
    return "+".join(parts)


def disk_usage(path: Path) -> int:
    """Bytes of every regular file under ``path`` (symlinks are not followed)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            total += stat.st_size
    return total


def one_line(message: str) -> str:
    """A multi-line message (a schema error lists each violation) joined into one line."""
    line = ""
    for part in (p.strip() for p in message.splitlines()):
        if part:
            line += ("" if not line else " " if line.endswith(":") else "; ") + part
    return line


def plural(count: int, noun: str) -> str:
    """``1 chunk``, ``2 chunks``, ``3 entries``."""
    if count == 1:
        return f"{count} {noun}"
    if noun.endswith("y") and noun[-2:-1] not in tuple("aeiou"):
        return f"{count} {noun[:-1]}ies"
    return f"{count} {noun}s"


def unicode_ok(stream: TextIO = sys.stdout) -> bool:
    """Whether box-drawing characters can be written to ``stream``."""
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf16", "utf32")


def compact_json(value: Any) -> str:
    """JSON on one line, as the manifest holds it."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in ``...`` where cut."""
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."
