"""tessera.RNGState: every generator of every rank saved without pickle and restored exactly.

"Exactly" is checked by behaviour: the draws after a load equal the draws an uninterrupted run
makes after the save. Real gloo ranks (``tests/ranks.py``) save at 4 ranks and resume at 4 and
at 2, and a 2-rank save resumes at 4 (the new ranks get a derived state and a warning).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch
from tessera import KeyMismatchError, RNGState, ShardedObject, TensorMismatchError, TesseraWarning
from tessera.format.manifest import ObjectEntry, TensorEntry, ValueEntry

from .ranks import run_ranks

Generators = dict[str, Any]


def _generators(seed: int) -> Generators:
    """One of each bit generator kind: 128-bit integers (PCG64), arrays and a buffer (Philox),
    a 624-word key (MT19937), a bare BitGenerator (SFC64)."""
    return {
        "pcg": np.random.default_rng(seed),
        "philox": np.random.Generator(np.random.Philox(seed + 1)),
        "mt": np.random.Generator(np.random.MT19937(seed + 2)),
        "sfc": np.random.SFC64(seed + 3),
    }


def _seed_and_warm(seed: int, gens: Generators) -> None:
    """Seed the global generators and move every generator off its seeded state, leaving the
    cached Gaussians (Python's ``gauss_next``, NumPy's ``has_gauss``) and Philox's buffer in use."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    torch.rand(5)
    gens["pcg"].random(3)
    gens["philox"].integers(0, 2**32, 3, dtype=np.uint32)  # 32-bit draws keep a half-used buffer
    gens["mt"].random(3)
    np.random.Generator(gens["sfc"]).random(3)


def _draws(gens: Generators) -> list[float]:
    """The next values of every generator (Gaussians first, which use the cached halves)."""
    out = [random.gauss(0.0, 1.0), random.random(), float(np.random.standard_normal()), np.random.random()]
    out += [float(gens["pcg"].random()), float(gens["philox"].random()), float(gens["mt"].random())]
    out += [float(np.random.Generator(gens["sfc"]).random())]
    return out + torch.rand(4).tolist()


def _scramble(gens: Generators) -> None:
    _seed_and_warm(12345, gens)
    for name in ("pcg", "philox", "mt"):
        gens[name].random(7)


def _assert_no_pickle(path: Path) -> None:
    """Every entry is a tensor or a JSON value: no pickled object anywhere in the manifest."""
    manifest = tessera.open(path).manifest
    for entry in manifest.entries:
        assert not isinstance(entry, ObjectEntry), entry.key
        assert isinstance(entry, TensorEntry) or (isinstance(entry, ValueEntry) and entry.encoding == "json")


