"""Stateful objects: modules, optimizers, LR schedulers and user objects are saved through
``state_dict()`` and loaded in place through ``load_state_dict``, never replaced."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera.state.stateful import is_stateful


class Position:
    """A user's data-loader position: plain JSON state, nothing torch about it."""

    def __init__(self) -> None:
        self.epoch = 0
        self.index = 0
        self.loads = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self.loads += 1


def _run(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, Position]:
    """A model (with dropout and a buffer), AdamW and a warmup schedule, fresh from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Dropout(0.1), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, optimizer, scheduler, Position()


def _train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int
) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 6)
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_stateful_protocol() -> None:
    model, optimizer, scheduler, position = _run()
    for value in (model, optimizer, scheduler, position):
        assert is_stateful(value) and isinstance(value, tessera.Stateful)
    for value in (torch.nn.Linear, torch.zeros(2), {"a": 1}, [1], 3, None):
        assert not is_stateful(value)


def test_round_trip_resumes_bit_identically(tmp_path: Path) -> None:
    model, optimizer, scheduler, position = _run()
    _train(model, optimizer, scheduler, 3)
    position.epoch, position.index = 1, 40
    tessera.save(
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": position, "step": 3},
        tmp_path / "c",
    )
    model2, optimizer2, scheduler2, position2 = _run(seed=1)  # other weights, no optimizer state
    objects = {"model": model2, "optimizer": optimizer2, "scheduler": scheduler2, "data": position2}
    template = {**objects, "step": 0}
    weight = model2[0].weight
    result = tessera.load(tmp_path / "c", template)

    # The same objects, in the same template, restored in place.
    assert result is template and template["step"] == 3
    assert all(template[key] is obj for key, obj in objects.items())
    assert model2[0].weight is weight
    assert (position2.epoch, position2.index, position2.loads) == (1, 40, 1)
    assert optimizer2.param_groups[0]["betas"] == (0.8, 0.95)
    assert isinstance(optimizer2.param_groups[0]["betas"], tuple)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # The next steps (dropout draws from the same generator state) are bit-identical.
    seed = torch.initial_seed() + 7
    torch.manual_seed(seed)
    losses = _train(model, optimizer, scheduler, 3)
    torch.manual_seed(seed)
    assert _train(model2, optimizer2, scheduler2, 3) == losses
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), optimizer2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_as_its_state_dict(tmp_path: Path) -> None:
    """What is stored is the state dict: loading without a template gives plain values, and the
    optimizer takes them back (the betas tuple comes back a list, which AdamW accepts)."""
    model, optimizer, scheduler, _ = _run()
    _train(model, optimizer, scheduler, 2)
    tessera.save({"model": model, "optimizer": optimizer}, tmp_path / "c")
    keys = tessera.open(tmp_path / "c").keys()
    assert [k for k in keys if k.startswith("model/")] == [f"model/{k}" for k in model.state_dict()]
    assert {"optimizer/param_groups", "optimizer/state/~0/exp_avg", "optimizer/state/~5/step"} <= set(keys)
    plain = tessera.load(tmp_path / "c")
    assert set(plain["model"]) == set(model.state_dict())
    assert sorted(plain["optimizer"]["state"]) == list(range(6))
    model2, optimizer2, scheduler2, _ = _run(seed=1)
    model2.load_state_dict(plain["model"])
    optimizer2.load_state_dict(plain["optimizer"])
    torch.manual_seed(5)
    losses = _train(model, optimizer, scheduler, 2)
    scheduler2.load_state_dict(scheduler.state_dict())
    torch.manual_seed(5)
    assert _train(model2, optimizer2, scheduler2, 2) == losses


def test_loads_into_an_optimizer_that_has_state(tmp_path: Path) -> None:
    """A stepped optimizer's own state tensors are the template: they are filled in place."""
    model, optimizer, scheduler, _ = _run()
    _train(model, optimizer, scheduler, 3)
    tessera.save({"optimizer": optimizer}, tmp_path / "c")
    model2, optimizer2, scheduler2, _ = _run(seed=1)
    _train(model2, optimizer2, scheduler2, 1)
    tessera.load(tmp_path / "c", {"optimizer": optimizer2})
    for a, b in zip(optimizer.state.values(), optimizer2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_async_takes_the_state_when_called(tmp_path: Path) -> None:
    model, optimizer, scheduler, position = _run()
    position.index = 5
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    pending = tessera.save_async({"model": model, "data": position}, tmp_path / "c")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    position.index = 6
    pending.wait()
    loaded = tessera.load(tmp_path / "c")
    assert loaded["data"] == {"epoch": 0, "index": 5}
    assert all(torch.equal(loaded["model"][k], v) for k, v in expected.items())


def test_nested_and_in_containers(tmp_path: Path) -> None:
    """Stateful values deep in the template, in a list and in a tuple, keep their places."""
    a, b, c = Position(), Position(), Position()
    a.index, b.index, c.index = 1, 2, 3
    linear = torch.nn.Linear(2, 2)
    tessera.save({"loaders": [a, b], "pair": (c, linear), "run": {"step": 9}}, tmp_path / "c")
    a2, b2, c2, linear2 = Position(), Position(), Position(), torch.nn.Linear(2, 2)
    loaders = [a2, b2]
    template: dict[str, Any] = {"loaders": loaders, "pair": (c2, linear2), "run": {"step": 0}}
    tessera.load(tmp_path / "c", template)
    assert template["loaders"] is loaders and loaders[0] is a2 and loaders[1] is b2
    assert template["pair"][0] is c2 and template["pair"][1] is linear2
    assert (a2.index, b2.index, c2.index) == (1, 2, 3)
    assert torch.equal(linear2.weight, linear.weight) and template["run"] == {"step": 9}


class _Refusing(Position):
    def load_state_dict(self, state: dict[str, int]) -> None:
        raise ValueError("index out of range")


@pytest.mark.parametrize("problem", ["missing", "shape", "dtype"])
def test_errors_change_nothing(tmp_path: Path, problem: str) -> None:
    """A missing key, a shape or a dtype mismatch is refused before any tensor or object changes."""
    model, optimizer, scheduler, position = _run()
    _train(model, optimizer, scheduler, 1)
    position.index = 7
    tessera.save({"model": model, "optimizer": optimizer, "data": position, "step": 1}, tmp_path / "c")
    model2, optimizer2, _, position2 = _run(seed=1)
    if problem == "missing":
        model2.add_module("extra", torch.nn.Linear(2, 2))
    elif problem == "shape":
        model2[3] = torch.nn.Linear(16, 4)
    else:
        model2[3].double()
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    template = {"data": position2, "model": model2, "optimizer": optimizer2, "step": 0}
    error = tessera.KeyMismatchError if problem == "missing" else tessera.TensorMismatchError
    with pytest.raises(error, match="model/3.weight" if problem != "missing" else "model/extra.weight"):
        tessera.load(tmp_path / "c", template)
    assert template["step"] == 0 and position2.loads == 0 and not optimizer2.state
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())


