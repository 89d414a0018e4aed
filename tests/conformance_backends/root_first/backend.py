"""Broken on purpose: publishes the root ``zarr.json`` right after the claim, before any data (spec R9.9).

The files it leaves are those of a correct save, and it commits as a correct writer does (a
temporary file, then ``link``); only the order is wrong, which only a watch of the write can see.
The suite must fail it on every write case whose checkpoint holds an array.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

from tessera.storage.local import LocalStorage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # republish.py, beside this folder
from republish import RepublishingBackend, claim, copy_files, publish_root  # noqa: E402

from conformance.backends.reference.backend import serve  # noqa: E402


class RootFirst(RepublishingBackend):
    folder: ClassVar[Path] = Path(__file__).resolve().parent

    def publish(self, staged: Path, storage: LocalStorage) -> None:
        claim(staged, storage)
        publish_root(staged, storage)
        copy_files(staged, storage)


if __name__ == "__main__":
    serve(RootFirst())
