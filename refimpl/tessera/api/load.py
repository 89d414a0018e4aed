"""``tessera.load``: a whole checkpoint, a subset of keys, or into an existing state dict (spec §14).

Given a template state dict, every tensor in it is filled in place (any
device, any strides; shape and dtype must match exactly) and every other leaf
is replaced by the stored value; a stateful object (a module, an optimizer)
is loaded through its own ``state_dict()`` and ``load_state_dict`` and stays
in the template. Every key, shape and dtype is checked before anything is
changed. Without a template, a new nested dict is built.

Key mismatches follow Megatron's ``StrictHandling``, with its meaning of the
words: *missing* keys are stored but not requested, *unexpected* keys are
requested but not stored. A template leaf may also stand for a whole stored
subtree (``{"config": {}}`` loads every key under ``config``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..distributed.collective import collective_for
from ..distributed.shared_reads import read_together
from ..engine.regions import Region
from ..engine.root import read_manifest
from ..errors import KeyMismatchError, TensorMismatchError
from ..format.dtypes import dtype_of_numpy
from ..format.keys import Key, format_key, key_to_path
from ..format.limits import DEFAULT_LIMITS, ReaderLimits
from ..format.manifest import Entry, ObjectEntry, TensorEntry
from ..state.dtensor import is_dtensor, sharded_from_dtensor
from ..state.flatten import flatten, unflatten
from ..state.sharded import ShardedObject, ShardedTensor
from ..state.stateful import swap_stateful
from ..state.tensors import as_torch
from ..storage.resolve import Location
from ..util.arguments import string_list
from .checkpoint import Checkpoint, engine_of, storage_of

__all__ = ["LoadResult", "Strict", "load"]

log = logging.getLogger("tessera")


class Strict(enum.Enum):
    """How ``load`` treats keys that differ between the template and the checkpoint."""

    ASSUME_OK_UNEXPECTED = "assume_ok_unexpected"
    """No check up front; an unexpected key fails when it is read. Missing keys are ignored."""
    LOG_UNEXPECTED = "log_unexpected"
    """Warn about unexpected keys and skip them; ignore missing ones."""
    LOG_ALL = "log_all"
    """Warn about both; skip unexpected keys."""
    RAISE_UNEXPECTED = "raise_unexpected"
    """Raise on unexpected keys before reading anything (the default)."""
    RAISE_ALL = "raise_all"
    """Raise on any difference (as ``nn.Module.load_state_dict(strict=True)``)."""
    RETURN_UNEXPECTED = "return_unexpected"
    """Skip unexpected keys and report them in the :class:`LoadResult`."""
    RETURN_ALL = "return_all"
    """Skip unexpected keys and report both kinds in the :class:`LoadResult`."""
    IGNORE_ALL = "ignore_all"
    """Skip unexpected keys silently (not recommended)."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What ``load`` read, and the key differences when asked to return them."""

    state_dict: dict[Any, Any]
    missing: frozenset[str]
    """Stored, not requested (reported by the ``*_ALL`` modes)."""
    unexpected: frozenset[str]
    """Requested, not stored."""


