"""``tessera ls RUN_DIR``: the checkpoints of a run, oldest first, the latest marked ``*``.

A checkpoint is ``committed`` when its root ``zarr.json`` exists and
``UNCOMMITTED`` otherwise (a save in progress, or one that died: loaders
refuse it). Only the manifest of each committed checkpoint is read, for its
creation time; sizes come from the files stored. RUN_DIR is a path or a URL of a registered scheme.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..api.checkpoint import open_checkpoint
from ..api.run_dir import RunDirectory
from ..errors import CheckpointNotFoundError, TesseraError
from ..format.strict_json import loads
from ..storage.base import CLAIM_FILE, FileMissingError, Storage
from ..storage.resolve import storage_for
from .arguments import UsageError
from .common import disk_usage, is_present, is_run_directory
from .text import human_bytes, one_line, plural

__all__ = ["list_run", "run"]

_CLAIM_MAX_BYTES = 1 << 16
"""A claim is a few hundred bytes; a larger one is not read (it may be anything)."""


def _created(checkpoint: Storage, committed: bool) -> tuple[str | None, str | None]:
    """The save's creation time, from the manifest (or the claim, if uncommitted), and any error."""
    try:
        if committed:
            return open_checkpoint(checkpoint).manifest.created, None
        try:
            raw = checkpoint.read_file(CLAIM_FILE, _CLAIM_MAX_BYTES)
        except FileMissingError:
            return None, None
        claim = loads(raw, f"{checkpoint.location}/{CLAIM_FILE}")
        created = claim.get("created") if isinstance(claim, dict) else None
        return (created if isinstance(created, str) else None), None
    except TesseraError as exc:
        return None, f"error[{exc.code}]: {one_line(str(exc))}"
    except OSError:
        return None, None


def list_run(root: Storage) -> tuple[list[dict[str, Any]], str | None]:
    """One record per checkpoint, and a warning if ``latest`` is unusable."""
    run_dir = RunDirectory(root)
    warning = None
    try:
        run_dir.latest()
    except TesseraError as exc:
        warning = f"'latest' is unusable: {one_line(str(exc))}"
    records = []
    for info in run_dir.checkpoints():
        path = root.child(info.name)
        created, error = _created(path, info.committed)
        records.append(
            {
                "name": info.name,
                "step": info.step,
                "committed": info.committed,
                "latest": info.latest,
                "bytes": disk_usage(path),
                "created": created,
                "error": error,
            }
        )
    return records, warning


def _when(created: str | None) -> str:
    """``2026-11-21 08:38:19Z`` from the RFC 3339 time the writer stores."""
    if created is None:
        return "?"
    date, _, time = created.partition("T")
    return f"{date} {time.split('.')[0].rstrip('Z')}Z" if time else created


def run(args: argparse.Namespace) -> int:
    root = storage_for(args.run_dir)
    if not is_present(root):
        raise CheckpointNotFoundError(f"no run directory at {root.location}")
    if not (not root.list("") or is_run_directory(root)):
        raise UsageError(
            f"{root.location} is not a run directory (no 'latest', no step-* checkpoints); "
            "for a single checkpoint use 'tessera inspect'"
        )
    records, warning = list_run(root)
    if args.json:
        doc = {"run_directory": root.location, "warning": warning, "checkpoints": records}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    if warning:
        print(f"tessera: warning: {warning}", file=sys.stderr)
    if not records:
        print(f"{args.run_dir}: no checkpoints yet")
        return 0
    rows = [["", "NAME", "STEP", "STATE", "SIZE", "CREATED"]]
    for r in records:
        state = "committed" if r["committed"] else "UNCOMMITTED"
        when = _when(r["created"]) + (f"  {r['error']}" if r["error"] else "")
        rows.append(
            ["*" if r["latest"] else "", r["name"], str(r["step"]), state, human_bytes(r["bytes"]), when]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(widths[c]) if c in (2, 4) else cell.ljust(widths[c]) for c, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip())
    committed = sum(r["committed"] for r in records)
    latest = next((r["name"] for r in records if r["latest"]), "none")
    print(
        f"{plural(len(records), 'checkpoint')} ({committed} committed), latest: {latest}, "
        f"{human_bytes(sum(r['bytes'] for r in records))} in all"
    )
    return 0
