"""Format 1.2: tuples come back as tuples on a load without a template (spec R3.8, R3.22, R8.8),
a template's container types still rule (R14.7), a damaged record of them is refused, and
1.0/1.1 checkpoints still read (as lists)."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.format.keys import Key
from tessera.format.tuples import check_positions, join_tuples, split_tuples
from tessera.planning.contents import manifest_contents
from tessera.planning.global_plan import make_global_plan
from tessera.planning.local_plan import make_local_plan
from tessera.state.flatten import flatten

from .conftest import edit_manifest, read_json

Pair = collections.namedtuple("Pair", ["a", "b"])


def _same(got: Any, want: Any, where: str = "") -> None:
    """Equal, and of the same container types all the way down (``(1,) == [1]`` is False, but
    ``{"a": (1,)} == {"a": [1]}`` hides nothing either: check the types explicitly)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            _same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{where}/{i}")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    else:
        assert got == want, where


def _manifest(path: Path) -> dict[str, Any]:
    return read_json(path / "zarr.json")["attributes"]["tessera"]


def test_random_getstate_round_trips_without_a_template(tmp_path: Path) -> None:
    random.seed(1234)
    state = random.getstate()
    tessera.save({"rng": state}, tmp_path / "ck")
    loaded = tessera.load(tmp_path / "ck")["rng"]
    _same(loaded, state)
    want = [random.random() for _ in range(5)]
    random.seed(99)
    random.setstate(loaded)  # a list here was "TypeError: state vector must be a tuple"
    assert [random.random() for _ in range(5)] == want
    entry = _manifest(tmp_path / "ck")["entries"][0]
    assert entry["tuples"] == [[], [1]] and entry["value"][0] == 3 and entry["value"][2] is None


def test_a_tuple_of_tensors_round_trips_as_a_tuple(tmp_path: Path) -> None:
    state = {
        "pair": (torch.zeros(2), (torch.ones(1), 1)),
        "list": [torch.ones(3), (torch.zeros(1),)],
        "named": Pair(torch.ones(1), 2),
    }
    tessera.save(state, tmp_path / "ck")
    manifest = _manifest(tmp_path / "ck")
    assert manifest["format_version"] == "1.2"
    assert manifest["tuples"] == [["pair"], ["pair", 1], ["list", 1], ["named"]]
    assert set(map(tuple, manifest["tuples"])) < set(map(tuple, manifest["lists"]))
    # A namedtuple is stored as a plain tuple (R3.22): without a template it comes back as one.
    _same(tessera.load(tmp_path / "ck"), state | {"named": (torch.ones(1), 2)})
    # A subtree read through a template leaf keeps its tuples too.
    _same(tessera.load(tmp_path / "ck", {"pair": None}), {"pair": state["pair"]})
    _same(tessera.load(tmp_path / "ck", {"list": {}})["list"], state["list"])


def test_nested_tuples_inside_lists_inside_dicts_in_one_json_value(tmp_path: Path) -> None:
    value = {
        "a": [(1, (2, "x")), [3, (4,)], {"t": ((), [()])}],
        "e": (),
        "0": ({"k": (None, True)},),
        "l": [[1], [2.5]],
    }
    tessera.save({"cfg": value, "top": (1, 2)}, tmp_path / "ck")
    entries = {tuple(e["key"]): e for e in _manifest(tmp_path / "ck")["entries"]}
    assert entries[("cfg",)]["tuples"] == [
        ["a", 0], ["a", 0, 1], ["a", 1, 1], ["a", 2, "t"], ["a", 2, "t", 0], ["a", 2, "t", 1, 0],
        ["e"], ["0"], ["0", 0, "k"],
    ]  # fmt: skip
    assert entries[("top",)]["tuples"] == [[]]
    _same(tessera.load(tmp_path / "ck"), {"cfg": value, "top": (1, 2)})
    _same(tessera.load(tmp_path / "ck", keys=["cfg"])["cfg"], value)
    with tessera.open(tmp_path / "ck") as ckpt:
        _same(ckpt.value("cfg"), value)


def test_a_value_without_tuples_has_no_tuples_member(tmp_path: Path) -> None:
    tessera.save({"cfg": {"a": [1, [2]]}, "w": torch.ones(1)}, tmp_path / "ck")
    manifest = _manifest(tmp_path / "ck")
    assert manifest["tuples"] == [] and all("tuples" not in e for e in manifest["entries"])


def test_optimizer_state_dict_without_a_template_has_betas_as_a_tuple(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    tessera.save({"optimizer": opt.state_dict()}, tmp_path / "ck")
    loaded = tessera.load(tmp_path / "ck")["optimizer"]
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.95)
    assert type(loaded["param_groups"][0]["betas"]) is tuple
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95) and fresh.param_groups[0]["lr"] == 0.01
    fresh.step()


def test_a_template_s_container_types_rule(tmp_path: Path) -> None:
    tessera.save({"v": (1, [2, 3]), "w": [torch.ones(1), torch.zeros(1)], "n": (5, 6)}, tmp_path / "ck")
    template = {"v": [0, (0, 0)], "w": (torch.empty(1), torch.empty(1)), "n": Pair(0, 0)}
    loaded = tessera.load(tmp_path / "ck", template)
    _same(loaded["v"], [1, (2, 3)])
    _same(loaded["w"], (torch.ones(1), torch.zeros(1)))
    assert loaded["n"] == Pair(5, 6) and type(loaded["n"]) is Pair


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    tessera.save(
        {"rng": random.getstate(), "pair": (torch.ones(1), torch.zeros(1)), "d": {0: torch.ones(1)}}, path
    )
    return path


