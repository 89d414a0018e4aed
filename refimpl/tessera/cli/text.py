"""Text for the terminal: sizes, plurals, codecs, messages on one line. Imports nothing heavy,
so that ``main`` can print an error with it before any subcommand's module is imported."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ..format.layout import ArrayLayout

__all__ = ["codecs_label", "compact_json", "human_bytes", "one_line", "plural", "shorten", "unicode_ok"]


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