def load(
    path: Location | Checkpoint,
    state_dict: MutableMapping[Any, Any] | None = None,
    *,
    keys: Iterable[str] | None = None,
    strict: Strict | str = Strict.RAISE_UNEXPECTED,
    allow_pickle: bool = False,
    limits: ReaderLimits = DEFAULT_LIMITS,
    process_group: dist.ProcessGroup | None = None,
    threads: int | None = None,
    progress: bool = False,
    gpu_direct: bool | None = None,
) -> Any:
    """Load a checkpoint; returns the state dict, or a :class:`LoadResult` in the ``RETURN_*`` modes.

    ``keys`` (paths or path prefixes, as ``tessera inspect`` prints them)
    selects what to load when no template is given. Pickled values are
    refused unless ``allow_pickle=True``. With ``process_group``, every rank of the group
    loads together (each calls ``load`` with its own template): each chunk that any rank
    needs is read from storage by one rank and its pieces sent to the others.

    ``path`` is a path, a URL, a :class:`~tessera.storage.Storage` or an open
    :class:`Checkpoint` (which keeps its own storage, limits and threads); pass
    ``tessera.gpu_direct_storage(path)`` to read the chunks of GPU tensors in the template
    straight into device memory (``gpu_direct=True`` is a deprecated alias of that).
    ``threads`` is the number of I/O threads, as for :func:`tessera.open`. With ``progress``,
    a bar on stderr counts the bytes loaded (rank 0's, when loading together).
    """
    mode = _strict_mode(strict)
    if keys is not None:
        keys = string_list(keys, "keys", "paths (as tessera inspect prints them)")
    if isinstance(path, Checkpoint):
        checkpoint = path
    else:
        storage = storage_of(path, gpu_direct)
        checkpoint = Checkpoint(storage, read_manifest(storage, limits), limits=limits, threads=threads)
    result: Any
    if state_dict is None:
        requested = {k: None for k in keys} if keys is not None else {p: None for p in checkpoint}
        plan = _match(checkpoint, requested, mode)
        values = checkpoint.values(
            [e.path for e in plan.entries], allow_pickle=allow_pickle, progress=progress
        )
        manifest = checkpoint.manifest
        leaves = zip([e.key for e in plan.entries], values, strict=True)
        result = unflatten(leaves, manifest.lists, manifest.tuples)
    else:
        # Stateful objects stand for their own state dicts; they get what was read at the end.
        tree, restore = swap_stateful(state_dict)
        flat = flatten(tree)
        templates = {format_key(k): (k, v) for k, v in flat.leaves}
        plan = _match(checkpoint, dict.fromkeys(templates), mode)
        in_place: list[tuple[str, torch.Tensor, Region]] = []
        assigned: list[tuple[Key, Any]] = []
        for path in plan.found:
            key, template = templates[path]
            stored = checkpoint.entry(path) if path in checkpoint else None
            if isinstance(template, ShardedObject):
                cell = key_to_path((*key, *template.grid_offset))
                value = checkpoint.value(cell, allow_pickle=allow_pickle)
                assigned.append((key, _conform(template.value, value)))
            elif isinstance(template, ShardedTensor) or is_dtensor(template):
                in_place.extend(_shard_requests(checkpoint, path, template))
                if isinstance(template, ShardedTensor):
                    assigned.append((key, template.local))
            elif isinstance(template, torch.Tensor):
                if not isinstance(stored, (TensorEntry, ObjectEntry)):
                    raise TensorMismatchError(
                        f"{path}: the template holds a tensor, the checkpoint "
                        + ("a JSON value" if stored else "a subtree of keys")
                    )
                in_place.append((path, template, None))
            else:
                assigned.append((key, _read_subtree(checkpoint, key, path, template, allow_pickle)))
        collective = collective_for(process_group)
        engine = engine_of(checkpoint)
        # Every destination is checked (shape, dtype) before the first is written, and values
        # are assigned only once the tensors are filled: a refused load changes nothing.
        if process_group is not None and collective.world_size > 1:
            read_together(engine, in_place, collective, progress=progress and collective.rank == 0)
        else:
            requests = engine.requests(in_place)
            engine.fill(requests, [r.entry for r in requests], progress=progress, label="loading")
        for key, value in assigned:
            _assign(tree, key, value)
        result = restore(tree) if restore is not None else state_dict
    if mode in (Strict.RETURN_UNEXPECTED, Strict.RETURN_ALL):
        missing = plan.missing if mode is Strict.RETURN_ALL else frozenset()
        return LoadResult(result, missing, plan.unexpected)
    return result


@dataclass(frozen=True, slots=True)
class _Match:
    found: list[str]
    """Requested keys that are stored (as a value or as a subtree)."""
    entries: list[Entry]
    missing: frozenset[str]
    unexpected: frozenset[str]


def _strict_mode(strict: Strict | str) -> Strict:
    if isinstance(strict, Strict):
        return strict
    if not isinstance(strict, str):
        raise TypeError(f"strict must be a tessera.Strict or its name, got {strict!r}")
    try:
        return Strict(strict)
    except ValueError:
        names = ", ".join(repr(m.value) for m in Strict)
        raise ValueError(f"strict must be one of {names}, got {strict!r}") from None


def _match(checkpoint: Checkpoint, requested: Mapping[str, None], mode: Strict) -> _Match:
    found: list[str] = []
    entries: list[Entry] = []
    unexpected: list[str] = []
    covered: set[str] = set()
    for path in requested:
        subtree = checkpoint.subtree(path)
        if subtree:
            found.append(path)
            entries.extend(subtree)
            covered.update(e.path for e in subtree)
        else:
            unexpected.append(path)
    missing = frozenset(p for p in checkpoint if p not in covered)
    match = _Match(found, entries, missing, frozenset(unexpected))
    _report(checkpoint, match, mode)
    if mode is Strict.ASSUME_OK_UNEXPECTED and unexpected:
        # Nothing was checked up front; the first unexpected key fails as a read would.
        checkpoint.entry(unexpected[0])
    return match