@pytest.mark.parametrize(
    ("damage", "error", "words"),
    [
        (lambda m: m["tuples"].append(["d"]), tessera.InconsistentCheckpointError, "lists does not name"),
        (lambda m: m["tuples"].append(["nope"]), tessera.InconsistentCheckpointError, "lists does not name"),
        (lambda m: m["tuples"].append(["pair"]), tessera.SchemaViolationError, "non-unique"),
        (lambda m: m.pop("tuples"), tessera.SchemaViolationError, "'tuples' is a required property"),
        (
            lambda m: m["entries"][0]["tuples"].append([0]),
            tessera.InconsistentCheckpointError,
            "not an array",
        ),
        (
            lambda m: m["entries"][0]["tuples"].append([7]),
            tessera.InconsistentCheckpointError,
            "no element 7",
        ),
        (lambda m: m["entries"][0]["tuples"].append(["x"]), tessera.InconsistentCheckpointError, "no member"),
        (lambda m: m["entries"][0]["tuples"].append([1]), tessera.SchemaViolationError, "non-unique"),
        (lambda m: m["entries"][0]["tuples"].clear(), tessera.SchemaViolationError, "should be non-empty"),
        (lambda m: m["entries"][0]["tuples"].append([-1]), tessera.SchemaViolationError, "minimum"),
    ],
)
def test_a_damaged_tuples_member_is_refused(tmp_path: Path, damage: Any, error: type, words: str) -> None:
    path = _saved(tmp_path)
    edit_manifest(path, damage)
    with pytest.raises(error, match=words):
        tessera.load(path)
    with pytest.raises(error):
        tessera.open(path)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_older_checkpoints_still_read_with_lists(tmp_path: Path, version: str) -> None:
    """A 1.1 checkpoint has no tuples members (a 1.0 one neither chunk lists nor digest, which a
    reader does not need): it reads as before, lists for tuples."""
    path = _saved(tmp_path)

    def as_older(m: dict[str, Any]) -> None:
        m["format_version"] = version
        del m["tuples"]
        for entry in m["entries"]:
            entry.pop("tuples", None)

    edit_manifest(path, as_older)
    loaded = tessera.load(path)
    assert type(loaded["rng"]) is list and type(loaded["rng"][1]) is list
    assert type(loaded["pair"]) is list
    random.setstate(tessera.load(path, {"rng": random.getstate()})["rng"])  # a template still rules


def test_ranks_holding_a_tuple_and_a_list_at_one_value_differ() -> None:
    """R16.6: a replicated value is equal on every rank, tuples included; walked tuples are the
    union of the ranks' (R16.8)."""
    options = tessera.SaveOptions()
    plans = [make_local_plan(flatten(s), options) for s in ({"v": (1, 2)}, {"v": [1, 2]})]
    plan = make_global_plan([p.arrays for p in plans], options)
    with pytest.raises(tessera.ShardingError, match="hold different values"):
        manifest_contents(
            plan, *([getattr(p, f) for p in plans] for f in ("values", "order", "lists", "tuples"))
        )
    states = [{"t": (torch.ones(1),), "v": (1,)}, {"u": [torch.ones(1)], "v": (1,)}]
    plans = [make_local_plan(flatten(s), options) for s in states]
    plan = make_global_plan([p.arrays for p in plans], options)
    _, lists, tuples = manifest_contents(
        plan, *([getattr(p, f) for p in plans] for f in ("values", "order", "lists", "tuples"))
    )
    want: tuple[Key, ...] = (("t",),)
    assert lists == (("t",), ("u",)) and tuples == want


def test_the_conformance_harness_fails_a_reader_that_drops_the_tuples(tmp_path: Path) -> None:
    """valid/tuples: a reader that gives the values back without their tuple positions (a 1.1
    reader's answer) is a finding citing R3.22; the exact answer is none."""
    from conformance.cases.reading import _judge_results
    from conformance.generator.build import VECTORS_DIR

    vector = VECTORS_DIR / "valid" / "tuples"
    want = json.loads((vector / "vector.json").read_text(encoding="utf-8"))["probes"][0]["expect"]["results"]
    values = [r for r in want if r["kind"] == "value"]
    assert any("tuples" in r for r in values)
    assert _judge_results({"ok": True, "results": values}, values, vector, tmp_path, "R8.8") == []
    dropped = [{k: v for k, v in r.items() if k != "tuples"} for r in values]
    findings = _judge_results({"ok": True, "results": dropped}, values, vector, tmp_path, "R8.8")
    assert findings and {f.rule for f in findings} == {"R3.22"}


_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
_SCALARS = st.none() | st.booleans() | st.integers() | _FLOATS | st.text()
_TREES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_TREES)
def test_split_and_join_give_back_every_tuple(value: Any) -> None:
    """R3.22 on any JSON subtree: the spelled value holds no tuple, its positions are unique and
    each leads to an array, and joining gives back the value with every container's type."""
    spelled, positions = split_tuples(value)
    assert not _holds_a_tuple(spelled)
    assert len(set(positions)) == len(positions)
    check_positions(spelled, positions, "value")
    _same(join_tuples(spelled, positions), value)


def _holds_a_tuple(node: Any) -> bool:
    if isinstance(node, tuple):
        return True
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return any(_holds_a_tuple(c) for c in children)
