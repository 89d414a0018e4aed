"""Strict handling of key differences between a load request and the checkpoint (R14.3-R14.7).

*Missing* keys are stored but not requested; *unexpected* keys are requested but
not stored (Megatron-Core's StrictHandling words).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera import Strict

from .conftest import recorded, recording

STORED = {
    "a": torch.arange(4.0),
    "b": {"x": torch.arange(6).reshape(2, 3), "y": 3},
    "c": torch.ones(2, dtype=torch.bfloat16),
}
MISSING = frozenset({"b/y", "c"})
UNEXPECTED = frozenset({"d"})


@pytest.fixture
def stored(ckpt: Path) -> Path:
    tessera.save(STORED, ckpt)
    return ckpt


def _template(unexpected: bool = True, missing: bool = True) -> dict[str, Any]:
    t: dict[str, Any] = {"a": torch.zeros(4), "b": {"x": torch.zeros(2, 3, dtype=torch.int64)}}
    if not missing:
        t["b"]["y"] = 0
        t["c"] = torch.zeros(2, dtype=torch.bfloat16)
    if unexpected:
        t["d"] = torch.full((2,), -5.0)
    return t


def test_all_eight_modes_exist_R14_4() -> None:
    assert {m.value for m in Strict} == {
        "assume_ok_unexpected",
        "log_unexpected",
        "log_all",
        "raise_unexpected",
        "raise_all",
        "return_unexpected",
        "return_all",
        "ignore_all",
    }


# mode -> (raises?, logs unexpected?, logs missing?, returns LoadResult?, reports missing in result?)
MODES = {
    Strict.ASSUME_OK_UNEXPECTED: (True, False, False, False, False),
    Strict.LOG_UNEXPECTED: (False, True, False, False, False),
    Strict.LOG_ALL: (False, True, True, False, False),
    Strict.RAISE_UNEXPECTED: (True, False, False, False, False),
    Strict.RAISE_ALL: (True, False, False, False, False),
    Strict.RETURN_UNEXPECTED: (False, False, False, True, False),
    Strict.RETURN_ALL: (False, False, False, True, True),
    Strict.IGNORE_ALL: (False, False, False, False, False),
}


@pytest.mark.parametrize("mode", list(Strict), ids=lambda m: m.value)
def test_unexpected_and_missing_R14_4(stored: Path, mode: Strict, caplog: pytest.LogCaptureFixture) -> None:
    raises, logs_unexpected, logs_missing, returns, returns_missing = MODES[mode]
    template = _template()
    d_before = template["d"].clone()
    with caplog.at_level(logging.WARNING, logger="tessera"):
        if raises:
            with pytest.raises(tessera.KeyMismatchError) as info:
                tessera.load(stored, template, strict=mode)
            assert info.value.code == "key_mismatch"
            assert "'d'" in str(info.value)
            return
        result = tessera.load(stored, template, strict=mode)
    messages = " ".join(r.getMessage() for r in caplog.records if r.name == "tessera")
    assert ("'d'" in messages) == logs_unexpected
    assert ("'b/y'" in messages and "'c'" in messages) == logs_missing
    if not (logs_unexpected or logs_missing):
        assert messages == ""
    if returns:
        assert isinstance(result, tessera.LoadResult)
        assert result.unexpected == UNEXPECTED
        assert result.missing == (MISSING if returns_missing else frozenset())
        state = result.state_dict
    else:
        assert not isinstance(result, tessera.LoadResult)
        state = result
    assert state is template
    # Requested and stored keys are loaded, in place.
    assert torch.equal(template["a"], STORED["a"])
    assert torch.equal(template["b"]["x"], STORED["b"]["x"])
    # An unexpected key is skipped (the template keeps its value); missing keys are not loaded.
    assert torch.equal(template["d"], d_before)
    assert "c" not in template and "y" not in template["b"]


@pytest.mark.parametrize("mode", list(Strict), ids=lambda m: m.value)
def test_only_missing_keys_R14_4(stored: Path, mode: Strict, caplog: pytest.LogCaptureFixture) -> None:
    template = _template(unexpected=False)
    with caplog.at_level(logging.WARNING, logger="tessera"):
        if mode is Strict.RAISE_ALL:
            with pytest.raises(tessera.KeyMismatchError) as info:
                tessera.load(stored, template, strict=mode)
            assert "'b/y'" in str(info.value) and "'c'" in str(info.value)
            return
        result = tessera.load(stored, template, strict=mode)
    messages = " ".join(r.getMessage() for r in caplog.records if r.name == "tessera")
    assert ("'c'" in messages) == (mode is Strict.LOG_ALL)
    if mode in (Strict.RETURN_UNEXPECTED, Strict.RETURN_ALL):
        assert result.unexpected == frozenset()
        assert result.missing == (MISSING if mode is Strict.RETURN_ALL else frozenset())
    else:
        assert result is template
    assert torch.equal(template["a"], STORED["a"])


@pytest.mark.parametrize("mode", list(Strict), ids=lambda m: m.value)
def test_exact_match_never_complains_R14_4(
    stored: Path, mode: Strict, caplog: pytest.LogCaptureFixture
) -> None:
    template = _template(unexpected=False, missing=False)
    with caplog.at_level(logging.WARNING, logger="tessera"):
        result = tessera.load(stored, template, strict=mode.value)  # the string form works too
    assert not [r for r in caplog.records if r.name == "tessera"]
    state = result.state_dict if isinstance(result, tessera.LoadResult) else result
    if isinstance(result, tessera.LoadResult):
        assert result.missing == frozenset() and result.unexpected == frozenset()
    assert state["b"]["y"] == 3
    assert torch.equal(state["c"], STORED["c"])


@pytest.mark.parametrize("mode", [Strict.RAISE_UNEXPECTED, Strict.RAISE_ALL, Strict.ASSUME_OK_UNEXPECTED])
def test_raise_happens_before_any_chunk_is_read_R14_4(stored: Path, mode: Strict) -> None:
    storage = recorded(stored)
    ck = tessera.open(storage)
    template = _template()
    with recording(storage) as calls, pytest.raises(tessera.KeyMismatchError):
        tessera.load(ck, template, strict=mode)
    assert [c for c in calls if "/c" in c[1]] == []
    assert torch.equal(template["a"], torch.zeros(4)), "nothing may be loaded before the raise"


def test_default_mode_is_raise_unexpected_R14_5(stored: Path) -> None:
    result = tessera.load(stored, _template(unexpected=False))  # missing keys: fine
    assert torch.equal(result["a"], STORED["a"])
    with pytest.raises(tessera.KeyMismatchError):
        tessera.load(stored, _template())


def test_keys_argument_follows_strict_modes(stored: Path) -> None:
    result = tessera.load(stored, keys=["a", "zzz"], strict=Strict.RETURN_ALL)
    assert result.unexpected == frozenset({"zzz"})
    assert result.missing == frozenset({"b/x", "b/y", "c"})
    assert list(result.state_dict) == ["a"]
    with pytest.raises(tessera.KeyMismatchError, match="zzz"):
        tessera.load(stored, keys=["a", "zzz"])
    with pytest.raises(tessera.KeyMismatchError, match="missing"):
        tessera.load(stored, keys=["a"], strict="raise_all")


def test_unknown_mode_refused(stored: Path) -> None:
    with pytest.raises(ValueError):
        tessera.load(stored, strict="strict")


# -- what may fill what (R14.6, R14.7) ------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "dest"),
    [
        ("a", torch.zeros(5)),
        ("a", torch.zeros(2, 2)),
        ("a", torch.zeros(4, dtype=torch.float64)),
        ("c", torch.zeros(2, dtype=torch.float16)),
        ("a", torch.zeros(())),
    ],
    ids=["length", "reshape", "float64", "bf16-vs-f16", "0-d"],
)
def test_shape_and_dtype_mismatch_R14_6(stored: Path, key: str, dest: torch.Tensor) -> None:
    before = dest.clone()
    with pytest.raises(tessera.TensorMismatchError) as info:
        tessera.load(stored, {key: dest}, strict=Strict.IGNORE_ALL)
    assert info.value.code == "tensor_mismatch"
    assert key in str(info.value)
    assert torch.equal(dest, before)


def test_template_tensor_over_a_value_or_subtree_R14_7(stored: Path) -> None:
    with pytest.raises(tessera.TensorMismatchError, match="b/y"):
        tessera.load(stored, {"b": {"y": torch.zeros(())}}, strict=Strict.IGNORE_ALL)
    with pytest.raises(tessera.TensorMismatchError, match="b"):
        tessera.load(stored, {"b": torch.zeros(1)}, strict=Strict.IGNORE_ALL)


def test_non_tensor_template_leaves_are_replaced_R14_7(stored: Path) -> None:
    template: dict[str, Any] = {"a": None, "b": {}, "c": "placeholder"}
    out = tessera.load(stored, template, strict=Strict.RAISE_ALL)
    assert torch.equal(out["a"], STORED["a"])
    assert set(out["b"]) == {"x", "y"} and out["b"]["y"] == 3  # {} stands for the whole subtree
    assert torch.equal(out["b"]["x"], STORED["b"]["x"])
    assert torch.equal(out["c"], STORED["c"])
