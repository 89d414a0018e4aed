"""``tessera.Checkpointer``: a training state saved and resumed in place, the load modes, the
checkpoint selection, the config check, asynchronous saves (spec R10.13).

A tiny model with dropout, AdamW, a warmup LR scheduler, ``RNGState`` and a data position
trains a few steps in one process; the kill-and-resume test in new processes lives elsewhere."""

from __future__ import annotations

import copy
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch
from tessera import Checkpointer, ConfigMismatchError, ModelAndOptimizer
from tessera.storage.local import LocalStorage
from tessera.testing import CHUNKS, FaultyStorage

from .conftest import assert_tree_bit_equal
from .ranks import run_ranks
from .test_async_save import Gate, gate  # noqa: F401 (the fixture)


class DataPosition:
    """Where a data loader is: a user object saved through its state_dict (role progress)."""

    def __init__(self) -> None:
        self.index = 0

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = state["index"]


def _state(seed: int) -> dict[str, Any]:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=4)  # warmup
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": tessera.RNGState(),
        "data": DataPosition(),
        "tokens": 0,
    }


def _train(state: dict[str, Any], steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        data = torch.Generator().manual_seed(state["data"].index)  # the batch follows the position
        x = torch.randn(6, 4, generator=data) * (1 + random.random()) + float(np.random.rand())
        loss = state["model"](x).square().mean()
        loss.backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad()
        state["scheduler"].step()
        state["data"].index += 1
        state["tokens"] += 6
        losses.append(loss.item())
    return losses


def _weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state["model"].state_dict().items()}


