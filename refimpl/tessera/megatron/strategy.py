"""The ``dist_checkpointing`` strategies: a Megatron sharded state dict as a Tessera checkpoint.

Megatron calls a sharded strategy on every rank with that rank's ``ShardedTensor`` and
``ShardedObject`` leaves (factories already applied, common state taken out), and the
directory of the checkpoint. The Tessera checkpoint is the subdirectory ``tessera/`` of that
directory: Megatron writes ``metadata.json`` (and, through its own ``save``, ``common.pt``)
beside it, and a Tessera checkpoint is saved only into a new directory, so its root holds
Tessera's files alone and ``tessera verify``, ``tessera.open`` and Zarr readers see a plain
checkpoint there.

Up to megatron-core 0.16 the strategies derive from Megatron's base classes, so that
:func:`tessera.megatron.register` can make them the defaults of the backend ``("tessera", 1)``;
from 0.19 (``strategies/base.py`` gone) they are plain objects with the same methods, which
Megatron calls duck-typed.
"""

from __future__ import annotations

import importlib
import os
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from ..api.checkpoint import Checkpoint, open_checkpoint
from ..api.load import load
from ..api.save import save
from ..errors import ShardingError, UnsupportedVersionError
from ..format.manifest import TensorEntry
from ..planning.options import SaveOptions
from ..state.sharded import ShardedObject
from .mapping import (
    OBJECTS,
    TENSORS,
    combined_tensor,
    empty_local,
    grid_of,
    is_main,
    tessera_object,
    tessera_tensor,
)
from .requirement import dist_checkpointing

__all__ = [
    "BACKEND",
    "COMMON",
    "SUBDIRECTORY",
    "VERSION",
    "TesseraCommonLoadStrategy",
    "TesseraLoadStrategy",
    "TesseraSaveStrategy",
    "tessera_path",
]

BACKEND = "tessera"
"""The backend name ``metadata.json`` records."""
VERSION = 1
SUBDIRECTORY = "tessera"
"""The Tessera checkpoint's directory inside Megatron's checkpoint directory."""
COMMON = "common"
"""The top-level key of the common (non-sharded) state, where :func:`tessera.megatron.save` puts it."""

_mapping = importlib.import_module(dist_checkpointing().__name__ + ".mapping")
_dict_utils = importlib.import_module(dist_checkpointing().__name__ + ".dict_utils")
try:
    _base: Any = importlib.import_module(dist_checkpointing().__name__ + ".strategies.base")
    _SaveBase: Any = _base.SaveShardedStrategy
    _LoadBase: Any = _base.LoadShardedStrategy
    _CommonLoadBase: Any = _base.LoadCommonStrategy
except (ImportError, AttributeError):  # megatron-core >= 0.19: duck-typed strategies
    _SaveBase = _LoadBase = _CommonLoadBase = object


def tessera_path(checkpoint_dir: str | os.PathLike[str]) -> str:
    """Where the Tessera checkpoint of a Megatron checkpoint directory lives."""
    return os.path.join(os.fspath(checkpoint_dir), SUBDIRECTORY)


class _ReadsTessera:
    """What Megatron asks of every strategy that loads: both load strategies read the sharded
    objects too, and only checkpoints whose ``metadata.json`` names this backend and version."""

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def check_backend_compatibility(self, loaded_backend: str) -> None:
        _check_backend(loaded_backend)

    def check_version_compatibility(self, loaded_version: int) -> None:
        _check_version(loaded_version)


