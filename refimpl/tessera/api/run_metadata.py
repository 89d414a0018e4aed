"""The run metadata of a training-run checkpoint (spec R10.13) and the roles it lists.

A :class:`~tessera.Checkpointer` gives each top-level key of the state it saves a role, and the
load modes choose keys by role (a finetune loads the model role only, ``load_optimizer=False``
skips the optimizer role). The roles are written into the manifest's ``metadata.run`` with the
run's config and the checkpoint's kind, so that another implementation can resume, finetune or
export the checkpoint without knowing the Python objects that saved it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import SchemaViolationError
from ..format.keys import format_key
from ..state.model_optimizer import ModelAndOptimizer
from ..state.rng import RNGState
from .checkpoint import Checkpoint

__all__ = [
    "BOTH",
    "ROLES",
    "model_part",
    "rng_for",
    "role_by_type",
    "run_info",
    "run_metadata",
    "template_for",
]

ROLES = ("model", "optimizer", "rng", "progress")
"""The roles of a state's top-level keys, as the run metadata lists them (R10.13)."""

BOTH = "model+optimizer"
"""The role of a ModelAndOptimizer: its ``model`` part is model, its ``optimizer`` part optimizer."""


def role_by_type(value: Any) -> str:
    """A key's role when ``roles=`` does not name it: by the type of its value."""
    if isinstance(value, ModelAndOptimizer):
        return BOTH
    if isinstance(value, torch.nn.Module):
        return "model"
    if isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
        return "optimizer"
    if isinstance(value, RNGState):
        return "rng"
    return "progress"


def model_part(value: Any) -> Any:
    """What of ``value`` a weights-only save or load takes: a ModelAndOptimizer's model alone."""
    return value.model_only() if isinstance(value, ModelAndOptimizer) else value


def template_for(
    state: Mapping[str, Any], roles: Mapping[str, str], mode: str, *, load_optimizer: bool, load_rng: bool
) -> dict[str, Any]:
    """The template of a load in ``mode``: the keys of ``state`` it loads, a ModelAndOptimizer
    standing for its model part alone where the optimizer is not loaded."""
    template = {}
    for key, value in state.items():
        role = roles[key]
        if mode != "resume":  # finetune, release: the weights only
            if role in ("model", BOTH):
                template[key] = model_part(value)
        elif role == BOTH:
            template[key] = value if load_optimizer else model_part(value)
        elif not (role == "optimizer" and not load_optimizer or role == "rng" and not load_rng):
            template[key] = value
    return template


def rng_for(checkpoint: Checkpoint, key: Any, value: Any) -> Any:
    """``value`` as the template of ``key``, except an :class:`RNGState` on a rank the checkpoint
    has no cells for (saved by fewer ranks): the stand-in that derives this rank's state from
    rank 0's (:meth:`RNGState.for_saved_world`), so that a resume at a larger world size goes on."""
    if not isinstance(value, RNGState):
        return value
    saved_world = len(checkpoint.subtree((key, "torch")))
    return value.for_saved_world(saved_world) if saved_world else value


def run_metadata(kind: str, config: dict[str, Any] | None, roles: Mapping[str, str]) -> dict[str, Any]:
    """``run`` of the manifest metadata (R10.13): kind, config, and the paths of each role
    (``roles``: the saved keys' roles, a ModelAndOptimizer's of a release holding its model only)."""
    paths: dict[str, list[str]] = {r: [] for r in ROLES}
    for key, role in roles.items():
        if role == BOTH:
            paths["model"].append(format_key((key, "model")))
            if kind == "checkpoint":
                paths["optimizer"].append(format_key((key, "optimizer")))
        else:
            paths[role].append(format_key((key,)))
    return {"kind": kind, "config": config, "roles": paths}


def run_info(checkpoint: Checkpoint, where: str) -> tuple[str, int, dict[str, Any] | None]:
    """The kind, step and config of a checkpoint's run metadata (R10.13). A checkpoint saved
    without it (a plain ``tessera.save``) is a checkpoint of kind ``checkpoint`` with no config,
    at its ``step`` if it has one (a ``RunDirectory.save`` writes it), else 0."""
    metadata = checkpoint.metadata
    step = metadata.get("step", 0)
    run = metadata.get("run")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise SchemaViolationError(f"{where}: metadata step is {step!r}, not a non-negative integer (R10.13)")
    if run is None:
        return "checkpoint", step, None
    if not isinstance(run, dict) or run.get("kind") not in ("checkpoint", "release"):
        raise SchemaViolationError(
            f"{where}: metadata run must be an object whose kind is 'checkpoint' or 'release' (R10.13)"
        )
    config = run.get("config")
    if config is not None and not isinstance(config, dict):
        raise SchemaViolationError(f"{where}: metadata run.config must be an object or null (R10.13)")
    return run["kind"], step, config
