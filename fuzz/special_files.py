"""Special files, links and sparse files put where a checkpoint expects a regular file: what a
reader must refuse unread (R11.3) or bound (R10.2), made at run time because git cannot hold them."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

__all__ = ["make_special"]


def make_special(path: Path, spec: dict[str, Any]) -> None:
    """Put a special file, link or sparse file at ``path``, replacing what is there."""
    if path.is_symlink() or path.is_file() or path.is_socket() or path.is_fifo():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = spec["make"]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":  # the same device as /dev/zero: endless bytes if read
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            old = Path.cwd()
            os.chdir(path.parent)  # a socket's path is limited to about 100 bytes
            try:
                sock.bind(path.name)
            finally:
                os.chdir(old)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(spec["target"])
    elif kind == "sparse":
        with open(path, "wb") as f:
            f.truncate(spec["size"])
    else:
        raise ValueError(f"unknown special file kind {kind!r}")