class TesseraSaveStrategy(_SaveBase):  # type: ignore[misc]
    """Saves the sharded part of a Megatron state dict as a Tessera checkpoint.

    ``options`` (:class:`tessera.SaveOptions`) says how arrays are chunked and compressed;
    ``process_group`` (default: the world) is every rank that calls ``save``.
    """

    def __init__(
        self, *, options: SaveOptions | None = None, process_group: dist.ProcessGroup | None = None
    ) -> None:
        if _SaveBase is not object:
            super().__init__(BACKEND, VERSION)
        self.backend, self.version = BACKEND, VERSION
        self.options = options
        self.process_group = process_group

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: Any, checkpoint_dir: str | os.PathLike[str]) -> None:
        """Every rank: save its main replicas; returns once the checkpoint is committed."""
        self.save_with_common(sharded_state_dict, checkpoint_dir, None)

    def save_with_common(
        self, sharded_state_dict: Any, checkpoint_dir: str | os.PathLike[str], common: Any
    ) -> None:
        """As :meth:`save`, with the common state (rank 0's is stored) under ``common``."""
        state: dict[str, Any] = {TENSORS: {}, OBJECTS: {}}
        tensors: dict[str, list[Any]] = defaultdict(list)
        for leaf in _dict_utils.nested_values(sharded_state_dict):
            if not is_main(leaf.replica_id):
                continue
            if isinstance(leaf, _mapping.ShardedTensor):
                tensors[leaf.key].append(leaf)
            elif isinstance(leaf, _mapping.ShardedObject):
                _put(state[OBJECTS], leaf.key, tessera_object(leaf))
            else:
                raise ShardingError(
                    f"Megatron sharded leaf {getattr(leaf, 'key', leaf)!r} is a {type(leaf).__name__}; "
                    "dist_checkpointing applies factories before the strategy, so only "
                    "ShardedTensor and ShardedObject are expected"
                )
        for key, shards in tensors.items():
            one = shards[0]
            state[TENSORS][key] = (
                tessera_tensor(one, one.data) if len(shards) == 1 else combined_tensor(shards)
            )
        if common is not None and _rank(self.process_group) == 0:
            state[COMMON] = common
        save(
            state,
            tessera_path(checkpoint_dir),
            options=self.options,
            metadata={"megatron": {"backend": BACKEND, "version": VERSION}},
            process_group=self.process_group,
        )

    def __str__(self) -> str:
        return f"TesseraSaveStrategy({BACKEND}, {VERSION})"


