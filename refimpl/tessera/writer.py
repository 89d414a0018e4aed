"""``tessera.save``: plan, then claim, then write, then commit (spec §9).

Nothing touches storage until the plan is made and the root document built,
so a bad key, an unpicklable value or non-JSON metadata fails before the path
is claimed. Once claimed, every chunk and every ``zarr.json`` is written and
made durable; the root ``zarr.json`` is published last. A save that fails or
is killed midway leaves an uncommitted checkpoint that every reader refuses,
and never touches any other checkpoint.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal

from . import __version__
from .chunk_codec import encode_chunk
from .errors import SchemaViolationError
from .flatten import flatten, is_json
from .format.keys import parent_paths
from .format.layout import chunk_key
from .format.manifest import FORMAT_NAME, Manifest, WriterInfo
from .format.strict_json import dumps
from .parallel import run_all
from .planning import DEFAULT_CHUNK_BYTES, ArrayWrite, SaveOptions, SavePlan, plan_save
from .progress import Progress
from .reader import check_root_document
from .storage.base import Storage
from .storage.local import LocalStorage

__all__ = ["save", "WRITER"]

WRITER = WriterInfo("tessera-python", __version__)
GROUP_JSON = dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})


def save(
    state_dict: Mapping[Any, Any],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    pickle_keys: Collection[str] = (),
    compression: Literal["zstd"] | None = None,
    zstd_level: int = 3,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: bool = False,
) -> Manifest:
    """Save a nested state dict as a committed checkpoint at ``path`` (a new or empty directory).

    ``metadata`` is any JSON object (step, tokens, config), stored in the
    manifest. ``pickle_keys`` names the keys (as ``tessera inspect`` prints
    them) whose values may be pickled; any other non-tensor, non-JSON value is
    refused. Returns the manifest that was committed. Raises
    :class:`~tessera.CheckpointExistsError` if the path was already claimed.
    """
    options = SaveOptions(
        chunk_bytes=chunk_bytes,
        zstd_level=zstd_level if compression == "zstd" else None,
        pickle_keys=pickle_keys,
    )
    if compression not in (None, "zstd"):
        raise SchemaViolationError(f"compression must be None or 'zstd', got {compression!r}")
    if metadata is not None and not (isinstance(metadata, Mapping) and is_json(dict(metadata))):
        raise SchemaViolationError("metadata must be a JSON object (str keys, finite numbers)")
    plan = plan_save(flatten(state_dict), options)
    manifest = Manifest(
        save_id=str(uuid.uuid4()),
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        writer=WRITER,
        entries=plan.entries,
        lists=plan.lists,
        metadata=dict(metadata or {}),
    )
    root = dumps(manifest.to_root())
    # The writer reads its own root back as every reader will, so that it never
    # commits what a reader refuses (too deep metadata, limits, schema).
    check_root_document(root, f"the root zarr.json for {path}")
    storage = LocalStorage(path)
    storage.claim(dumps(claim_document(manifest)))
    write_plan(plan, storage, threads=threads, progress=progress)
    storage.sync()
    storage.publish_root(root, manifest.save_id)
    return manifest


def claim_document(manifest: Manifest) -> dict[str, Any]:
    """The claim file's content (``claim.schema.json``): the save it belongs to."""
    return {
        "format": FORMAT_NAME,
        "save_id": manifest.save_id,
        "created": manifest.created,
        "writer": {"name": manifest.writer.name, "version": manifest.writer.version},
    }


def write_plan(plan: SavePlan, storage: Storage, *, threads: int | None, progress: bool) -> None:
    """Write every group, array ``zarr.json`` and chunk of the plan, durably; not the root."""
    groups = sorted({group for a in plan.arrays for group in parent_paths(a.entry.path)})
    tasks: list[Callable[[], None]] = [
        _write_json(storage, f"{group}/zarr.json", GROUP_JSON) for group in groups
    ]
    with Progress(plan.nbytes, "saving", progress) as bar:
        for array in plan.arrays:
            tasks.append(
                _write_json(storage, f"{array.entry.path}/zarr.json", dumps(array.entry.layout.zarr_json()))
            )
            tasks.extend(
                _write_chunk(storage, array, index, bar) for index in array.entry.layout.chunk_indices()
            )
        run_all(tasks, threads)


def _write_json(storage: Storage, path: str, data: bytes) -> Callable[[], None]:
    return lambda: storage.write_file(path, [data])


def _write_chunk(
    storage: Storage, array: ArrayWrite, index: tuple[int, ...], bar: Progress
) -> Callable[[], None]:
    layout = array.entry.layout

    def task() -> None:
        buffers = encode_chunk(array.data, layout, index)
        storage.write_file(f"{array.entry.path}/{chunk_key(index)}", buffers)
        region = layout.chunk_region(index)
        bar.advance(layout.dtype.itemsize * math.prod(b - a for a, b in region))

    return task
