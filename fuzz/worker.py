"""The child process that runs fuzz operations, one request per line, for a :class:`~fuzz.harness.Worker`.

Run as ``python -m fuzz.worker``. It reads JSON requests on stdin and answers each with one JSON
line on a private copy of stdout (everything else the process prints goes to stderr or is
captured), so that the parent can time each request and kill the process when it hangs.

Memory: before each request the kernel's peak-RSS mark of this process is reset (writing ``5``
to ``/proc/self/clear_refs``) and read back after (``VmHWM``); the answer carries the peak's growth
over the RSS at the start. ``RLIMIT_AS`` cannot bound it: with torch imported the process maps
gigabytes of address space it never touches. Where the reset is unavailable the growth is
measured against the peak after imports (``ru_maxrss``), which can only overstate it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import tessera
import torch
from tessera.cli.main import main as cli_main

from .generate import template_for
from .mutations import run_campaign_case

__all__ = ["run_op", "serve"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory growth of one request, in MiB (see the module docstring)."""

    def __init__(self) -> None:
        self.baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def __enter__(self) -> MemoryMeter:
        self.resettable = _reset_peak()
        self.start_kib = _status_kib("VmRSS") if self.resettable else self.baseline_kib
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_kib("VmHWM") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.growth_mib = max(0, peak - self.start_kib) / 1024


def _read_everything(path: Path) -> None:
    checkpoint = tessera.open(path)
    for key in checkpoint:
        entry = checkpoint.entry(key)
        if entry.kind == "value":
            checkpoint.value(key)
        else:
            checkpoint.read(key)


def _run_cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(argv)
    return status, out.getvalue() + err.getvalue()


def run_op(op: dict[str, Any], root: Path, state: str | None) -> dict[str, Any]:
    """Run one operation of a case on the prepared case directory ``root``; never raises.

    The answer: ``outcome`` ``ok`` / ``tessera`` (a :class:`tessera.TesseraError`, with its
    ``code``) / ``crash`` (anything else, with its type and traceback) / for ``verify`` the
    problem codes it reported; ``text`` is every message and output the user would see.
    """
    target = root / op.get("path", "ckpt")
    answer: dict[str, Any] = {"outcome": "ok", "code": None, "text": ""}
    try:
        kind = op["op"]
        if kind == "load":
            tessera.load(target)
        elif kind == "load_template":
            assert state is not None, "load_template needs the case's state"
            tessera.load(target, template_for(state))
        elif kind == "open_read":
            _read_everything(target)
        elif kind == "verify":
            report = tessera.verify(target)
            answer["problems"] = sorted({p.code for p in report.problems})
            answer["text"] = "\n".join(p.message for p in report.problems)
        elif kind == "latest":
            tessera.RunDirectory(target).latest()
        elif kind == "checkpoints":
            tessera.RunDirectory(target).checkpoints()
        elif kind == "retention":
            tessera.RunDirectory(target, keep_last=op["keep_last"]).apply_retention()
        elif kind == "cli":
            status, text = _run_cli([arg.replace("{root}", str(root)) for arg in op["argv"]])
            answer.update(status=status, text=text)
        else:
            raise ValueError(f"unknown operation {kind!r}")
    except tessera.TesseraError as exc:
        answer.update(outcome="tessera", code=exc.code, text=f"{type(exc).__name__}: {exc}")
    except BaseException as exc:  # noqa: BLE001 - every other exception is what the fuzzing looks for
        answer.update(
            outcome="crash",
            code=type(exc).__name__,
            text="".join(traceback.format_exception(exc))[-3000:],
        )
    return answer


def serve() -> None:
    """Answer requests until stdin closes: ``{"op": ...}`` runs one case operation,
    ``{"campaign": ...}`` one campaign case (see :mod:`fuzz.mutations`)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(1)
    meter = MemoryMeter()
    protocol.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        started = time.monotonic()
        with meter:
            if "campaign" in request:
                answer = run_campaign_case(request["campaign"])
            else:
                answer = run_op(request["op"], Path(request["root"]), request.get("state"))
        answer["seconds"] = round(time.monotonic() - started, 3)
        answer["memory_mib"] = round(meter.growth_mib, 1)
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    serve()
