"""``TesseraCheckpointIO``: Lightning's checkpoint plug-in, writing Tessera checkpoints.

Lightning hands its ``CheckpointIO`` a checkpoint dict and a path (``epoch=0-step=10.ckpt``,
``last.ckpt``); here the path names a Tessera checkpoint *directory*, written by
:func:`tessera.save` and read by :func:`tessera.load`, so ``tessera verify`` and stock Zarr
readers see an ordinary checkpoint. The dict is converted without pickle (:mod:`.codec`).

Who calls what: the Trainer's strategy calls ``save_checkpoint`` on global rank 0 only (from
``ModelCheckpoint`` and ``trainer.save_checkpoint``), ``load_checkpoint`` on every rank when
resuming (``ckpt_path=``), ``remove_checkpoint`` on rank 0 when ``ModelCheckpoint`` drops an
old one, and ``teardown`` at the end of a run. Fabric calls the same from ``fabric.save`` and
``fabric.load``.

One class serves both ``lightning`` and the standalone ``pytorch_lightning`` (whose
``CheckpointIO`` bases are two classes of two packages): it is registered as a virtual subclass
of every base that imports, when the first instance is made. So ``import tessera.lightning``
needs no Lightning, and the class is the same object whichever package the Trainer comes from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import urllib.parse
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any, cast

import torch
import torch.distributed as dist

from ..api.checkpoint import open_checkpoint
from ..api.load import load
from ..api.save import save
from ..errors import CheckpointNotFoundError, TesseraError
from ..planning.options import SaveOptions
from ..storage.posix import os_errors
from ..storage.resolve import storage_for
from .codec import decode, encode

__all__ = ["LightningUnavailableError", "TesseraCheckpointIO"]

_INSTALL = "pip install 'tessera-checkpoint[lightning]'"
_BASES = ("lightning.fabric.plugins.io.checkpoint_io", "lightning_fabric.plugins.io.checkpoint_io")


class LightningUnavailableError(TesseraError, ImportError):
    """``tessera.lightning`` was used where neither ``lightning`` nor ``pytorch_lightning`` imports.

    An ``ImportError``, as the missing import itself would be. No spec error class of its own
    (``code`` stays the base's): it is about this installation, not about a checkpoint."""


@functools.cache
def _register() -> None:
    """Make ``TesseraCheckpointIO`` a subclass of each importable ``CheckpointIO`` base, so that
    the Trainer's and Fabric's ``isinstance(plugin, CheckpointIO)`` accept it."""
    found = False
    for name in _BASES:
        try:
            module = __import__(name, fromlist=["CheckpointIO"])
        except ImportError:
            continue
        module.CheckpointIO.register(TesseraCheckpointIO)
        found = True
    if not found:
        raise LightningUnavailableError(f"tessera.lightning needs Lightning: {_INSTALL}")


class TesseraCheckpointIO:
    """Saves Lightning checkpoints as Tessera checkpoints: ``Trainer(plugins=[TesseraCheckpointIO()])``.

    ``allow_pickle`` (off by default) stores values that have no pickle-free encoding (a class
    object in the hyper-parameters...) pickled, through Tessera's ``pickle_keys``, and lets
    ``load_checkpoint`` unpickle them: only for checkpoints you trust, since unpickling runs
    code. Off, such a value is an :class:`~tessera.UnsafeEncodingError` naming its key on save,
    and a pickled value is refused on load.

    Saving over an existing checkpoint (Lightning saves ``last.ckpt`` again and again) never
    loses the last good one on a local path: the new checkpoint is saved and committed beside
    it (``.NAME.tessera-new-ID``), then swapped in by two renames, and only then is the old one
    (moved to ``.NAME.tessera-old-ID``) deleted. A crash between the two renames leaves the old
    checkpoint under its ``-old`` name, which ``load_checkpoint`` names in its error; the next
    save over ``NAME`` deletes what such crashes left. An object store cannot rename: there the
    old checkpoint is deleted (root ``zarr.json`` first) before the new one is saved, so a save
    that fails while writing leaves none at that path (one that cannot be encoded is refused
    before anything is deleted, on any storage).
    """

    def __init__(self, *, allow_pickle: bool = False) -> None:
        _register()
        self.allow_pickle = allow_pickle
        self._local_group: dist.ProcessGroup | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Save ``checkpoint`` as the Tessera checkpoint directory ``path`` (a path or a URL).

        ``storage_options`` may be a :class:`tessera.SaveOptions` (chunk size, compression...).
        """
        if storage_options is not None and not isinstance(storage_options, SaveOptions):
            raise TypeError(
                f"TesseraCheckpointIO takes storage_options=tessera.SaveOptions(...), "
                f"got {type(storage_options).__name__}"
            )
        encoded = encode(checkpoint, allow_pickle=self.allow_pickle)
        options = storage_options or SaveOptions()
        if encoded.pickle_paths:
            keys = frozenset(options.pickle_keys) | frozenset(encoded.pickle_paths)
            options = dataclasses.replace(options, pickle_keys=keys)
        location = _location(path)

        def write(target: str) -> None:
            save(
                encoded.state,
                target,
                options=options,
                metadata=encoded.metadata(),
                process_group=self._group(),
            )

        if _is_url(location):
            if storage_for(location).exists():
                _remove(location)
            write(location)
        else:
            _replace_local(location, write)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict saved at ``path``, tensors on the CPU or on ``map_location`` (a
        device or its name). ``weights_only`` changes nothing: nothing is unpickled unless
        this plug-in was made with ``allow_pickle=True``."""
        location = _location(path)
        try:
            handle = open_checkpoint(location)
        except CheckpointNotFoundError as error:
            raise _not_found(location, error) from None
        state = load(handle, allow_pickle=self.allow_pickle)
        result = decode(state, handle.metadata, location)
        if map_location is not None:
            result = _move(result, map_location)
        return result

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint directory ``path``: root ``zarr.json`` first, so a deletion cut
        short leaves an uncommitted checkpoint rather than a damaged one. Absent: no error."""
        location = _location(path)
        if _is_url(location) or os.path.lexists(location):
            _remove(location)

    def teardown(self) -> None:
        """Lightning's end-of-run hook: nothing is held between saves, so nothing to release."""

    def _group(self) -> dist.ProcessGroup | None:
        """A process group of this rank alone where ``torch.distributed`` runs several ranks:
        Lightning saves on rank 0 only, and ``tessera.save`` would otherwise wait for every
        rank of the world. ``use_local_synchronization`` lets rank 0 make it by itself."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        if self._local_group is None:
            rank = dist.get_rank()
            group = dist.new_group([rank], backend="gloo", use_local_synchronization=True)
            # new_group's other answer, NON_GROUP_MEMBER, is for ranks outside the group: not this one.
            self._local_group = cast(dist.ProcessGroup, group)
        return self._local_group


def _location(path: Any) -> str:
    """``path`` as a str: a local path (``file://`` URLs become one) or a URL."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"a checkpoint path is a str or a path, not {type(path).__name__}")
    if text.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    return text.rstrip("/") or text


def _is_url(location: str) -> bool:
    return "://" in location


def _split(location: str) -> tuple[str, str]:
    parent, _, name = location.rpartition("/")
    return (parent or ("/" if location.startswith("/") else ".")), name


def _remove(location: str) -> None:
    parent, name = _split(location)
    # A link (ModelCheckpoint(save_last="link") links last.ckpt to a step's directory) goes, not
    # what it points to; so does a file (a torch.save checkpoint from before).
    if not _is_url(location) and (os.path.islink(location) or os.path.isfile(location)):
        with os_errors(f"cannot delete {location}"):
            os.remove(location)
        return
    storage_for(parent).remove_checkpoint(name)


def _replace_local(location: str, write: Callable[[str], None]) -> None:
    """Save through ``write`` at ``location``; over an existing checkpoint, beside it first."""
    parent, name = _split(location)
    if not os.path.lexists(location):
        with os_errors(f"cannot make the directory {parent}"):
            os.makedirs(parent, exist_ok=True)
        write(location)
        return
    _remove_leftovers(parent, name)
    tag = uuid.uuid4().hex[:12]
    fresh = os.path.join(parent, f".{name}.tessera-new-{tag}")
    old = os.path.join(parent, f".{name}.tessera-old-{tag}")
    try:
        write(fresh)
    except BaseException:
        with contextlib.suppress(OSError, TesseraError):
            _remove(fresh)
        raise
    with os_errors(f"cannot put the new checkpoint in place at {location}"):
        os.rename(location, old)
        os.rename(fresh, location)
        _sync_directory(parent)  # the new name is durable before the old checkpoint goes
    _remove(old)


def _remove_leftovers(parent: str, name: str) -> None:
    """Delete what saves over ``name`` that were cut short left beside it, now that ``name``
    itself is a checkpoint: half-written ``-new-`` ones, and ``-old-`` ones already replaced."""
    with os_errors(f"cannot list {parent}"):
        entries = os.listdir(parent)
    for entry in entries:
        if entry.startswith((f".{name}.tessera-new-", f".{name}.tessera-old-")):
            _remove(os.path.join(parent, entry))


def _sync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _not_found(location: str, error: CheckpointNotFoundError) -> CheckpointNotFoundError:
    """``error``, or one saying why: a ``torch.save`` file, or a swap cut short."""
    if _is_url(location):
        return error
    if os.path.isfile(location):
        return CheckpointNotFoundError(
            f"{location} is a file, not a Tessera checkpoint directory (a torch.save checkpoint?): "
            "load it without TesseraCheckpointIO (Lightning's default TorchCheckpointIO)"
        )
    parent, name = _split(location)
    with contextlib.suppress(OSError):
        left = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.tessera-old-"))
        if left:
            kept = os.path.join(parent, left[-1])
            return CheckpointNotFoundError(
                f"{location}: no checkpoint; a save that replaced it was cut short, and the "
                f"previous checkpoint is at {kept}: rename it to {name} to resume from it"
            )
    return error


def _move(value: Any, device: Any) -> Any:
    """``value`` with every tensor moved to ``device`` (containers keep their types)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"TesseraCheckpointIO.load_checkpoint(map_location=...) takes a device or its name, "
            f"got {type(device).__name__}"
        )
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, MutableMapping):
        moved = {k: _move(v, device) for k, v in value.items()}
        value.clear()  # keep the mapping's type and an OrderedDict's _metadata
        value.update(moved)
        return value
    if type(value) in (list, tuple):
        return type(value)(_move(v, device) for v in value)
    return value
