"""The root ``zarr.json`` as untrusted bytes in, a validated :class:`Manifest` out (spec R11.1).

Readers check a checkpoint's root document here before touching any array, and the writer checks
the document it is about to publish with the very same function, so a writer can never commit a
root its own reader would refuse.
"""

from __future__ import annotations

from .digest import check_manifest_digest
from .limits import DEFAULT_LIMITS, ReaderLimits
from .manifest import Manifest, check_version
from .schemas import validate
from .strict_json import loads

__all__ = ["check_root_document"]


def check_root_document(data: bytes, where: str, limits: ReaderLimits = DEFAULT_LIMITS) -> Manifest:
    """Parse a root ``zarr.json``: strict JSON, then version, then the manifest digest, then schema,
    then entries (spec R11.1, §13)."""
    doc = loads(data, where, limits)
    attributes = doc.get("attributes") if isinstance(doc, dict) else None
    manifest = attributes.get("tessera") if isinstance(attributes, dict) else None
    check_version(manifest)
    check_manifest_digest(data, manifest, where)
    validate(doc, "root", where)
    return Manifest.from_root(doc, limits)