def _rng_now() -> tuple[Any, ...]:
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def _assert_rng(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    assert got[0] == want[0]
    assert np.array_equal(got[1], want[1]) and torch.equal(got[2], want[2])


def _saved_run(tmp_path: Path, steps: int = 3, **kwargs: Any) -> tuple[Path, dict[str, Any]]:
    """A run with one checkpoint at ``steps``; the state as saved (copies)."""
    state = _state(0)
    _train(state, steps)
    with Checkpointer(tmp_path / "run", **kwargs) as ckpt:
        ckpt.save(steps, state)
    return tmp_path / "run", {
        "weights": _weights(state),
        "optimizer": copy.deepcopy(state["optimizer"].state_dict()),
        "lr": state["scheduler"].get_last_lr(),
    }


def test_resume_in_place_is_bit_exact(tmp_path: Path) -> None:
    straight = _state(0)
    losses = _train(straight, 7)

    state = _state(0)
    args = {"num_layers": 2, "lr": 1e-2}
    with Checkpointer(tmp_path / "run", config=args, must_match=["num_layers"]) as ckpt:
        assert ckpt.load(state) == tessera.Resumed(0, None, "fresh", skipped=tuple(state))
        first = _train(state, 3)
        manifest = ckpt.save(3, state)
    assert isinstance(manifest, tessera.Manifest)
    assert manifest.metadata == {
        "step": 3,
        "run": {
            "kind": "checkpoint",
            "config": args,
            "roles": {
                "model": ["model"],
                "optimizer": ["optimizer", "scheduler"],
                "rng": ["rng"],
                "progress": ["data", "tokens"],
            },
        },
    }

    resumed = _state(1)  # other weights, an optimizer that never stepped: a new process
    _train(resumed, 2)
    model, optimizer = resumed["model"], resumed["optimizer"]
    with Checkpointer(tmp_path / "run", config=args, must_match=["num_layers"]) as ckpt:
        result = ckpt.load(resumed)
    assert result.step == 3 and result.mode == "resume" and result.config == args
    assert result.loaded == tuple(resumed) and result.skipped == () and result.config_changes == {}
    assert result.path == str(tmp_path / "run" / "step-00000003")
    assert resumed["model"] is model and resumed["optimizer"] is optimizer  # loaded in place
    assert resumed["data"].index == 3 and resumed["tokens"] == 18
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert first + _train(resumed, 4) == losses
    assert_tree_bit_equal(_weights(resumed), _weights(straight))
    assert resumed["scheduler"].get_last_lr() == straight["scheduler"].get_last_lr()


def test_finetune_loads_only_the_weights_and_resets_the_step(tmp_path: Path) -> None:
    run, saved = _saved_run(tmp_path)
    state = _state(1)
    _train(state, 1)
    optimizer, lr, rng = (
        copy.deepcopy(state["optimizer"].state_dict()),
        state["scheduler"].get_last_lr(),
        _rng_now(),
    )
    result = Checkpointer(run).load(state, mode="finetune")
    assert (result.step, result.mode, result.loaded) == (0, "finetune", ("model",))
    assert result.skipped == ("optimizer", "scheduler", "rng", "data", "tokens")
    assert_tree_bit_equal(_weights(state), saved["weights"])
    assert_tree_bit_equal(state["optimizer"].state_dict(), optimizer)
    assert state["scheduler"].get_last_lr() == lr and state["data"].index == 1 and state["tokens"] == 6
    _assert_rng(_rng_now(), rng)


def test_load_optimizer_false_and_load_rng_false(tmp_path: Path) -> None:
    run, saved = _saved_run(tmp_path)
    state = _state(1)
    _train(state, 1)
    optimizer, lr = copy.deepcopy(state["optimizer"].state_dict()), state["scheduler"].get_last_lr()
    result = Checkpointer(run).load(state, load_optimizer=False)
    assert result.step == 3 and result.skipped == ("optimizer", "scheduler")
    assert_tree_bit_equal(_weights(state), saved["weights"])
    assert_tree_bit_equal(state["optimizer"].state_dict(), optimizer)
    assert state["scheduler"].get_last_lr() == lr and state["data"].index == 3

    state = _state(1)
    rng = _rng_now()
    result = Checkpointer(run).load(state, load_rng=False)
    assert result.skipped == ("rng",)
    _assert_rng(_rng_now(), rng)
    assert_tree_bit_equal(state["optimizer"].state_dict(), saved["optimizer"])
    assert state["scheduler"].get_last_lr() == saved["lr"]


def test_release_checkpoint_holds_weights_only_and_loads_as_a_finetune(tmp_path: Path) -> None:
    state = _state(0)
    _train(state, 2)
    ckpt = Checkpointer(tmp_path / "run", config={"num_layers": 2}, must_match=["num_layers"])
    manifest = ckpt.save_release(tmp_path / "release", state)
    assert "step" not in manifest.metadata and manifest.metadata["run"]["kind"] == "release"
    assert manifest.metadata["run"]["roles"] == {
        "model": ["model"],
        "optimizer": [],
        "rng": [],
        "progress": [],
    }
    assert sorted(tessera.open(tmp_path / "release")) == sorted(
        f"model/{k}" for k in state["model"].state_dict()
    )

    fresh = _state(1)
    optimizer = copy.deepcopy(fresh["optimizer"].state_dict())
    result = ckpt.load(fresh, path=tmp_path / "release")  # mode "resume" asked: a release is a finetune
    assert (result.step, result.mode, result.loaded) == (0, "release", ("model",))
    assert_tree_bit_equal(_weights(fresh), _weights(state))
    assert_tree_bit_equal(fresh["optimizer"].state_dict(), optimizer)

    # A ModelAndOptimizer releases and finetunes its model part alone.
    both = {"train": ModelAndOptimizer(state["model"], state["optimizer"])}
    ckpt.save_release(tmp_path / "release2", both)
    assert all(k.startswith("train/model/") for k in tessera.open(tmp_path / "release2"))
    target = _state(1)
    before = copy.deepcopy(target["optimizer"].state_dict())
    result = ckpt.load(
        {"train": ModelAndOptimizer(target["model"], target["optimizer"])}, path=tmp_path / "release2"
    )
    assert result.mode == "release" and result.loaded == ("train",)
    assert_tree_bit_equal(_weights(target), _weights(state))
    assert_tree_bit_equal(target["optimizer"].state_dict(), before)
    with pytest.raises(tessera.InvalidKeyError, match="no key of role model"):
        ckpt.save_release(tmp_path / "release3", {"data": DataPosition()})


def test_model_and_optimizer_resumes_whole_or_its_model_part(tmp_path: Path) -> None:
    state = _state(0)
    _train(state, 2)
    with Checkpointer(tmp_path / "run") as ckpt:
        manifest = ckpt.save(2, {"train": ModelAndOptimizer(state["model"], state["optimizer"])})
        assert manifest.metadata["run"]["roles"]["optimizer"] == ["train/optimizer"]
        target = _state(1)
        before = copy.deepcopy(target["optimizer"].state_dict())
        train = {"train": ModelAndOptimizer(target["model"], target["optimizer"])}
        assert ckpt.load(train, load_optimizer=False).loaded == ("train",)
        assert_tree_bit_equal(_weights(target), _weights(state))
        assert_tree_bit_equal(target["optimizer"].state_dict(), before)
        ckpt.load(train)
        assert_tree_bit_equal(target["optimizer"].state_dict(), state["optimizer"].state_dict())


def test_step_path_and_latest_select_the_checkpoint(tmp_path: Path) -> None:
    state = _state(0)
    weights = {}
    with Checkpointer(tmp_path / "run") as ckpt:
        for step in (1, 2, 3):
            _train(state, 1)
            ckpt.save(step, state)
            weights[step] = _weights(state)
        (tmp_path / "run" / "step-00000005").mkdir()  # a save that never committed
        (tmp_path / "run" / "step-00000005" / "claim.json").write_text("{}")
        for how, step in (({}, 3), ({"step": 2}, 2), ({"path": tmp_path / "run" / "step-00000001"}, 1)):
            target = _state(1)
            assert ckpt.load(target, **how).step == step
            assert_tree_bit_equal(_weights(target), weights[step])
        target = _state(1)
        untouched = _weights(target)
        with pytest.raises(
            tessera.CheckpointNotFoundError, match=r"step-00000007 does not exist.*\[1, 2, 3\]"
        ):
            ckpt.load(target, step=7)
        with pytest.raises(tessera.UncommittedCheckpointError, match="step-00000005 is not committed"):
            ckpt.load(target, step=5)
        with pytest.raises(ValueError, match="not both"):
            ckpt.load(target, step=1, path=tmp_path / "run" / "step-00000001")
        with pytest.raises(tessera.UncommittedCheckpointError):
            ckpt.load(target, path=tmp_path / "run" / "step-00000005")
        assert_tree_bit_equal(_weights(target), untouched)


def test_config_forms_are_saved_as_json(tmp_path: Path) -> None:
    import argparse
    import dataclasses
    import enum

    class Kind(enum.Enum):
        GPT = 1

    @dataclasses.dataclass
    class Optim:
        betas: tuple[float, float] = (0.9, 0.95)

    @dataclasses.dataclass
    class Args:
        num_layers: int = 2
        data: Path = Path("/data/x")
        dtype: torch.dtype = torch.bfloat16
        kind: Kind = Kind.GPT
        optim: Optim = dataclasses.field(default_factory=Optim)

    want = {
        "num_layers": 2,
        "data": "/data/x",
        "dtype": "torch.bfloat16",
        "kind": "GPT",
        "optim": {"betas": [0.9, 0.95]},
    }
    namespace = argparse.Namespace(**dataclasses.asdict(Args()))
    for config in (Args(), namespace, dataclasses.asdict(Args())):
        assert Checkpointer(tmp_path / "run", config=config).config == want
    saved = Checkpointer(tmp_path / "run", config=Args()).save(1, {"w": torch.ones(1)})
    assert saved.metadata["run"]["config"] == want
    # the saved tuple (a list in JSON) equals the current one: no change reported
    assert (
        Checkpointer(tmp_path / "run", config=Args(), must_match=["optim"])
        .load({"w": torch.ones(1)})
        .config_changes
        == {}
    )


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"lr": 0.1, "hook": object()}, "'hook' holds a builtins.object"),
        ({"x": {"y": float("nan")}}, "'x.y' is nan"),
    ],
)
def test_a_non_json_config_value_is_refused_naming_its_key(tmp_path: Path, config: Any, named: str) -> None:
    with pytest.raises(tessera.UnsafeEncodingError, match=named):
        Checkpointer(tmp_path / "run", config=config)
    assert not (tmp_path / "run").exists()


