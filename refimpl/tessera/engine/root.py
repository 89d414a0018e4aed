"""Reading a checkpoint's root ``zarr.json`` from its storage: the manifest before any array is
touched, and, during a read, whether the checkpoint is still there at all."""

from __future__ import annotations

from ..errors import CheckpointDeletedError, CheckpointNotFoundError, UncommittedCheckpointError
from ..format.limits import DEFAULT_LIMITS, ReaderLimits
from ..format.manifest import Manifest
from ..format.root import check_root_document
from ..storage.base import CLAIM_FILE, ROOT_METADATA, FileMissingError, Storage

__all__ = ["check_not_deleted", "read_manifest"]


def read_manifest(storage: Storage, limits: ReaderLimits = DEFAULT_LIMITS) -> Manifest:
    """The validated manifest of ``storage``; the error class says what is wrong (spec §13).

    The root ``zarr.json`` is read first, and whether anything is there at all is asked only
    when that read fails: a load of a committed checkpoint costs one request here, not two (on
    an object store each is a round trip)."""
    try:
        data = storage.read_file(ROOT_METADATA, limits.max_json_bytes)
    except Exception as exc:
        if not storage.exists():
            raise CheckpointNotFoundError(f"no checkpoint at {storage.location}") from None
        if not isinstance(exc, FileMissingError):
            raise
        claimed = storage.size(CLAIM_FILE) is not None
        raise UncommittedCheckpointError(
            f"{storage.location} has no root zarr.json: "
            + (
                "a save claimed it but never committed (interrupted or still running)"
                if claimed
                else "it is not a committed Tessera checkpoint"
            )
        ) from None
    return check_root_document(data, f"{storage.location}/{ROOT_METADATA}", limits)


def check_not_deleted(storage: Storage, vanished: str) -> None:
    """Raise :class:`CheckpointDeletedError` if the root ``zarr.json`` is gone too: a file
    missing during a read is then the checkpoint deleted underneath, not damage."""
    if storage.size(ROOT_METADATA) is None:
        raise CheckpointDeletedError(
            f"{storage.location} was deleted while being read ({vanished} and the root "
            "zarr.json are gone); load another checkpoint"
        )
