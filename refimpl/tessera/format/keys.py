"""The reversible mapping between state-dict keys and paths in the hierarchy (spec §4).

A key is a tuple of components, one per level of nesting: a string (a dict
key), or an integer (a dict's integer key, such as an optimizer's parameter
id, or a list index). Each component becomes one path segment:

- a string keeps the characters ``A-Z a-z 0-9 . _ -``; every other byte of its
  UTF-8 form becomes ``%XX`` (upper-case hex). A leading ``.`` or ``_`` is
  escaped too, so that no segment is ``.``/``..``, none starts with ``__``
  (names Zarr reserves) and none collides with Tessera's own dot-files.
  A segment that equals ``zarr.json`` ignoring case would shadow a node's
  metadata (on case-insensitive file systems too): its ``.`` is escaped.
- an integer is ``~`` followed by its decimal form (``~0``, ``~-3``); ``~`` is
  never left raw in a string segment, so the two kinds cannot collide.

Decoding is the inverse, and a path is accepted only if encoding its decoded
key gives back the same text: there is exactly one path per key, so a crafted
manifest cannot alias two keys or smuggle ``..`` through an escape.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from ..errors import InvalidKeyError

__all__ = [
    "Key",
    "KeyComponent",
    "MAX_SEGMENT_BYTES",
    "key_to_path",
    "path_to_key",
    "format_key",
    "parent_paths",
    "PathTree",
]

KeyComponent = str | int
Key = tuple[KeyComponent, ...]

MAX_SEGMENT_BYTES = 255
"""Longest segment after escaping: the common file-name limit of POSIX file systems."""

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_INT_SEGMENT = re.compile(r"~(0|-?[1-9][0-9]*)")
_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def _escape_string(component: str) -> str:
    if component == "":
        raise InvalidKeyError("empty string key component: every dict key must be non-empty")
    try:
        raw = component.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(f"key component {component!r} is not valid Unicode (lone surrogate)") from None
    out: list[str] = []
    for i, byte in enumerate(raw):
        leading = i == 0 and byte in b"._"
        out.append(chr(byte) if byte in _SAFE and not leading else f"%{byte:02X}")
    segment = "".join(out)
    if segment.lower() == "zarr.json":  # also on case-insensitive file systems
        segment = f"{segment[:4]}%2E{segment[5:]}"
    return segment


def _segment(component: KeyComponent) -> str:
    # bool is an int subclass, but True as a dict key is almost always a bug.
    if isinstance(component, bool) or not isinstance(component, (str, int)):
        raise InvalidKeyError(
            f"key component {component!r} has type {type(component).__name__}; "
            "only str and int dict keys are allowed"
        )
    segment = f"~{component}" if isinstance(component, int) else _escape_string(component)
    if len(segment.encode("ascii")) > MAX_SEGMENT_BYTES:
        raise InvalidKeyError(
            f"key component {component!r} is {len(segment)} bytes once escaped; "
            f"the limit is {MAX_SEGMENT_BYTES}"
        )
    return segment


def key_to_path(key: Sequence[KeyComponent]) -> str:
    """The path, relative to the checkpoint root, of the node that stores ``key``."""
    if not key:
        raise InvalidKeyError("empty key: a stored value must sit under at least one dict key")
    return "/".join(_segment(c) for c in key)


def _decode_segment(segment: str, path: str) -> KeyComponent:
    if _INT_SEGMENT.fullmatch(segment):
        return int(segment[1:])
    try:
        raw = bytearray()
        pos = 0
        for match in _ESCAPE.finditer(segment):
            raw += segment[pos : match.start()].encode("ascii")
            raw.append(int(match.group(1), 16))
            pos = match.end()
        raw += segment[pos:].encode("ascii")
        return raw.decode("utf-8")
    except (UnicodeError, ValueError) as exc:
        raise InvalidKeyError(f"path {path!r}: segment {segment!r} is not a valid escape") from exc


def path_to_key(path: str) -> Key:
    """The key stored at ``path``; refuses any path that is not the canonical form of a key."""
    if not isinstance(path, str) or path == "":
        raise InvalidKeyError(f"path {path!r} is not a non-empty string")
    key = tuple(_decode_segment(s, path) for s in path.split("/"))
    try:
        canonical = key_to_path(key)
    except InvalidKeyError as exc:
        raise InvalidKeyError(f"path {path!r} does not encode a valid key: {exc}") from exc
    if canonical != path:
        raise InvalidKeyError(
            f"path {path!r} is not canonical (the key it decodes to is stored at {canonical!r})"
        )
    return key


def parent_paths(path: str) -> list[str]:
    """The paths of the groups on the way to ``path``, outermost first (``a``, ``a/b`` for ``a/b/c``)."""
    parts = path.split("/")
    return ["/".join(parts[:depth]) for depth in range(1, len(parts))]


class PathTree:
    """Paths as a tree of their segments, built in time linear in the paths' length.

    A key of 100,000 segments has 100,000 ancestors whose paths total gigabytes: anything
    that needs every ancestor of hostile keys (the prefix-clash check, the groups a verifier
    visits, a reader's subtrees) walks this tree instead of building each ancestor's path
    (issue 15)."""

    __slots__ = ("children", "items")

    def __init__(self) -> None:
        self.children: dict[str, PathTree] = {}
        self.items: list[int] = []
        """Indices of the paths added at or below this node, in the order they were added."""

    def add(self, path: str, index: int) -> PathTree:
        """Add ``path`` (as item ``index``) and return its node."""
        node = self
        node.items.append(index)
        for segment in path.split("/"):
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = PathTree()
            child.items.append(index)
            node = child
        return node

    def find(self, path: str) -> PathTree | None:
        """The node of ``path``, if any path added passes through it."""
        node: PathTree | None = self
        for segment in path.split("/"):
            node = node.children.get(segment) if node is not None else None
        return node

    def groups(self) -> Iterator[str]:
        """The path of every node that has children (the groups on the way to the paths added),
        each once, parents first; each path is built only when it is reached."""
        stack: list[tuple[str, PathTree]] = [
            (name, child) for name, child in sorted(self.children.items(), reverse=True)
        ]
        while stack:
            path, node = stack.pop()
            if node.children:
                yield path
                stack.extend((f"{path}/{n}", c) for n, c in sorted(node.children.items(), reverse=True))


def format_key(key: Sequence[KeyComponent]) -> str:
    """A key as people read it in messages: its path (unambiguous, and what ``inspect`` shows)."""
    try:
        return key_to_path(key)
    except InvalidKeyError:
        return repr(tuple(key))
