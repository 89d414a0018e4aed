"""Every file the checkpoint must hold, and nothing else (spec R2.4, R2.5, R5.2, R5.6, R5.7, R16.11).

The tree is walked once, without following symbolic links, and each entry is
placed: a document the manifest implies, a chunk of its array's grid, or
something a writer must not leave. Chunks are counted per array rather than
listed up front, so that a grid of millions of chunks costs no more memory
than the files that are there. Missing documents are the document checks'
to report; missing chunks are reported here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tessera.format import chunk_key

from .documents import CLAIM, ROOT
from .entries import StoredArray, StoredEntries
from .findings import Findings

__all__ = ["check_files"]

_TMP = re.compile(r"zarr\.json\.[^/]+\.tmp")
_INDEX = re.compile(r"0|[1-9][0-9]*")
_MISSING_NAMED = 20


def check_files(
    root: Path, stored: StoredEntries, groups: set[str], world_size: int, out: Findings
) -> set[str]:
    """Report missing chunks and every file or directory the spec does not name; the arrays at fault."""
    tree = _Tree(root, stored, groups, world_size, out)
    tree.walk()
    for array in stored.arrays:
        tree.report_missing(array)
    return tree.faulty


class _Tree:
    """One walk of the tree, with what each entry is checked against."""

    def __init__(self, root: Path, stored: StoredEntries, groups: set[str], world_size: int, out: Findings):
        self.root = root
        self.arrays = {a.path: a for a in stored.arrays}
        self.unusable = stored.unusable
        self.documents = {CLAIM, ROOT, *(f"{g}/{ROOT}" for g in groups)}
        self.documents.update(f"{p}/{ROOT}" for p in stored.array_paths)
        self.directories = set(groups) | set(stored.array_paths)
        self.world_size = world_size
        self.out = out
        self.present: dict[str, set[str]] = {path: set() for path in self.arrays}
        self.faulty: set[str] = set()

    def walk(self) -> None:
        pending = [""]
        while pending:
            current = pending.pop()
            try:
                entries = sorted(
                    os.scandir(self.root / current if current else self.root), key=lambda e: e.name
                )
            except OSError as exc:
                self.out.add("R2.5", f"{current} cannot be listed: {exc}")
                continue
            for entry in entries:
                path = f"{current}/{entry.name}" if current else entry.name
                owner, rest = self._owner(path)
                if owner in self.unusable:
                    continue  # its entry gives no layout (reported): nothing under it can be judged
                if entry.is_dir(follow_symlinks=False):
                    # What an unexpected directory holds is reported file by file; an empty one as itself.
                    pending.append(path)
                    if not self._expected_directory(path, owner, rest) and _is_empty(entry.path):
                        self._extra(path, owner, rest, "an empty directory")
                elif entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                    what = "a symbolic link" if entry.is_symlink() else "not a regular file"
                    self.out.add("R2.5", f"{path} is {what}; a checkpoint holds regular files only (R11.3)")
                elif path in self.documents:
                    continue
                elif owner is not None and self._is_chunk(self.arrays[owner], rest):
                    self.present[owner].add(rest)
                else:
                    self._extra(path, owner, rest, "a file")

    def _owner(self, path: str) -> tuple[str | None, str]:
        """The array (or unusable array entry) whose directory holds ``path``, and the path within it."""
        parts = path.split("/")
        for depth in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:depth])
            if prefix in self.arrays or prefix in self.unusable:
                return prefix, "/".join(parts[depth:])
        return None, path

    def _expected_directory(self, path: str, owner: str | None, rest: str) -> bool:
        if path in self.directories:
            return True
        if owner is None:
            return False
        parts = rest.split("/")
        layout = self.arrays[owner].layout
        # ``c`` and the leading indices of chunk keys; a 0-d array's ``c`` is its chunk, a file.
        return (
            parts[0] == "c"
            and len(parts) <= len(layout.shape)
            and all(_valid_index(i, n) for i, n in zip(parts[1:], layout.grid_shape, strict=False))
        )

    @staticmethod
    def _is_chunk(array: StoredArray, rest: str) -> bool:
        """R5.2: ``c/i0/.../ik`` within the grid, decimal without leading zeros; ``c`` for a 0-d array."""
        parts = rest.split("/")
        grid = array.layout.grid_shape
        return (
            parts[0] == "c"
            and len(parts) == len(grid) + 1
            and all(_valid_index(i, n) for i, n in zip(parts[1:], grid, strict=True))
        )

    def _extra(self, path: str, owner: str | None, rest: str, what: str) -> None:
        if owner is not None and rest.split("/")[0] == "c":
            array = self.arrays[owner]
            if array.layout.chunk_count == 0:
                self.out.add(
                    "R5.6",
                    f"{path} ({what}) exists, but {owner} has shape "
                    f"{list(array.layout.shape)} and so no chunk at all",
                )
            else:
                self.out.add(
                    "R2.5",
                    f"{path} ({what}) is not a chunk key of {owner}'s grid "
                    f"{list(array.layout.grid_shape)} (R5.2)",
                )
        elif _TMP.fullmatch(path):
            self.out.add(
                "R2.5", f"{path} ({what}) is a leftover temporary root: R9.10 removes it after the link"
            )
        elif path.rsplit("/", 1)[-1] == ROOT:
            self.out.add(
                "R2.4",
                f"{path} ({what}) is a zarr.json at {path.rsplit('/', 1)[0]}, which is neither "
                "the root, an array of the manifest, nor a proper prefix of an array path",
            )
        else:
            ranks = " (R16.11: ranks move chunk parts through the process group, never through files)"
            self.out.add(
                "R2.5",
                f"{path} ({what}) is not part of the checkpoint: a writer leaves only the claim, "
                f"the documents and the chunks{ranks if self.world_size > 1 else ''}",
            )

    def report_missing(self, array: StoredArray) -> None:
        """R5.7: every chunk of the grid exists, fill-valued ones included."""
        layout = array.layout
        missing = layout.chunk_count - len(self.present[array.path])
        if missing <= 0:
            return
        self.faulty.add(array.path)
        named: list[str] = []
        for index in layout.chunk_indices():
            key = chunk_key(index)
            if key not in self.present[array.path]:
                named.append(key)
                if len(named) == _MISSING_NAMED:
                    break
        listed = ", ".join(named) + (f" and {missing - len(named)} more" if missing > len(named) else "")
        self.out.add("R5.7", f"{array.path} lacks {missing} of its {layout.chunk_count} chunks: {listed}")


def _is_empty(directory: str) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def _valid_index(text: str, count: int) -> bool:
    return _INDEX.fullmatch(text) is not None and int(text) < count
