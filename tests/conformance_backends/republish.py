"""What the two broken writers share: save with tessera into a private folder, then publish it at the root.

Saving elsewhere first lets a broken writer change what it publishes (``no_checksum``) or the order
in which it publishes (``root_first``) and nothing else: the claim's rules (a new or empty root, an
exclusive claim file, spec R9.1-R9.2), the refusals and the commit by ``link`` stay tessera's own.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import tessera
from tessera.storage.local import LocalStorage

from conformance.backends.reference.backend import ReferenceBackend

__all__ = ["RepublishingBackend", "claim", "copy_files", "publish_root"]

CLAIM = ".tessera-claim.json"
ROOT = "zarr.json"


class RepublishingBackend(ReferenceBackend):
    """Writes through a private copy: :meth:`rework` changes it, :meth:`publish` puts it at the root."""

    def save(self, state: dict[Any, Any], root: Path, options: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as private:
            staged = Path(private) / "checkpoint"
            tessera.save(state, staged, **options)
            self.rework(staged)
            self.publish(staged, LocalStorage(root))

    def rework(self, staged: Path) -> None:
        """Change the staged checkpoint before it is published (nothing, unless overridden)."""

    def publish(self, staged: Path, storage: LocalStorage) -> None:
        """As a correct writer does: the claim, every other file, the root last (spec §9)."""
        claim(staged, storage)
        copy_files(staged, storage)
        publish_root(staged, storage)


def claim(staged: Path, storage: LocalStorage) -> None:
    """The staged save's claim, at a root that must be new or empty (spec R9.1, R9.2)."""
    storage.claim((staged / CLAIM).read_bytes())


def copy_files(staged: Path, storage: LocalStorage) -> None:
    """Every file of the staged checkpoint but the claim and the root, each durable (spec R9.8)."""
    for path in sorted(staged.rglob("*")):
        name = path.relative_to(staged).as_posix()
        if path.is_file() and name not in (CLAIM, ROOT):
            storage.write_file(name, [path.read_bytes()])
    storage.sync()


def publish_root(staged: Path, storage: LocalStorage) -> None:
    """The staged root ``zarr.json``, through a temporary file and ``link`` (spec R9.10)."""
    root = (staged / ROOT).read_bytes()
    storage.publish_root(root, json.loads(root)["attributes"]["tessera"]["save_id"])