def test_a_must_match_mismatch_is_refused_before_anything_changes(tmp_path: Path) -> None:
    run, _ = _saved_run(tmp_path, config={"num_layers": 2, "hidden_size": 8, "heads": 2, "lr": 0.1})
    state = _state(1)
    before, rng = _weights(state), _rng_now()
    ckpt = Checkpointer(run, config={"num_layers": 4, "hidden_size": 8, "lr": 0.1}, must_match=["num_layers"])
    with pytest.raises(ConfigMismatchError, match=r"num_layers: saved 2, this run 4") as info:
        ckpt.load(state)
    assert isinstance(info.value, ValueError) and info.value.code == "config_mismatch"
    # every differing must_match key in one message, an absent one shown as such
    several = Checkpointer(
        run, config={"num_layers": 4, "hidden_size": 16}, must_match=["num_layers", "hidden_size", "heads"]
    )
    with pytest.raises(ConfigMismatchError) as info:
        several.load(state, mode="finetune")  # the check applies to a finetune too
    message = str(info.value)
    assert "3 key(s)" in message and "hidden_size: saved 8, this run 16" in message
    assert "heads: saved 2, this run <absent>" in message
    assert_tree_bit_equal(_weights(state), before)
    _assert_rng(_rng_now(), rng)
    assert state["data"].index == 0


