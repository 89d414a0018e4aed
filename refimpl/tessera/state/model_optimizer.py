"""A model and its optimizers as one :class:`~tessera.Stateful`, through torch's distributed state dicts.

A plain ``optimizer.state_dict()`` keys its state by parameter number and holds
nothing before the first step, so a fresh optimizer of an FSDP2 (``fully_shard``)
or tensor-parallel model is loaded with plain full tensors where its parameters
are ``DTensor`` shards, and the next ``step()`` fails. torch's
``get_state_dict`` / ``set_state_dict`` (``torch.distributed.checkpoint.state_dict``)
give the model and optimizer state keyed by parameter name, as ``DTensor`` shards
like the parameters, with the optimizer state initialized even before the first
step; Tessera then reads each rank's shards in place, at the saving world size
or any other, and hands the state back through ``set_state_dict``. It works for
plain (unsharded) models too.

Call order: every rank of the model's process group puts a ``ModelAndOptimizer``
in the state dict it passes to ``tessera.save`` / ``tessera.load`` (or to a
:class:`~tessera.Checkpointer`); Tessera calls ``state_dict()`` while it plans (all
ranks), and ``load_state_dict`` after every rank has read its shards (all ranks).
:meth:`ModelAndOptimizer.model_only` is the model part alone, which a ``Checkpointer``
loads for a finetune or with ``load_optimizer=False``: the optimizer is left as it was.

It lives in the core (``state``), not with the plug-ins (``tessera.dcp``, ...):
``torch.distributed.checkpoint`` is part of torch, a core dependency, and the ``Checkpointer``
must know it to load the model part alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

# torch.distributed.checkpoint.state_dict is imported by the methods that use it: it takes over a
# second to import, which a Checkpointer (it checks for this class) should not cost a run without one.

__all__ = ["ModelAndOptimizer", "ModelPart"]


class ModelAndOptimizer:
    """``model`` and its ``optimizers`` saved as ``{"model": ..., "optimizer": ...}``, keyed by name.

    ``options`` are torch's ``StateDictOptions`` (the default, sharded state dicts, is what a
    sharded save wants). Taking the state of an optimizer that has never stepped initializes
    it, as torch does (one step with zero gradients and a learning rate of 0: the parameters do
    not change), so that a fresh optimizer is a template of the right shards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
        options: StateDictOptions | None = None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers if isinstance(optimizers, torch.optim.Optimizer) else tuple(optimizers)
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizers, options=self.options)
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizers,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optimizer"],
            options=self.options,
        )

    def model_only(self) -> ModelPart:
        """The model part alone, as a stateful object whose ``state_dict()`` is
        ``{"model": ...}``: loading it restores the weights and leaves the optimizers untouched."""
        return ModelPart(self.model, self.options)


class ModelPart:
    """The ``"model"`` half of a :class:`ModelAndOptimizer`'s state, through torch's
    ``get_model_state_dict`` / ``set_model_state_dict`` (so FSDP2 shards load in place)."""

    def __init__(self, model: torch.nn.Module, options: StateDictOptions | None = None) -> None:
        self.model = model
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(self.model, options=self.options)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state_dict["model"], options=self.options)