@pytest.mark.parametrize("form", ["whole grid", "template"])
def test_every_generator_continues_as_if_never_interrupted(tmp_path: Path, form: str) -> None:
    """Saved, scrambled and loaded back (without a template, or with state_dict() as the template),
    every generator's next draws equal those of the uninterrupted run."""
    gens = _generators(7)
    _seed_and_warm(7, gens)
    rng = RNGState(gens)
    tessera.save({"rng": rng.state_dict(), "step": 3}, tmp_path / "ck")
    expected = _draws(gens)
    _scramble(gens)
    assert _draws(gens) != expected
    _scramble(gens)
    if form == "whole grid":
        loaded = tessera.load(tmp_path / "ck")["rng"]
    else:
        loaded = tessera.load(tmp_path / "ck", {"rng": rng.state_dict()})["rng"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same world size: nothing to warn about
        rng.load_state_dict(loaded)
    assert _draws(gens) == expected
    _assert_no_pickle(tmp_path / "ck")


def test_states_are_stored_as_tensors_and_plain_json(tmp_path: Path) -> None:
    """A reader with no Tessera code gets the states back: torch's as uint8, NumPy's keys as
    uint32 arrays, PCG64's 128-bit integers as exact decimal strings, Python's as a JSON object."""
    gens = _generators(1)
    _seed_and_warm(1, gens)
    tessera.save({"rng": RNGState(gens).state_dict()}, tmp_path / "ck")
    stored = tessera.load(tmp_path / "ck")["rng"]
    assert torch.equal(stored["torch"][0], torch.get_rng_state())
    assert stored["numpy"]["state"]["key"][0].dtype == np.uint32
    assert np.array_equal(stored["numpy"]["state"]["key"][0], np.random.get_state()[1])
    pcg = gens["pcg"].bit_generator.state
    assert stored["generators"]["pcg"][0]["state"] == {k: str(v) for k, v in pcg["state"].items()}
    version, internal, gauss = random.getstate()
    assert stored["python"][0] == {"version": version, "state": list(internal), "gauss": gauss}
    _assert_no_pickle(tmp_path / "ck")


def test_a_mismatch_is_refused_before_any_generator_changes(tmp_path: Path) -> None:
    """Other generator names, or another bit generator under the same name: one clear error,
    and every generator keeps its state."""
    gens = _generators(3)
    _seed_and_warm(3, gens)
    tessera.save({"rng": RNGState(gens).state_dict()}, tmp_path / "ck")
    loaded = tessera.load(tmp_path / "ck")["rng"]
    _scramble(gens)
    before = random.getstate(), torch.get_rng_state(), gens["pcg"].bit_generator.state

    renamed = {("data" if k == "pcg" else k): v for k, v in gens.items()}
    with pytest.raises(KeyMismatchError, match=r"only here: \['data'\], only in the checkpoint: \['pcg'\]"):
        RNGState(renamed).load_state_dict(loaded)
    other_kind = {**gens, "pcg": np.random.Generator(np.random.Philox(0))}
    refused = "rng/generators/pcg: the checkpoint holds a PCG64 state, this run's generator is a Philox"
    with pytest.raises(TensorMismatchError, match=refused):
        RNGState(other_kind).load_state_dict(loaded)
    with pytest.raises(KeyMismatchError, match=r"^rng: .* only in the checkpoint: \['generators'\]"):
        RNGState().load_state_dict(loaded)
    assert (random.getstate(), gens["pcg"].bit_generator.state) == (before[0], before[2])
    assert torch.equal(torch.get_rng_state(), before[1])


def test_generators_must_be_numpy_generators() -> None:
    with pytest.raises(TypeError, match=r"generators\['x'\] is a Random"):
        RNGState({"x": random.Random(0)})  # type: ignore[dict-item]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without CUDA")
def test_cuda_states_without_cuda_are_reported_not_restored(tmp_path: Path) -> None:
    """A checkpoint saved with CUDA, loaded where there is none: the other generators are
    restored, and a TesseraWarning says the CUDA states were not."""
    gens = _generators(5)
    _seed_and_warm(5, gens)
    state = RNGState(gens).state_dict()
    state["cuda"] = ShardedObject(torch.zeros((2, 16), dtype=torch.uint8), (1,), (0,))
    tessera.save({"rng": state}, tmp_path / "ck")
    expected = _draws(gens)
    _scramble(gens)
    with pytest.warns(TesseraWarning, match="CUDA generator states but CUDA is not available or not init"):
        RNGState(gens).load_state_dict(tessera.load(tmp_path / "ck")["rng"])
    assert _draws(gens) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generators_continue(tmp_path: Path) -> None:
    torch.cuda.init()
    torch.cuda.manual_seed_all(11)
    torch.rand(3, device="cuda")
    rng = RNGState()
    tessera.save({"rng": rng.state_dict()}, tmp_path / "ck")
    expected = [torch.rand(4, device=f"cuda:{d}").cpu() for d in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(99)
    rng.load_state_dict(tessera.load(tmp_path / "ck")["rng"])
    for d, want in enumerate(expected):
        assert torch.equal(torch.rand(4, device=f"cuda:{d}").cpu(), want)


# Ranks: each rank seeds its generators from its rank, so every rank's draws differ.


def _save_at(rank: int, world_size: int, path: Path) -> tuple[list[float], list[float]]:
    """Save every rank's generators; the draws that follow, and the draws after a reload."""
    gens = _generators(100 + rank)
    _seed_and_warm(100 + rank, gens)
    rng = RNGState(gens)
    tessera.save({"rng": rng.state_dict()}, path)
    expected = _draws(gens)
    _scramble(gens)
    rng.load_state_dict(tessera.load(path)["rng"])
    return expected, _draws(gens)


def _resume_at(rank: int, world_size: int, path: Path) -> tuple[list[float], list[float], list[str]]:
    """Load twice into scrambled generators: the draws after each load, and the warnings."""
    gens = _generators(0)
    rng = RNGState(gens)
    draws = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _scramble(gens)
            rng.load_state_dict(tessera.load(path)["rng"])
            draws.append(_draws(gens))
    return draws[0], draws[1], [str(w.message) for w in caught if issubclass(w.category, TesseraWarning)]


def _template_load_at(rank: int, world_size: int, path: Path) -> str:
    """Load with state_dict() as the template: what happened on this rank."""
    rng = RNGState(_generators(0))
    try:
        rng.load_state_dict(tessera.load(path, {"rng": rng.state_dict()})["rng"])
    except KeyMismatchError as exc:
        return f"refused: {exc}"
    return "restored"


def test_four_ranks_resume_at_four_and_at_two(tmp_path: Path) -> None:
    """Saved at 4 ranks: at 4 every rank continues its own draws; at 2, ranks 0-1 continue theirs
    and rank 0 warns that ranks 2-3's states are not used."""
    saved = run_ranks(4, _save_at, tmp_path / "ck4")
    expected = [e for e, _ in saved]
    assert [restored for _, restored in saved] == expected
    assert len({tuple(e) for e in expected}) == 4
    _assert_no_pickle(tmp_path / "ck4")

    at_two = run_ranks(2, _resume_at, tmp_path / "ck4")
    assert [first for first, _, _ in at_two] == expected[:2]
    assert at_two[1][2] == []
    assert at_two[0][2] == [
        "RNGState: the checkpoint holds the RNG states of 4 ranks and this run has 2: ranks 0-1 got "
        "their own states back, the states of ranks 2-3 are not used"
    ] * 2


def test_two_ranks_resume_at_four_derive_the_new_ranks(tmp_path: Path) -> None:
    """Saved at 2 ranks, resumed at 4: ranks 0-1 continue exactly; ranks 2-3 warn and get states
    of their own, the same on every load, unlike any other rank's."""
    expected = [e for e, _ in run_ranks(2, _save_at, tmp_path / "ck2")]
    at_four = run_ranks(4, _resume_at, tmp_path / "ck2")
    assert [first for first, _, _ in at_four[:2]] == expected
    assert all(warned == [] for _, _, warned in at_four[:2])
    for rank in (2, 3):
        first, second, warned = at_four[rank]
        assert first == second  # deterministic
        assert warned == [
            f"RNGState: the checkpoint holds the RNG states of 2 ranks; rank {rank} had none, so its "
            f"generators were seeded from rank 0's saved state and rank {rank} (the same on every "
            "resume, but not the draws of an uninterrupted run)"
        ] * 2
    assert len({tuple(first) for first, _, _ in at_four}) == 4

    # Through a template, each rank reads only its own cells: ranks 2-3 have none, and are refused.
    outcomes = run_ranks(4, _template_load_at, tmp_path / "ck2")
    assert outcomes[:2] == ["restored", "restored"]
    for rank in (2, 3):
        assert outcomes[rank].endswith(f"ck2 has no key 'rng/python/~{rank}'"), outcomes[rank]
