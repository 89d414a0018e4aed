"""Keys and paths (spec §4): the one reversible mapping, and what it refuses."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import tessera
import torch
from tessera.errors import InvalidKeyError
from tessera.format.keys import MAX_SEGMENT_BYTES, key_to_path, path_to_key

# The examples table of §4, key -> path.
SPEC_EXAMPLES = [
    (("model", "embed.weight"), "model/embed.weight"),
    (("optimizer", "state", 0, "exp_avg"), "optimizer/state/~0/exp_avg"),
    (("layers", -1), "layers/~-1"),
    (("a b", "ü"), "a%20b/%C3%BC"),
    (("a/b",), "a%2Fb"),
    (("50%",), "50%25"),
    (("~0",), "%7E0"),
    ((".hidden",), "%2Ehidden"),
    (("__meta__",), "%5F_meta__"),
    (("..",), "%2E."),
    (("zarr.json",), "zarr%2Ejson"),
]


@pytest.mark.parametrize(("key", "path"), SPEC_EXAMPLES, ids=[p for _, p in SPEC_EXAMPLES])
def test_spec_examples_R4_1_to_R4_4(key: tuple, path: str) -> None:
    assert key_to_path(key) == path
    assert path_to_key(path) == key


@pytest.mark.parametrize(
    ("component", "segment"),
    [
        (0, "~0"),
        (17, "~17"),
        (-3, "~-3"),
        (2**70, f"~{2**70}"),
        ("~", "%7E"),
        ("_x", "%5Fx"),
        ("x_", "x_"),
        (".x", "%2Ex"),
        ("x.", "x."),
        ("a.b-c_D9", "a.b-c_D9"),
        ("\x00", "%00"),
        ("\\", "%5C"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ("😀", "%F0%9F%98%80"),
        (".tessera-claim.json", "%2Etessera-claim.json"),
        ("c", "c"),
    ],
)
def test_segment_encoding_R4_2_R4_3(component: str | int, segment: str) -> None:
    assert key_to_path((component,)) == segment
    assert path_to_key(segment) == (component,)


def test_int_and_string_components_never_collide_R4_2() -> None:
    assert key_to_path((0,)) != key_to_path(("0",))
    assert key_to_path(("~0",)) != key_to_path((0,))
    assert path_to_key("0") == ("0",)
    assert path_to_key("~0") == (0,)


@pytest.mark.parametrize(
    ("component", "segment"),
    [("Zarr.json", "Zarr%2Ejson"), ("ZARR.JSON", "ZARR%2EJSON"), ("zarr.JSON", "zarr%2EJSON")],
)
def test_zarr_json_escaped_ignoring_case_R4_4(component: str, segment: str) -> None:
    """R4.4: a segment equal to ``zarr.json`` ignoring ASCII case gets its ``.`` escaped,
    so that no key shadows a metadata document on a case-insensitive file system."""
    assert key_to_path((component,)) == segment
    assert path_to_key(segment) == (component,)


@pytest.mark.parametrize(
    "path",
    [
        "%61",  # escaped safe character: canonical form is "a"
        "a%2Eb",  # canonical form is "a.b"
        "%2e",  # lower-case hex
        "%2E%2E",  # canonical form of ("..",) is "%2E."
        "..",
        ".",
        "a/../b",
        "",
        "a//b",
        "a/",
        "/a",
        "~01",
        "~-0",
        "~+1",
        "~",  # raw ~ in a string
        "a b",  # raw space
        "ü",  # raw non-ASCII
        "%C3",  # truncated UTF-8
        "%FF",  # invalid UTF-8
        "%ED%A0%80",  # an encoded surrogate is not UTF-8
        "zarr.json",
        "_x",
        ".hidden",
        "a%",
        "a%2",
        "a%zz",
    ],
)
def test_non_canonical_paths_refused_R4_7(path: str) -> None:
    with pytest.raises(InvalidKeyError) as info:
        path_to_key(path)
    assert info.value.code == "bad_key"
    assert repr(path) in str(info.value)


@pytest.mark.parametrize(
    "key",
    [
        (),
        ("",),
        ("a", ""),
        (True,),
        (False,),
        (1.0,),
        (None,),
        (("a", "b"),),
        (b"a",),
    ],
    ids=repr,
)
def test_invalid_keys_refused_R4_2_R4_5(key: tuple) -> None:
    with pytest.raises(InvalidKeyError) as info:
        key_to_path(key)
    assert info.value.code == "bad_key"


def test_lone_surrogate_refused_with_bad_key_R4_3() -> None:
    """A string with no UTF-8 form has no path: bad_key, not a UnicodeEncodeError."""
    with pytest.raises(InvalidKeyError):
        key_to_path(("\ud800",))


def test_segment_length_limit_R4_6() -> None:
    assert key_to_path(("a" * MAX_SEGMENT_BYTES,)) == "a" * 255
    assert MAX_SEGMENT_BYTES == 255
    with pytest.raises(InvalidKeyError, match="255"):
        key_to_path(("a" * 256,))
    # The limit applies after escaping: 85 "ü" are 170 UTF-8 bytes, 510 escaped.
    with pytest.raises(InvalidKeyError):
        key_to_path(("ü" * 85,))
    assert key_to_path(("ü" * 42,)) == "%C3%BC" * 42  # 252 bytes
    with pytest.raises(InvalidKeyError):
        key_to_path((10**300,))
    with pytest.raises(InvalidKeyError):
        path_to_key("a" * 256)


def _random_component(rng: random.Random) -> str | int:
    if rng.random() < 0.25:
        return rng.choice([0, 1, -1, rng.randint(-(10**12), 10**12)])
    alphabet = "aZ09._-~%/ \\\x00é日😀" + "".join(chr(c) for c in range(0x20, 0x7F))
    n = rng.randint(1, 12)
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_random_keys_round_trip_and_are_canonical_R4_7() -> None:
    rng = random.Random(20261121)
    seen: dict[str, tuple] = {}
    for _ in range(3000):
        key = tuple(_random_component(rng) for _ in range(rng.randint(1, 4)))
        path = key_to_path(key)
        assert path_to_key(path) == key
        # The path is a plain relative path of safe ASCII segments (§4 consequences).
        for segment in path.split("/"):
            assert segment not in ("", ".", "..")
            assert not segment.startswith((".", "_"))
            assert set(segment) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-%~")
            assert "~" not in segment[1:]
        # Injective.
        assert seen.setdefault(path, key) == key


def test_random_mutated_paths_never_alias_R4_7() -> None:
    """Any string that decodes must be the one canonical path of its key."""
    rng = random.Random(7)
    chars = "aA0._-%~/2EF5C"
    accepted = 0
    for _ in range(5000):
        path = "".join(rng.choice(chars) for _ in range(rng.randint(1, 10)))
        try:
            key = path_to_key(path)
        except InvalidKeyError:
            continue
        accepted += 1
        assert key_to_path(key) == path
    assert accepted > 50


# -- what save does with keys ---------------------------------------------------------------


def test_save_maps_keys_to_directories_R2_3(ckpt: Path) -> None:
    state = {
        "a b": torch.ones(2),
        ".hidden": torch.ones(2),
        "zarr.json": torch.ones(2),
        "__meta__": torch.ones(2),
        "opt": {0: torch.ones(2), -1: torch.ones(2)},
        "日本": torch.ones(2),
    }
    tessera.save(state, ckpt)
    paths = [
        "a%20b",
        "%2Ehidden",
        "zarr%2Ejson",
        "%5F_meta__",
        "opt/~0",
        "opt/~-1",
        "%E6%97%A5%E6%9C%AC",
    ]
    for path in paths:
        assert (ckpt / path / "zarr.json").is_file(), path
    ck = tessera.open(ckpt)
    assert ck.keys() == paths
    loaded = tessera.load(ckpt)
    assert list(loaded) == list(state)
    assert list(loaded["opt"]) == [0, -1]


@pytest.mark.parametrize(
    "state",
    [
        {True: torch.ones(1)},
        {1.5: torch.ones(1)},
        {"": torch.ones(1)},
        {"a": {"": torch.ones(1)}},
        {("a", "b"): torch.ones(1)},
        {"a" * 256: torch.ones(1)},
        {"a": {None: torch.ones(1)}},
    ],
    ids=["bool", "float", "empty", "nested-empty", "tuple", "too-long", "none"],
)
def test_save_refuses_bad_keys_before_claiming_R4_5(ckpt: Path, state: dict) -> None:
    with pytest.raises(InvalidKeyError) as info:
        tessera.save(state, ckpt)
    assert info.value.code == "bad_key"
    assert not ckpt.exists(), "a bad key must fail before the path is claimed"


def test_save_refuses_case_insensitive_collision_R4_8(ckpt: Path) -> None:
    with pytest.raises(InvalidKeyError, match="letter case") as info:
        tessera.save({"Weight": torch.ones(1), "weight": torch.ones(1)}, ckpt)
    assert info.value.code == "bad_key"
    assert not ckpt.exists()


def test_save_refuses_case_collision_of_values_R4_8(ckpt: Path) -> None:
    with pytest.raises(InvalidKeyError):
        tessera.save({"lr": 0.1, "LR": 0.2}, ckpt)


def test_save_refuses_case_collision_of_groups_R4_8(ckpt: Path) -> None:
    """R4.8: node paths include every proper prefix: ``A/x`` and ``a/y`` collide at ``A``/``a``."""
    with pytest.raises(InvalidKeyError):
        tessera.save({"A": {"x": torch.ones(1)}, "a": {"y": torch.ones(1)}}, ckpt)


def test_case_distinct_escapes_do_not_collide(ckpt: Path) -> None:
    """Escapes are always upper case, so "%c3" (a literal) and "ä" never collide."""
    state = {"%c3": torch.ones(1), "ã": torch.zeros(1)}
    tessera.save(state, ckpt)
    assert tessera.open(ckpt).keys() == ["%25c3", "%C3%A3"]
