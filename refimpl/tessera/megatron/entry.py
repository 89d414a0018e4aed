"""``tessera.megatron.save`` and ``load``: ``dist_checkpointing``'s entry points without ``common.pt``.

Megatron's own ``save`` always writes the common (non-sharded) state with ``torch.save`` to
``common.pt`` (0.16: any other common strategy raises ``NotImplementedError``), and 0.19 ignores
a sharded strategy that is not its own ``torch_dist`` one and reads its common state through
DCP. These two functions run the same steps as Megatron's (factories, non-persistent values,
sharding validation, factory merges: Megatron's own functions) but store the common state in
the Tessera checkpoint, as JSON entries and tensors, so nothing in the checkpoint is a
pickle. They work on every megatron-core from 0.16, and their checkpoints also load through a
plain ``dist_checkpointing.load`` on <= 0.16 once :func:`~tessera.megatron.register` was called.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch.distributed as dist

from ..planning.options import SaveOptions
from .requirement import dist_checkpointing
from .strategy import BACKEND, VERSION, TesseraLoadStrategy, TesseraSaveStrategy, load_common

__all__ = ["load", "save"]

METADATA_FILE = "metadata.json"


def save(
    sharded_state_dict: dict[str, Any],
    checkpoint_dir: str | os.PathLike[str],
    *,
    options: SaveOptions | None = None,
    validate_access_integrity: bool = True,
) -> None:
    """Every rank: save a Megatron sharded state dict (as ``dist_checkpointing.save`` takes it)
    into ``checkpoint_dir``: the Tessera checkpoint in ``tessera/`` and ``metadata.json``
    naming the backend ``("tessera", 1)`` for both the sharded and the common state.

    Megatron's sharding validation runs unless ``validate_access_integrity=False`` (needed on
    megatron-core 0.16 for ``flattened_range`` shards, which its validation cannot copy).
    """
    utils = _module("state_dict_utils")
    os.makedirs(checkpoint_dir, exist_ok=True)
    sharded, common = utils.save_preprocess(sharded_state_dict, validate_access_integrity)
    TesseraSaveStrategy(options=options).save_with_common(sharded, checkpoint_dir, common)
    if _rank() == 0:
        config = {
            "sharded_backend": BACKEND,
            "sharded_backend_version": VERSION,
            "common_backend": BACKEND,
            "common_backend_version": VERSION,
        }
        with open(os.path.join(os.fspath(checkpoint_dir), METADATA_FILE), "w") as file:
            json.dump(config, file)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load(sharded_state_dict: dict[str, Any], checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Every rank: load into the layout ``sharded_state_dict`` describes (any TP/PP/DP); the
    state dict with tensors and values in place of the sharded leaves, common state included,
    as ``dist_checkpointing.load`` returns it. A key the checkpoint lacks is a
    :class:`~tessera.KeyMismatchError` naming it, before anything is read (Megatron's
    ``strict="raise_unexpected"``); shapes and dtypes must match (``TensorMismatchError``)."""
    utils = _module("state_dict_utils")
    dict_utils = _module("dict_utils")
    mapping = _module("mapping")
    sharded, nonpersistent, factories = utils.load_preprocess(sharded_state_dict)
    common = load_common(checkpoint_dir)
    dict_utils.merge(common, nonpersistent)
    sharded, _ = dict_utils.extract_matching_values(sharded, lambda v: isinstance(v, mapping.ShardedBase))
    loaded = TesseraLoadStrategy().load(sharded, checkpoint_dir)
    dict_utils.merge(common, loaded)
    return dict(mapping.apply_factory_merges(common, factories))


def _module(name: str) -> Any:
    return importlib.import_module(f"{dist_checkpointing().__name__}.{name}")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