class TesseraLoadStrategy(_ReadsTessera, _LoadBase):  # type: ignore[misc]
    """Loads the sharded part of a Megatron state dict from a Tessera checkpoint, in any
    sharding: each rank reads only the chunks that overlap its shards. ``process_group``:
    load together (each chunk read once and sent to the ranks that need it)."""

    def __init__(self, *, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group

    def load(self, sharded_state_dict: Any, checkpoint_dir: str | os.PathLike[str], *_: Any) -> Any:
        """Every rank: replace each leaf of ``sharded_state_dict`` (in place) by its loaded value.

        Megatron 0.19 passes a third argument (its async strategy's name), which is ignored.
        """
        leaves = list(_dict_utils.nested_values(sharded_state_dict))
        # A rank may ask twice for one key (two shards of it): one Tessera load per repetition.
        rounds: list[dict[tuple[str, str], Any]] = []
        seen: dict[tuple[str, str], int] = defaultdict(int)
        for leaf in leaves:
            kind = TENSORS if isinstance(leaf, _mapping.ShardedTensor) else OBJECTS
            n = seen[kind, leaf.key]
            seen[kind, leaf.key] += 1
            if n == len(rounds):
                rounds.append({})
            rounds[n][kind, leaf.key] = leaf
        loaded: dict[int, Any] = {}
        with open_checkpoint(tessera_path(checkpoint_dir)) as checkpoint:
            for round_ in rounds:
                loaded.update(self._load_round(checkpoint, round_))
        return _dict_utils.dict_list_map_inplace(lambda leaf: loaded[id(leaf)], sharded_state_dict)

    def _load_round(self, checkpoint: Checkpoint, leaves: dict[tuple[str, str], Any]) -> dict[int, Any]:
        template: dict[str, dict[str, Any]] = {TENSORS: {}, OBJECTS: {}}
        targets: dict[int, torch.Tensor] = {}
        for (kind, key), leaf in leaves.items():
            if kind == TENSORS:
                targets[id(leaf)] = local = empty_local(leaf)
                template[TENSORS][key] = tessera_tensor(leaf, local)
            else:
                grid, cell = grid_of(leaf)
                template[OBJECTS][key] = ShardedObject(None, grid, cell)
        for kind in (TENSORS, OBJECTS):
            if not template[kind]:
                del template[kind]
        result = load(checkpoint, template, process_group=self.process_group) if template else {}
        out: dict[int, Any] = dict(targets)
        for (kind, key), leaf in leaves.items():
            if kind == OBJECTS:
                out[id(leaf)] = result[OBJECTS][key]
        return out

    def load_tensors_metadata(self, checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """Each stored tensor as an unsharded Megatron ``ShardedTensor`` without data (meta device)."""
        with open_checkpoint(tessera_path(checkpoint_dir)) as checkpoint:
            return _tensors_metadata(checkpoint)

    def load_sharded_metadata(self, checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """:meth:`load_tensors_metadata` and every stored ``ShardedObject`` cell (by unique key)."""
        with open_checkpoint(tessera_path(checkpoint_dir)) as checkpoint:
            metadata = _tensors_metadata(checkpoint)
            cells: dict[str, list[tuple[int, ...]]] = defaultdict(list)
            for entry in checkpoint.subtree((OBJECTS,)):
                key = entry.key
                offset = tuple(k for k in key[2:] if isinstance(k, int))
                cells[str(key[1])].append(offset)
        for name, offsets in cells.items():
            # Every cell of a grid is saved (Megatron validates that), so the grid is their extent.
            grid = tuple(max(o[d] for o in offsets) + 1 for d in range(len(offsets[0])))
            for offset in offsets:
                obj = _mapping.ShardedObject(name, None, grid, offset, replica_id=0)
                metadata[obj.unique_key] = obj
        return metadata

    def remove_sharded_tensors(self, checkpoint_dir: str | os.PathLike[str], key_prefix: str) -> None:
        raise UnsupportedVersionError(
            f"{tessera_path(checkpoint_dir)}: a committed Tessera checkpoint is immutable; "
            f"save a new one without the tensors under {key_prefix!r}"
        )

    def __str__(self) -> str:
        return f"TesseraLoadStrategy({BACKEND}, {VERSION})"


class TesseraCommonLoadStrategy(_ReadsTessera, _CommonLoadBase):  # type: ignore[misc]
    """Loads the common state that :func:`tessera.megatron.save` stored in the Tessera
    checkpoint (``metadata.json``'s ``common_backend`` is then ``"tessera"``): registered so that a
    plain ``dist_checkpointing.load`` on megatron-core <= 0.16 reads it instead of ``common.pt``."""

    def load_common(self, checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
        return load_common(checkpoint_dir)

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> Any:
        return TesseraLoadStrategy().load(sharded_objects_state_dict, checkpoint_dir)

    def load_sharded_metadata(self, checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
        return {}


def load_common(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The common state stored with the sharded state; ``{}`` where none was."""
    with open_checkpoint(tessera_path(checkpoint_dir)) as checkpoint:
        if not checkpoint.subtree((COMMON,)):
            return {}
        common = load(checkpoint, keys=[COMMON]).get(COMMON, {})
    return dict(common) if isinstance(common, dict) else {}


def _tensors_metadata(checkpoint: Checkpoint) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for entry in checkpoint.subtree((TENSORS,)):
        if isinstance(entry, TensorEntry) and len(entry.key) == 2:
            name = str(entry.key[1])
            empty = torch.empty(entry.layout.shape, dtype=entry.layout.dtype.torch_dtype, device="meta")
            metadata[name] = _mapping.ShardedTensor.from_rank_offsets(name, empty, replica_id=0)
    return metadata


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if key in target:
        raise ShardingError(
            f"Megatron ShardedObject {key!r}: this rank holds two main-replica cells of it; "
            "each rank may hold one cell of a key (mark copies with replica_id != 0)"
        )
    target[key] = value


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _check_backend(backend: str) -> None:
    if backend != BACKEND:
        raise UnsupportedVersionError(
            f"metadata.json names the backend {backend!r}; the Tessera strategies read {BACKEND!r}"
        )


def _check_version(version: int) -> None:
    if version != VERSION:
        raise UnsupportedVersionError(
            f"metadata.json names {BACKEND} version {version}; this tessera.megatron reads {VERSION}"
        )
