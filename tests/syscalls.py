"""The file-system calls a piece of Python makes, traced with ``strace`` in a child process.

Durability (spec §9, §10) is a property of the system calls a storage makes (the file's fsync
before the link that publishes it, the directory's fsync after a rename), which no storage
interface shows. Tracing a real save, unpatched, sees them as the kernel does; tests that need
it skip where ``strace`` is missing or not permitted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TRACED = (
    "openat,open,creat,write,pwrite64,fsync,fdatasync,mkdir,mkdirat,link,linkat,"
    "unlink,unlinkat,rename,renameat,renameat2"
)
REPOSITORY = Path(__file__).resolve().parents[1]

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<([^>]*)>")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Syscall:
    """One completed call: its name, its argument text as strace shows it, and its result."""

    name: str
    text: str
    result: str
    fd_path: str | None
    """The path of the call's first argument where it is a descriptor (``strace -y``)."""

    @property
    def ok(self) -> bool:
        return not self.result.startswith("-1")

    def strings(self) -> list[str]:
        """The string arguments (paths), decoded."""
        return [_decode(s).decode("utf-8", "surrogateescape") for s in _STRING.findall(self.text)]

    def data(self) -> bytes:
        """The bytes of a ``write`` (strace -xx shows every byte as ``\\xNN``)."""
        return _decode(_STRING.findall(self.text)[0])

    def result_path(self) -> str | None:
        match = _FD.match(self.result)
        return _path(match.group(2)) if match else None


def _path(text: str) -> str:
    return _decode(text).decode("utf-8", "surrogateescape")


def _decode(text: str) -> bytes:
    return bytes(text, "latin-1").decode("unicode_escape").encode("latin-1")


def traced_syscalls(code: str, *, syscalls: str = TRACED) -> list[Syscall]:
    """Run ``code`` in a new Python process (cwd: the repository) under ``strace -f``; the
    calls of every thread, in the order they completed."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"tessera-strace-{os.getpid()}-{id(code)}.txt"
    command = ["strace", "-f", "-y", "-qq", "-xx", "-s", "1000000", "-e", f"trace={syscalls}", "-o", str(out)]
    try:
        done = subprocess.run(
            [*command, sys.executable, "-c", code],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0 and "ptrace" in done.stderr:
            pytest.skip(f"strace is not permitted here: {done.stderr.strip()[:200]}")
        assert done.returncode == 0, done.stderr[-3000:]
        lines = out.read_text(encoding="latin-1").splitlines()
    finally:
        out.unlink(missing_ok=True)
    return _parse(lines)


def _parse(lines: list[str]) -> list[Syscall]:
    calls: list[Syscall] = []
    unfinished: dict[str, str] = {}
    for line in lines:
        if line.endswith("<unfinished ...>"):
            pid = line.split(None, 1)[0]
            unfinished[pid] = line[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = _RESUMED.match(line)
        if resumed:
            pid, _, rest = resumed.groups()
            line = unfinished.pop(pid, f"{pid} ?(") + rest
        match = _LINE.match(line)
        if match is None:
            continue
        _, name, text, result = match.groups()
        fd = _FD.match(text)
        path = _path(fd.group(2)) if fd and fd.group(1) != "AT_FDCWD" else None
        calls.append(Syscall(name, text, result.strip(), path))
    return calls
