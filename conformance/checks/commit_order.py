"""Watching a backend write a checkpoint: the claim first, the root last, nothing after (spec §9).

Usage, by the harness around one write (one or many ranks)::

    with WriteWatch(root) as watch:
        ...  # the backend writes ``root`` (an empty directory, or a path whose parent exists)
    findings = watch.findings()

Why the judgement is sound. On Linux one inotify instance queues the events
of all its watches, from every process, in one queue, in the order the kernel
made them; an event is queued inside the system call that caused it, before
the call returns. If rank 1 closes its last chunk and only then reports to the
coordinator, which then links the root, the close precedes the link in the
queue. So every finding below rests on two events whose order the kernel saw,
and a correct writer (every file created once, closed, the root published by
``link`` of a temporary file that is unlinked afterwards, R9.10) gets none.

What it cannot see (false negatives, never false positives):

- A directory is watched when its creation is read from the queue; what a
  writer made in it before that is found by a scan and carries no event. Such
  files are judged by time stamps instead (a file modified strictly after the
  root's ``ctime`` was written after the commit; ``link`` and the unlink of the
  temporary set that ``ctime``, a writer that wrote its temporary root early
  does not). Writes after the commit within one time-stamp tick are missed.
- A root created during the write is watched once its creation is read: if
  the claim and other entries are both found by that first scan, their order
  is unknown.
- A file written twice through one creation (reopened for writing) is not
  judged: a writer that reopens a complete file only to fsync it would look
  the same (R9.5 is judged for renames over an existing file instead).
- After the kernel's queue overflows, later events are lost and only the
  judgements made before it, and the time stamps, remain.

Without inotify (not Linux), only the time stamps are compared.
"""

from __future__ import annotations

import json
import os
import re
import select
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..cases.model import Finding
from . import inotify
from .findings import Findings
from .inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_DONT_FOLLOW,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Event,
    Inotify,
)

__all__ = ["WriteWatch"]

CLAIM = ".tessera-claim.json"
ROOT = "zarr.json"
_TMP = re.compile(r"zarr\.json\.[^/]+\.tmp")
_MASK = (
    IN_CREATE
    | IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
)
_PARENT_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW
_EXISTS = 1
"""The file is there, as far as the events and scans tell."""
_SEEN = 2
"""An event completed the file (created, moved in, closed after writing): its order is known."""
_AFTER_KEPT = 1000
"""Changes after the commit kept for the report (more are counted): memory stays bounded."""


@dataclass(frozen=True, slots=True)
class _Change:
    seq: int
    """Position in the event queue, from 1."""
    what: str
    path: str


def _is_tmp(path: str) -> bool:
    """The temporary root of R9.10 (its save id is checked against the manifest at the end)."""
    return _TMP.fullmatch(path) is not None


