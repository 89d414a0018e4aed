"""Broken on purpose: writes chunks without the ``crc32c`` codec (spec R6.1, R6.4, R6.5).

It saves with tessera, then strips the 4 CRC bytes from every chunk and ``crc32c`` from every codec
chain (each array's ``zarr.json`` and the manifest), then publishes in the right order. A stock Zarr
reader reads the result; the suite must fail it on every write case whose checkpoint holds an array.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, ClassVar

from tessera.format.strict_json import dumps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # republish.py, beside this folder
from republish import RepublishingBackend  # noqa: E402

from conformance.backends.reference.backend import serve  # noqa: E402


class NoChecksum(RepublishingBackend):
    folder: ClassVar[Path] = Path(__file__).resolve().parent

    def rework(self, staged: Path) -> None:
        root = json.loads((staged / "zarr.json").read_bytes())
        for entry in root["attributes"]["tessera"]["entries"]:
            if "codecs" in entry:
                entry["codecs"] = _without_crc(entry["codecs"])
                _strip(staged / entry["path"])
        (staged / "zarr.json").write_bytes(dumps(root))


def _strip(array: Path) -> None:
    """Drop ``crc32c`` from the array's ``zarr.json`` and the CRC from each of its chunks."""
    document = json.loads((array / "zarr.json").read_bytes())
    document["codecs"] = _without_crc(document["codecs"])
    (array / "zarr.json").write_bytes(dumps(document))
    chunks = (
        [array / "c"] if (array / "c").is_file() else [p for p in (array / "c").rglob("*") if p.is_file()]
    )
    for chunk in chunks:
        chunk.write_bytes(chunk.read_bytes()[:-4])


def _without_crc(codecs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [codec for codec in codecs if codec["name"] != "crc32c"]


if __name__ == "__main__":
    serve(NoChecksum())
