"""A mistake in a call is a ``TypeError`` or ``ValueError`` naming the argument, never a format error.

Format errors (``bad_key``, ``schema_violation``...) say what is wrong with a checkpoint or a
state dict's keys, for the spec's codes; a state dict that is not a dict, a negative step or a
limit of zero is the caller's mistake, and Python's classes say so. Nothing is written first.
(The save options have their own checks, with ``SaveOptions``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera import ReaderLimits, RunDirectory


def _not_ours(error: BaseException) -> None:
    assert not isinstance(error, tessera.TesseraError), f"{type(error).__name__} is a format error"


@pytest.mark.parametrize("state", [[torch.zeros(2)], torch.zeros(2), "weights", None], ids=repr)
def test_a_state_dict_that_is_not_a_dict_is_a_type_error(tmp_path: Path, state: Any) -> None:
    with pytest.raises(TypeError, match="a state dict must be a dict") as info:
        tessera.save(state, tmp_path / "ckpt")
    _not_ours(info.value)
    assert not (tmp_path / "ckpt").exists()


def test_a_template_that_is_not_a_dict_is_a_type_error(tmp_path: Path) -> None:
    tessera.save({"w": torch.zeros(2)}, tmp_path / "ckpt")
    with pytest.raises(TypeError, match="a state dict must be a dict") as info:
        tessera.load(tmp_path / "ckpt", [torch.zeros(2)])  # type: ignore[arg-type]
    _not_ours(info.value)


def test_strict_names_the_modes(tmp_path: Path) -> None:
    tessera.save({"w": torch.zeros(2)}, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="'raise_all'.*got 'strict'") as info:
        tessera.load(tmp_path / "ckpt", strict="strict")
    _not_ours(info.value)
    with pytest.raises(TypeError, match="strict must be a tessera.Strict or its name"):
        tessera.load(tmp_path / "ckpt", strict=True)  # type: ignore[arg-type]
    assert tessera.load(tmp_path / "ckpt", strict=tessera.Strict.RAISE_ALL)["w"].shape == (2,)


def test_keys_must_be_a_list_of_paths(tmp_path: Path) -> None:
    tessera.save({"model": {"w": torch.zeros(2)}}, tmp_path / "ckpt")
    with pytest.raises(TypeError, match=r"keys=\['model'\]"):
        tessera.load(tmp_path / "ckpt", keys="model")
    with pytest.raises(TypeError, match="got 1"):
        tessera.load(tmp_path / "ckpt", keys=[1])  # type: ignore[list-item]
    assert list(tessera.load(tmp_path / "ckpt", keys=("model",))) == ["model"]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"keep_last": 0}, ValueError, "keep_last must be at least 1, got 0"),
        ({"keep_last": -3}, ValueError, "keep_last must be at least 1"),
        ({"keep_every": 0}, ValueError, "keep_every must be at least 1, got 0"),
        ({"keep_last": "2"}, TypeError, "keep_last must be an int or None, got '2'"),
        ({"keep_last": 1.5}, TypeError, "keep_last must be an int or None"),
        ({"keep_every": True}, TypeError, "keep_every must be an int or None, got True"),
    ],
    ids=repr,
)
def test_run_directory_options(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        RunDirectory(tmp_path / "run", **options)
    _not_ours(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("step", "error"), [(-1, ValueError), ("3", TypeError), (2.0, TypeError), (True, TypeError)], ids=repr
)
def test_a_step_is_a_non_negative_int(tmp_path: Path, step: Any, error: type[Exception]) -> None:
    run = RunDirectory(tmp_path / "run")
    with pytest.raises(error, match="a step is a non-negative int") as info:
        run.save({"w": torch.zeros(2)}, step)
    _not_ours(info.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("step-*"))
    assert run.name_of(0) == "step-00000000"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_json_bytes": 0}, ValueError),
        ({"max_load_bytes": -1}, ValueError),
        ({"max_rank": -1}, ValueError),
        ({"max_chunk_bytes": 2.0**31}, TypeError),
        ({"max_json_depth": True}, TypeError),
        ({"max_chunks_per_array": "many"}, TypeError),
    ],
    ids=repr,
)
def test_reader_limits_are_positive_ints(options: dict[str, Any], error: type[Exception]) -> None:
    (name,) = options
    with pytest.raises(error, match=f"ReaderLimits.{name} must be") as info:
        ReaderLimits(**options)
    _not_ours(info.value)


def test_reader_limits_allow_scalars_only() -> None:
    assert ReaderLimits(max_rank=0).max_rank == 0
