"""A fixed identity per vector, so that regenerating gives byte-identical files.

The reference writer stamps each save with a random ``save_id`` and the
current time (R3.3, R3.4). Here both are replaced, in the root ``zarr.json``
and in the claim, by a UUID derived from the vector's name and a fixed time,
and the documents are serialized again with the writer's own encoder, the
root sealed again with its digest (R3.20): the files stay exactly what the
writer would have written for that identity.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tessera
from tessera.format import dumps, reseal_root

__all__ = ["CREATED", "fix", "save", "save_id"]

CREATED = "2026-11-21T00:00:00.000000Z"
"""The ``created`` of every vector, in the writer's own spelling (microseconds, ``Z``)."""

_NAMESPACE = uuid.UUID("6c1f8a4e-5b0d-4f2a-9a37-0d5e3b1c7a90")


def save_id(name: str) -> str:
    """A UUID derived from ``name``, laid out as the version-4 UUID a writer generates (R3.3)."""
    return str(uuid.UUID(bytes=uuid.uuid5(_NAMESPACE, name).bytes, version=4))


def save(state: Mapping[Any, Any], checkpoint: Path, name: str, **options: Any) -> None:
    """``tessera.save`` in one process, then :func:`fix` the identity."""
    tessera.save(state, checkpoint, **options)
    fix(checkpoint, name)


def fix(checkpoint: Path, name: str) -> None:
    """Give a freshly saved checkpoint the identity of vector ``name``."""
    claim = checkpoint / ".tessera-claim.json"
    root = checkpoint / "zarr.json"
    for path, manifest_of in ((root, lambda d: d["attributes"]["tessera"]), (claim, lambda d: d)):
        doc = json.loads(path.read_bytes())
        manifest_of(doc).update(save_id=save_id(name), created=CREATED)
        path.write_bytes(reseal_root(dumps(doc)))