def test_a_checkpoint_without_a_config_fails_a_must_match(tmp_path: Path) -> None:
    run, _ = _saved_run(tmp_path)
    with pytest.raises(ConfigMismatchError, match="has no saved config"):
        Checkpointer(run, config={"num_layers": 2}, must_match=["num_layers"]).load(_state(1))


def test_keys_that_may_differ_are_reported_and_warned(tmp_path: Path) -> None:
    run, saved = _saved_run(tmp_path, config={"num_layers": 2, "lr": 0.1, "old": 1})
    state = _state(1)
    ckpt = Checkpointer(run, config={"num_layers": 2, "lr": 0.2, "new": True}, must_match=["num_layers"])
    with pytest.warns(tessera.TesseraWarning, match=r"lr: saved 0.1, now 0.2") as caught:
        result = ckpt.load(state)
    assert len(caught) == 1
    assert result.config_changes == {"lr": (0.1, 0.2), "new": ("<absent>", True), "old": (1, "<absent>")}
    assert result.step == 3
    assert_tree_bit_equal(_weights(state), saved["weights"])


def test_bad_arguments_are_refused_before_anything_changes(tmp_path: Path) -> None:
    run, _ = _saved_run(tmp_path)
    state = _state(1)
    before = _weights(state)
    with pytest.raises(tessera.InvalidKeyError, match="'resume', 'finetune'") as info:
        Checkpointer(run).load(state, mode="warm")
    assert isinstance(info.value, ValueError)
    state["ema"] = torch.zeros(3)  # a key of the state that the checkpoint lacks
    with pytest.raises(tessera.KeyMismatchError, match="ema"):
        Checkpointer(run).load(state)
    assert_tree_bit_equal(_weights(state), before)
    assert state["data"].index == 0 and state["tokens"] == 0
    with pytest.raises(tessera.InvalidKeyError, match="finetune loads the model role only"):
        Checkpointer(run).load({"data": state["data"]}, mode="finetune")
    with pytest.raises(tessera.InvalidKeyError, match="unknown role"):
        Checkpointer(run, roles={"ema": "weights"})
    with pytest.raises(tessera.InvalidKeyError, match="does not have: \\['nope'\\]"):
        Checkpointer(run, roles={"nope": "model"}).save(9, state)
    with pytest.raises(tessera.InvalidKeyError, match="Checkpointer's own"):
        Checkpointer(run).save(9, state, metadata={"step": 1})
    with pytest.raises(TypeError):
        Checkpointer(run).save(True, state)  # type: ignore[arg-type]