def test_load_state_dict_refusal_names_the_key(tmp_path: Path) -> None:
    tessera.save({"data": Position()}, tmp_path / "c")
    refusing = _Refusing()
    refused = r"data: _Refusing.load_state_dict refused.*index out"
    with pytest.raises(tessera.TensorMismatchError, match=refused):
        tessera.load(tmp_path / "c", {"data": refusing})


def test_optimizer_of_another_model_is_refused(tmp_path: Path) -> None:
    model, optimizer, scheduler, _ = _run()
    _train(model, optimizer, scheduler, 1)
    tessera.save({"optimizer": optimizer}, tmp_path / "c")
    other = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(tessera.TensorMismatchError, match="optimizer: AdamW.load_state_dict refused"):
        tessera.load(tmp_path / "c", {"optimizer": other})


def test_a_module_is_not_a_state_dict() -> None:
    with pytest.raises(TypeError, match=r"got Linear \(a Linear goes in one: \{'model': model\}\)"):
        tessera.save(torch.nn.Linear(2, 2), "unused")  # type: ignore[arg-type]


def test_random_state_in_a_user_object(tmp_path: Path) -> None:
    """A user object whose state holds tuples gets them back as its own state_dict() had them."""

    class Rng:
        def __init__(self) -> None:
            self.rng = random.Random(3)

        def state_dict(self) -> dict[str, Any]:
            return {"state": self.rng.getstate()}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.rng.setstate(state["state"])

    saved = Rng()
    saved.rng.random()
    tessera.save({"rng": saved}, tmp_path / "c")
    restored = Rng()
    tessera.load(tmp_path / "c", {"rng": restored})
    assert restored.rng.random() == saved.rng.random()


def test_strict_modes_apply_inside_objects(tmp_path: Path) -> None:
    """A module with a layer the checkpoint lacks: skipped under a non-raising mode, reported under
    ``return_unexpected``; the rest is loaded and ``load_state_dict`` still runs."""
    model, optimizer, scheduler, _ = _run()
    tessera.save({"model": model}, tmp_path / "c")
    model2, _, _, _ = _run(seed=1)
    model2.add_module("extra", torch.nn.Linear(2, 2))
    extra = model2.extra.weight.clone()
    template = {"model": model2}
    result = tessera.load(tmp_path / "c", template, strict="return_unexpected")
    assert result.state_dict is template and template["model"] is model2
    assert result.unexpected == {"model/extra.weight", "model/extra.bias"}
    assert torch.equal(model2[0].weight, model[0].weight) and torch.equal(model2.extra.weight, extra)


def test_module_template_loads_a_plain_state_dict(tmp_path: Path) -> None:
    """``load(p, {"model": module})`` restores the weights in place, also from a checkpoint saved
    as ``{"model": module.state_dict()}``: the stored keys are the same."""
    saved = torch.nn.Linear(3, 4)
    tessera.save({"model": saved.state_dict()}, tmp_path / "c")
    module = torch.nn.Linear(3, 4)
    weight = module.weight
    template = {"model": module}
    tessera.load(tmp_path / "c", template)
    assert template["model"] is module and module.weight is weight
    assert torch.equal(module.weight, saved.weight) and torch.equal(module.bias, saved.bias)