class WriteWatch:
    """Records the order in which a checkpoint's files appear and change; judges it against the commit
    rules: R9.1 (claim first), R9.9 (root last), R9.6 (nothing after), R9.10 (root by link), R9.5 (no
    file replaced) and R2.5 (no transient file)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.notes: list[str] = []
        """How the write was watched, and what could not be judged (not findings: not the writer's fault)."""
        self._inotify: Inotify | None = None
        self._thread: threading.Thread | None = None
        self._stop: tuple[int, int] | None = None
        self._result: list[Finding] | None = None
        self._watching = False
        """inotify watched the write (else only time stamps are compared)."""
        self._exited = False
        # Written only by the watching thread once it runs, read after it has joined.
        self._seq = 0
        self._wds: dict[int, str] = {}
        self._parent_wd: int | None = None
        self._files: dict[str, int] = {}
        self._claim_at: int | None = None
        self._first_other: _Change | None = None
        self._unconfirmed: set[str] = set()
        """Top-level names found by the late scan of a root made during the write, not yet seen created."""
        self._prewatch: set[str] = set()
        """Top-level names that existed before the root's watch began (seen deleted, never created)."""
        self._root_at: int | None = None
        self._root_renamed = False
        self._after: list[_Change] = []
        self._after_more = 0
        self._tmp_names: set[str] = set()
        self._complete = True
        """Every event since the watch began was read and judged (no overflow, no failure)."""
        self._online = Findings()

    # -- the watch ---------------------------------------------------------------------------

    def __enter__(self) -> WriteWatch:
        if not inotify.available():
            self.notes.append(
                "no inotify on this system: the commit order is judged by modification times only "
                "(R9.9); the claim's order (R9.1) and deletions are not seen"
            )
            return self
        try:
            self._inotify = Inotify()
            if not self.root.is_dir():
                self._parent_wd = self._inotify.add_watch(str(self.root.parent), _PARENT_MASK)
            # Anything here now was there before the write began (the harness starts it after
            # this returns), so it is recorded, not judged.
            if self.root.is_dir():
                self._watch_tree("", initial=True)
        except OSError as exc:
            self._complete = False
            self.notes.append(
                f"cannot watch {self.root} ({exc}): the commit order is judged by time stamps only"
            )
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            return self
        self._stop = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"WriteWatch {self.root}", daemon=True)
        self._thread.start()
        self._watching = True
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Every event of the finished write is already queued: the thread drains the queue, then ends.
        if self._thread is not None and self._stop is not None:
            os.write(self._stop[1], b"x")
            self._thread.join()
            for fd in self._stop:
                os.close(fd)
        if self._inotify is not None:
            self._inotify.close()
        self._exited = True

    def _run(self) -> None:
        assert self._inotify is not None and self._stop is not None
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._stop[0], select.POLLIN)
        stopping = False
        try:
            while not stopping:
                stopping = any(fd == self._stop[0] for fd, _ in poller.poll())
                events = self._inotify.read()
                while events:
                    for event in events:
                        self._handle(event)
                    events = self._inotify.read()
        except Exception as exc:  # a bug here must cost the judgement, not the harness
            self._stop_judging(f"the watch failed ({type(exc).__name__}: {exc})")

    def _stop_judging(self, why: str) -> None:
        self._complete = False
        self.notes.append(
            f"{why}: events after this point were not judged; the commit order rests on what was "
            "seen before and on modification times"
        )

    def _watch_tree(self, rel: str, *, initial: bool) -> None:
        """Watch ``rel`` and every directory below it; what is already there is recorded as scanned."""
        assert self._inotify is not None
        pending = [rel]
        while pending:
            current = pending.pop()
            directory = self.root / current if current else self.root
            try:
                wd = self._inotify.add_watch(str(directory), _MASK)
                if self._wds.get(wd) == current:
                    continue  # already watched (one creation event can follow another's scan)
                self._wds[wd] = current
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed again before the watch: its removal is an event of its parent
            except OSError as exc:
                self.notes.append(f"{current or 'the root'} was not watched ({exc}): judged by time stamps")
                continue
            for entry in entries:
                path = f"{current}/{entry.name}" if current else entry.name
                if not current and not initial:
                    self._unconfirmed.add(path)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                else:
                    self._files[path] = self._files.get(path, 0) | _EXISTS

    # -- events ------------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if not self._complete:
            return
        if event.mask & IN_Q_OVERFLOW:
            self._stop_judging("the kernel's inotify queue overflowed")
            return
        if event.wd == self._parent_wd:
            self._parent_event(event)
            return
        directory = self._wds.get(event.wd)
        if directory is None:
            return
        if event.mask & IN_IGNORED:
            del self._wds[event.wd]
            return
        self._seq += 1
        if event.mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            # A subdirectory's own removal is also an event of its parent; the root's is not.
            if not directory:
                self._removed(".", "moved away" if event.mask & IN_MOVE_SELF else "deleted")
            return
        path = f"{directory}/{event.name}" if directory else event.name
        if event.mask & (IN_CREATE | IN_MOVED_TO):
            self._appeared(path, moved=bool(event.mask & IN_MOVED_TO), is_dir=bool(event.mask & IN_ISDIR))
        elif event.mask & IN_CLOSE_WRITE:
            self._files[path] = self._files.get(path, 0) | _SEEN
            if not (self._root_at is not None and _is_tmp(path)):  # the linked temporary may close late
                self._record(_Change(self._seq, "closed after writing", path))
        elif event.mask & (IN_DELETE | IN_MOVED_FROM):
            self._files.pop(path, None)
            if path in self._unconfirmed:
                self._unconfirmed.discard(path)
                self._prewatch.add(path)
            if not _is_tmp(path):
                self._removed(path, "moved away" if event.mask & IN_MOVED_FROM else "deleted")

    def _parent_event(self, event: Event) -> None:
        """The root appeared during the write: watch it from now on."""
        if event.name != self.root.name or not event.mask & IN_ISDIR:
            return
        if event.mask & IN_MOVED_TO:
            self.notes.append(
                "the root directory was moved into place: what it held then was found by a scan, "
                "in no known order"
            )
        assert self._inotify is not None and self._parent_wd is not None
        self._watch_tree("", initial=False)
        self._inotify.rm_watch(self._parent_wd)
        self._parent_wd = None

    def _appeared(self, path: str, *, moved: bool, is_dir: bool) -> None:
        what = "moved in" if moved else "created"
        self._unconfirmed.discard(path)  # seen created, so made after the watch began
        if path == CLAIM and self._claim_at is None:
            self._claim_at = self._seq
        elif self._first_other is None and path != CLAIM:
            self._first_other = _Change(self._seq, what, path)
        if path == ROOT and self._root_at is None:
            self._root_at, self._root_renamed = self._seq, moved
        else:
            self._record(_Change(self._seq, what, path))
        if _is_tmp(path):
            self._tmp_names.add(path)
        if is_dir:
            self._watch_tree(path, initial=False)
            return
        if moved and self._files.get(path, 0) & _EXISTS:
            self._online.add(
                "R9.5",
                f"{path} was replaced by a rename onto it (event {self._seq}): every file is created "
                "exclusively, once, and never overwritten",
            )
        self._files[path] = _EXISTS | _SEEN

    def _removed(self, path: str, what: str) -> None:
        if self._root_at is not None:
            self._record(_Change(self._seq, what, path))
            return
        name = "the root directory" if path == "." else path
        self._online.add(
            "R2.5",
            f"{name} was {what} during the write (event {self._seq}): a writer makes no file but the "
            "claim, the documents and the chunks, and no transient one but zarr.json.<save_id>.tmp",
        )

    def _record(self, change: _Change) -> None:
        """A change after the commit (the root's appearance); judged at the end, once the tree is final."""
        if self._root_at is None:
            return
        if len(self._after) < _AFTER_KEPT:
            self._after.append(change)
        else:
            self._after_more += 1

    # -- the judgement -----------------------------------------------------------------------

    def findings(self) -> list[Finding]:
        """Every broken commit rule, each citing the two events (or time stamps) that show it."""
        if not self._exited:
            raise RuntimeError("WriteWatch.findings() is for after the watched write: leave the with block")
        if self._result is None:
            out = self._online
            reported: set[str] = set()
            if self._watching:
                self._judge_claim(out)
                reported = self._judge_root(out)
            self._judge_times(out, reported)
            self._result = out.result()
        return list(self._result)

    def _judge_claim(self, out: Findings) -> None:
        """R9.1: the claim is created before anything else under the root."""
        # Without every event, a name found by the first scan may have been seen created in a lost one.
        prewatch = self._prewatch | self._unconfirmed if self._complete else self._prewatch
        if self._claim_at is None and CLAIM in prewatch:
            return  # made before the root was watched; its order against the others so made is unknown
        first = self._first_other
        if first is not None and (self._claim_at is None or first.seq < self._claim_at):
            if self._claim_at is not None:
                when = f"at event {self._claim_at}"
            else:
                when = "never" if self._complete else "not before the watch stopped judging"
            out.add(
                "R9.1",
                f"{first.path} was {first.what} at event {first.seq}, and the claim {CLAIM} {when}: "
                "a writer claims the root before it creates anything else there",
            )
            return
        early = sorted(p for p in prewatch if p != CLAIM)
        if early:
            claim = f"at event {self._claim_at}" if self._claim_at is not None else "never"
            out.add(
                "R9.1",
                f"{', '.join(early[:5])} existed before the root was watched, and the claim {CLAIM} was "
                f"created {claim}: a writer claims the root before it creates anything else there",
            )

    def _judge_root(self, out: Findings) -> set[str]:
        """R9.9, R9.6, R9.10: the root appears last, by ``link``, and nothing changes after it.

        Returns the paths reported, which the time stamps need not report again.
        """
        if self._root_at is None:
            if self._complete and (self.root / ROOT).exists():
                self.notes.append(
                    "the root zarr.json was found by a scan, not seen appearing: its order is judged by "
                    "modification times only"
                )
            return set()
        at = self._root_at
        if self._root_renamed:
            out.add(
                "R9.10",
                f"the root zarr.json was published by a rename (event {at}); POSIX writers publish with "
                "link() of zarr.json.<save_id>.tmp, which cannot replace a rival's root",
            )
        last: dict[str, _Change] = {}
        for change in self._after:  # one finding per path, for its last change
            last.pop(change.path, None)
            last[change.path] = change
        for change in last.values():
            if change.path == ROOT and change.what == "closed after writing":
                out.add(
                    "R9.10",
                    f"the root zarr.json was written in place: it appeared at event {at}, before it was "
                    f"closed after writing at event {change.seq}; a reader could see it partial "
                    "(write zarr.json.<save_id>.tmp, fsync it, then link it)",
                )
            elif change.what != "deleted" and change.what != "moved away" and self._in_tree(change.path):
                out.add(
                    "R9.9",
                    f"the root zarr.json appeared at event {at}, before {change.path} was {change.what} "
                    f"at event {change.seq}: the root is published last",
                )
            else:
                name = "the root directory" if change.path == "." else change.path
                out.add(
                    "R9.6",
                    f"{name} was {change.what} at event {change.seq}, after the commit at event {at}: "
                    "nothing in a committed checkpoint is written, changed or deleted",
                )
        if self._after_more:
            out.add("R9.6", f"... and {self._after_more} more changes after the commit")
        self._judge_tmp_name(out)
        return set(last)

    def _in_tree(self, path: str) -> bool:
        return path != "." and os.path.lexists(self.root / path)

    def _judge_tmp_name(self, out: Findings) -> None:
        """R9.10 names the temporary root after the save id the manifest carries."""
        save_id = _save_id(self.root / ROOT)
        if save_id is None:
            return
        for name in sorted(self._tmp_names - {f"zarr.json.{save_id}.tmp"}):
            out.add("R9.10", f"a temporary root {name} was written; R9.10 names it zarr.json.{save_id}.tmp")

    def _judge_times(self, out: Findings, reported: set[str]) -> None:
        """Files with no event that orders them: modified after the root's ``ctime`` means after the commit.

        ``ctime``, not ``mtime``: publishing (``link``) and removing the temporary name set the root's
        ``ctime``, while its ``mtime`` is when the temporary file was written, maybe long before.
        """
        try:
            published = os.lstat(self.root / ROOT).st_ctime_ns
        except OSError:
            return  # never committed: nothing was published before anything
        by_events = self._watching and self._complete and self._root_at is not None
        how = "found by a scan, not by an event: " if self._watching else ""
        for path, mtime in _file_times(self.root):
            if path == ROOT or path in reported or (by_events and self._files.get(path, 0) & _SEEN):
                continue
            if mtime > published:
                out.add(
                    "R9.9",
                    f"{path} ({how}modified at {mtime} ns) was written after the root zarr.json was "
                    f"published (its ctime is {published} ns): the root is published last",
                )


def _file_times(root: Path) -> list[tuple[str, int]]:
    """Every file under ``root`` (symbolic links as themselves) with its ``st_mtime_ns``."""
    found: list[tuple[str, int]] = []
    pending = [""]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(root / current if current else root))
        except OSError:
            continue
        for entry in entries:
            path = f"{current}/{entry.name}" if current else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                else:
                    found.append((path, entry.stat(follow_symlinks=False).st_mtime_ns))
            except OSError:
                continue
    return found


def _save_id(root_doc: Path) -> str | None:
    """The save id of a readable root document, else ``None`` (the document checks report why)."""
    try:
        doc = json.loads(root_doc.read_bytes())
        save_id = doc["attributes"]["tessera"]["save_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return save_id if isinstance(save_id, str) else None