def test_roles_override_the_type(tmp_path: Path) -> None:
    ema = {"w": torch.ones(2)}
    manifest = Checkpointer(tmp_path / "run", roles={"ema": "model"}).save(1, {"ema": ema, "n": 1})
    assert manifest.metadata["run"]["roles"]["model"] == ["ema"]
    target = {"ema": {"w": torch.zeros(2)}, "n": 0}
    result = Checkpointer(tmp_path / "run", roles={"ema": "model"}).load(target, mode="finetune")
    assert result.loaded == ("ema",) and target["n"] == 0 and torch.equal(target["ema"]["w"], torch.ones(2))


def test_async_save_moves_latest_after_the_commit(tmp_path: Path, gate: Gate) -> None:  # noqa: F811
    state = _state(0)
    with Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, state)
    held = Checkpointer(gate.wrap(tmp_path / "run"), async_save=True, keep_last=1)
    _train(state, 1)
    weights = _weights(state)
    handle = held.save(2, state)
    assert isinstance(handle, tessera.AsyncSave)
    assert gate.reached.wait(10)
    _train(state, 1)  # training goes on: the save holds the state as it was at the call
    run = tessera.RunDirectory(tmp_path / "run")
    assert run.latest() == tmp_path / "run" / "step-00000001"
    closing = threading.Thread(target=held.close, daemon=True)
    closing.start()
    closing.join(0.5)
    assert closing.is_alive() and not handle.done()  # close waits for the save in flight
    assert run.latest() == tmp_path / "run" / "step-00000001"
    gate.open()
    closing.join(10)
    assert not closing.is_alive()
    assert handle.done() and run.latest() == tmp_path / "run" / "step-00000002"
    assert [c.step for c in run.checkpoints()] == [2]
    target = _state(1)
    assert Checkpointer(tmp_path / "run").load(target).step == 2
    assert_tree_bit_equal(_weights(target), weights)
    with pytest.raises(RuntimeError, match="closed"):
        held.save(3, state)


def test_an_async_failure_is_raised_once(tmp_path: Path) -> None:
    faulty = FaultyStorage(LocalStorage(tmp_path / "run")).fail_write(matching=CHUNKS, nth=1)
    ckpt = Checkpointer(faulty, async_save=True)
    state = {"w": torch.arange(4.0), "n": 1}
    ckpt.save(1, state)  # fails in the background
    with pytest.raises(tessera.StorageError, match="injected fault") as info:
        ckpt.save(2, state)  # raised by the next save, which starts nothing
    assert any("step-00000001" in note for note in info.value.__notes__)
    ckpt.save(2, state)  # raised once
    ckpt.wait()
    assert tessera.RunDirectory(tmp_path / "run").latest() == tmp_path / "run" / "step-00000002"

    faulty.fail_write(matching=CHUNKS, nth=1)  # a new rule: step 3's chunk
    ckpt.save(3, state)
    with pytest.raises(tessera.StorageError, match="injected fault"):
        ckpt.close()
    ckpt.close()  # raised once

    failing = Checkpointer(
        FaultyStorage(LocalStorage(tmp_path / "run2")).fail_write(matching=CHUNKS), async_save=True
    )
    with pytest.raises(KeyError, match="body") as body, failing:
        failing.save(1, state)
        raise KeyError("body")  # the body's error is not masked by the save's
    assert any("closing the Checkpointer failed" in note for note in body.value.__notes__)


