"""An FSDP2 (``fully_shard``) model and its AdamW, through ``ModelAndOptimizer``, on real gloo
ranks: saved at 4 ranks, loaded at 4 and at 2, and the next ``opt.step()`` runs on the loaded
shards (bit-identically at the same world size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fsdp_training import fsdp_model, gathered, train_step
from tests.ranks import run_ranks

SAVED = 4


def _save(rank: int, world: int, path: str) -> dict[str, Any]:
    import tessera
    from tessera import ModelAndOptimizer

    model, optimizer = fsdp_model(world, seed=0)
    for n in range(2):
        train_step(model, optimizer, rank, world, n)
    tessera.save({"train": ModelAndOptimizer(model, optimizer), "step": 2}, path)
    saved = gathered(model, optimizer)
    train_step(model, optimizer, rank, world, 2)
    return {"saved": saved, "next": gathered(model, optimizer)}


def _load(rank: int, world: int, path: str) -> dict[str, Any]:
    import tessera
    from tessera import ModelAndOptimizer

    model, optimizer = fsdp_model(world, seed=1)  # other weights, an optimizer that never stepped
    train = ModelAndOptimizer(model, optimizer)
    template: dict[str, Any] = {"train": train, "step": 0}
    tessera.load(path, template)
    assert template["train"] is train and template["step"] == 2
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    loaded = gathered(model, optimizer)
    train_step(model, optimizer, rank, world, 2)
    return {"loaded": loaded, "next": gathered(model, optimizer)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("fsdp") / "c"
    return path, run_ranks(SAVED, _save, str(path))[0]


@pytest.mark.parametrize("world", [SAVED, 2])
def test_fsdp2_model_and_adamw_resume(saved: tuple[Path, dict[str, Any]], world: int) -> None:
    path, reference = saved
    result = run_ranks(world, _load, str(path))[0]
    assert result["loaded"].keys() == reference["saved"].keys()
    for key, tensor in reference["saved"].items():
        assert torch.equal(result["loaded"][key], tensor), key
    for key, tensor in reference["next"].items():
        if world == SAVED:
            assert torch.equal(result["next"][key], tensor), key
        else:  # the gradients are reduced over another number of ranks: equal up to rounding
            torch.testing.assert_close(result["next"][key], tensor, rtol=1e-5, atol=1e-6)