def _report(checkpoint: Checkpoint, match: _Match, mode: Strict) -> None:
    report_missing = mode in (Strict.LOG_ALL, Strict.RAISE_ALL)
    problems = []
    if match.unexpected and mode in (
        Strict.LOG_UNEXPECTED,
        Strict.LOG_ALL,
        Strict.RAISE_UNEXPECTED,
        Strict.RAISE_ALL,
    ):
        problems.append(f"unexpected (requested, not in the checkpoint): {sorted(match.unexpected)}")
    if match.missing and report_missing:
        problems.append(f"missing (in the checkpoint, not requested): {sorted(match.missing)}")
    if not problems:
        return
    message = f"{checkpoint.storage.location}: keys differ; " + "; ".join(problems)
    if mode in (Strict.RAISE_UNEXPECTED, Strict.RAISE_ALL):
        raise KeyMismatchError(message)
    log.warning(message)


def _read_subtree(checkpoint: Checkpoint, key: Key, path: str, template: Any, allow_pickle: bool) -> Any:
    """The stored value at ``path``, or the nested dict of everything stored under it."""
    if path in checkpoint:
        value = checkpoint.value(path, allow_pickle=allow_pickle)
    else:
        subtree = checkpoint.subtree(path)
        values = checkpoint.values([e.path for e in subtree], allow_pickle=allow_pickle)
        leaves = [(e.key[len(key) :], v) for e, v in zip(subtree, values, strict=True)]
        manifest = checkpoint.manifest
        # The subtree is rebuilt below a root holding it at ``()``, so that it can be a list too.
        lists = [k[len(key) - 1 :] for k in manifest.lists if k[: len(key)] == key]
        tuples = [k[len(key) - 1 :] for k in manifest.tuples if k[: len(key)] == key]
        value = unflatten([((key[-1], *k), v) for k, v in leaves], lists, tuples)[key[-1]]
    return _conform(template, value)


def _shard_requests(
    checkpoint: Checkpoint, path: str, template: Any
) -> list[tuple[str, torch.Tensor, tuple[slice, ...]]]:
    """Read requests that fill a ``ShardedTensor``'s or a ``DTensor``'s local data in place:
    only the chunks that overlap this rank's boxes are read (spec R14.x)."""
    stored = checkpoint.entry(path)
    if not isinstance(stored, (TensorEntry, ObjectEntry)):
        raise TensorMismatchError(f"{path}: the template holds a sharded tensor, the checkpoint a JSON value")
    shards = [template] if isinstance(template, ShardedTensor) else sharded_from_dtensor(template)
    shape = tuple(template.shape) if is_dtensor(template) else template.global_shape
    if shape != stored.layout.shape:
        raise TensorMismatchError(
            f"{path}: stored global shape {list(stored.layout.shape)}, the template's is {list(shape)}"
        )
    requests = []
    for shard in shards:
        for piece in shard.pieces():
            out = piece.data
            if isinstance(out, np.ndarray):
                if not out.flags.c_contiguous:
                    raise TensorMismatchError(
                        f"{path}: a NumPy shard must be C-contiguous to be loaded in place"
                    )
                out = as_torch(out, dtype_of_numpy(out.dtype, path))
            requests.append(
                (
                    path,
                    out,
                    piece.box.relative_to((0,) * len(piece.box.offset)),  # the box as slices of the array
                )
            )
    return requests


def _conform(template: Any, value: Any) -> Any:
    """Give the stored sequences the template's types: its tuples (a namedtuple too) and lists
    rule where the stored value is either (spec R8.8, R14.7)."""
    if isinstance(template, tuple) and isinstance(value, (list, tuple)) and len(template) == len(value):
        return (
            type(template)(*value)
            if hasattr(template, "_fields")
            else tuple(_conform(t, v) for t, v in zip(template, value, strict=True))
        )
    if isinstance(template, dict) and isinstance(value, dict):
        return {k: _conform(template.get(k), v) for k, v in value.items()}
    if isinstance(template, list) and isinstance(value, (list, tuple)) and len(template) == len(value):
        return [_conform(t, v) for t, v in zip(template, value, strict=True)]
    return value


def _assign(root: MutableMapping[Any, Any], key: Key, value: Any) -> None:
    """Replace the leaf at ``key`` in the template (rebuilding tuples on the way)."""
    parents: list[Any] = [root]
    for component in key[:-1]:
        parents.append(parents[-1][component])
    for depth in range(len(key) - 1, -1, -1):
        container = parents[depth]
        if isinstance(container, tuple):
            items = list(container)
            items[key[depth]] = value  # type: ignore[index]
            value = type(container)(*items) if hasattr(container, "_fields") else type(container)(items)
            continue
        container[key[depth]] = value
        return