def _ranks_save_and_load(rank: int, world: int, run: str) -> dict[str, Any]:
    import tessera

    torch.manual_seed(0)
    state = {"model": torch.nn.Linear(3, 2), "rng": tessera.RNGState(), "data": DataPosition()}
    torch.manual_seed(rank)  # the model is replicated; each rank's generators are its own
    random.seed(rank)
    state["data"].index = 5
    with tessera.Checkpointer(run, config={"num_layers": 1}, must_match=["num_layers"]) as ckpt:
        ckpt.save(5, state)
        weights = _weights(state)
        after_save = (torch.rand(3), random.random())
        torch.manual_seed(99)
        random.seed(99)
        with torch.no_grad():
            state["model"].weight.zero_()
        state["data"].index = 0
        result = ckpt.load(state)
    assert result.step == 5 and state["data"].index == 5
    assert_tree_bit_equal(_weights(state), weights)
    after_load = (torch.rand(3), random.random())
    assert torch.equal(after_save[0], after_load[0]) and after_save[1] == after_load[1]
    return {"draw": after_load[1]}


def test_two_ranks_save_and_resume_their_own_rng(tmp_path: Path) -> None:
    results = run_ranks(2, _ranks_save_and_load, str(tmp_path / "run"))
    assert results[0]["draw"] != results[1]["draw"]  # each rank got its own generator back
    stored = tessera.open(tmp_path / "run" / "step-00000005")
    assert "rng/python/~0" in stored and "rng/python/~1" in stored  # one cell per rank


def _ranks_resume_at_four(rank: int, world: int, run: str) -> dict[str, Any]:
    import warnings

    import tessera

    state = {"model": torch.nn.Linear(3, 2), "rng": tessera.RNGState()}
    torch.manual_seed(1000 + rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tessera.Checkpointer(run).load(state)
    return {
        "step": result.step,
        "draw": torch.rand(2).tolist(),
        "warned": [str(w.message) for w in caught if issubclass(w.category, tessera.TesseraWarning)],
    }


def test_a_resume_at_more_ranks_derives_the_new_ranks_rng(tmp_path: Path) -> None:
    """Saved by 2 ranks, resumed by 4: ranks 0-1 get their own generators back, ranks 2-3 a state
    derived from rank 0's and their rank, with a warning, the same on every resume."""
    run = str(tmp_path / "run")
    saved = run_ranks(2, _ranks_save_and_load, run)
    first = run_ranks(4, _ranks_resume_at_four, run)
    again = run_ranks(4, _ranks_resume_at_four, run)
    assert [r["step"] for r in first] == [5] * 4
    assert [r["draw"] for r in first] == [r["draw"] for r in again]  # deterministic
    assert len({tuple(r["draw"]) for r in first}) == 4  # every rank draws its own numbers
    assert not first[0]["warned"] and not first[1]["warned"]
    for rank in (2, 3):
        assert any(f"rank {rank} had none" in w for w in first[rank]["warned"]), first[rank]["warned"]
    assert saved[0]["draw"] != saved[1]["draw"]


def test_preempted_saves_the_step_once_and_the_handler_goes_with_the_checkpointer(tmp_path: Path) -> None:
    import os
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    state = _state(5)
    with Checkpointer(tmp_path / "run", async_save=True, preemption=tessera.Preemption()) as ckpt:
        assert signal.getsignal(signal.SIGUSR1) is not before  # installed while open
        _train(state, 2)
        assert not ckpt.preempted(2, state)  # no signal: nothing saved
        assert ckpt.run.latest() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ckpt.preempted(2, state)  # the signal: step 2 saved synchronously, committed now
        assert ckpt.run.latest() == tmp_path / "run" / "step-00000002"
        _train(state, 1)
        ckpt.save(3, state)  # asynchronous: preempted waits for it and does not save step 3 again
        assert ckpt.preempted(3, state)
        assert [c.step for c in ckpt.run.checkpoints()] == [2, 3]
    assert signal.getsignal(signal.SIGUSR1) is before  # uninstalled by close
    weights = _weights(state)
    fresh = _state(6)
    assert Checkpointer(tmp_path / "run").load(fresh).step == 3
    assert_tree_bit_equal(_weights(fresh), weights)
    with pytest.raises(RuntimeError, match="no preemption"):
        Checkpointer(tmp_path / "run").preempted(3, state)
