"""The save API (issue 16 item 4): one function per return type, one options object.

``tessera.save`` returns the committed manifest and ``tessera.save_async`` the handle (mypy
checks both, below); ``tessera.SaveOptions`` refuses wrong arguments with ``TypeError`` or
``ValueError`` when it is made; the keywords ``save`` took before it still work for one release,
each with a ``DeprecationWarning`` naming its replacement, and one given both ways is refused.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera import RunDirectory, SaveOptions, Zstd
from tessera.errors import UnsupportedLocationError
from tessera.storage.local import LocalStorage

from .conftest import ROOT, assert_tree_bit_equal, random_tensor


def _state() -> dict[str, Any]:
    return {"w": random_tensor("float32", (6, 5), seed=1), "cfg": {"lr": 0.5}}


def _chunk_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {e.path: e.layout.chunk_shape for e in tessera.open(path).manifest.entries if hasattr(e, "layout")}


# -- one return type per function -----------------------------------------------------------------


def test_save_returns_the_committed_manifest(tmp_path: Path) -> None:
    manifest = tessera.save(_state(), tmp_path / "ck", metadata={"step": 1})
    assert type(manifest) is tessera.Manifest
    assert manifest.metadata == {"step": 1}
    assert tessera.open(tmp_path / "ck").manifest.save_id == manifest.save_id


def test_save_async_returns_a_handle_to_the_same_checkpoint(tmp_path: Path) -> None:
    options = SaveOptions(chunk_bytes=24, compression=Zstd(1))
    handle = tessera.save_async(_state(), tmp_path / "async", options=options, metadata={"step": 2})
    assert type(handle) is tessera.AsyncSave and handle.location == str(tmp_path / "async")
    manifest = handle.wait()
    assert manifest.metadata == {"step": 2}
    synchronous = tessera.save(_state(), tmp_path / "sync", options=options, metadata={"step": 2})
    assert manifest.entries == synchronous.entries and manifest.lists == synchronous.lists
    assert_tree_bit_equal(tessera.load(tmp_path / "async"), _state())


def test_the_asynchronous_flag_is_gone_with_a_pointer_to_save_async(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'asynchronous'.*save_async"):
        tessera.save(_state(), tmp_path / "ck", asynchronous=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'asynchronous'.*save_async"):
        RunDirectory(tmp_path / "run").save(_state(), 1, asynchronous=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunk_byte'"):
        tessera.save(_state(), tmp_path / "ck", chunk_byte=4)  # type: ignore[call-arg]
    assert not (tmp_path / "ck").exists() and not (tmp_path / "run").exists()


def test_run_directory_save_and_save_async(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    options = SaveOptions(chunk_bytes=16)
    manifest = run.save(_state(), 1, options=options, metadata={"loss": 1.0})
    assert type(manifest) is tessera.Manifest and manifest.metadata == {"step": 1, "loss": 1.0}
    handle = run.save_async(_state(), 2, options=options)
    assert type(handle) is tessera.AsyncSave and handle.location == str(tmp_path / "run" / "step-00000002")
    assert handle.wait().metadata == {"step": 2}
    assert run.latest() == tmp_path / "run" / "step-00000002"
    assert _chunk_shapes(run.latest())["w"] == (1, 4)  # 16 bytes: the options reached the writer


_TYPED = """
from pathlib import Path
import tessera

manifest: tessera.Manifest = tessera.save({}, "a")
handle: tessera.AsyncSave = tessera.save_async({}, "b")
run = tessera.RunDirectory(Path("run"))
step: tessera.Manifest = run.save({}, 1, options=tessera.SaveOptions(chunk_bytes=16))
later: tessera.AsyncSave = run.save_async({}, 2)
old: tessera.Manifest = tessera.save({}, "c", chunk_bytes=16, compression="zstd")
"""


def test_mypy_knows_each_return_type(tmp_path: Path) -> None:
    """One return type per function, so that typed code needs no ``isinstance`` or ``cast``; a
    handle taken for a manifest, or a deprecated keyword of the wrong type, is a type error."""
    api = pytest.importorskip("mypy.api")
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(_TYPED)
    bad.write_text(
        textwrap.dedent(
            """
            import tessera
            wrong: tessera.AsyncSave = tessera.save({}, "a")
            level: tessera.Manifest = tessera.save({}, "b", zstd_level="high")
            """
        )
    )
    config = tmp_path / "mypy.ini"
    # tessera's own modules are checked, the libraries below them skipped: torch alone takes a minute.
    skipped = "".join(f"[mypy-{lib}.*]\nfollow_imports = skip\n" for lib in ("torch", "numpy", "numcodecs"))
    skipped += "[mypy-tessera.*]\nignore_errors = True\n"  # checked on its own, with those libraries
    config.write_text(f"[mypy]\nmypy_path = {ROOT / 'refimpl'}\nignore_missing_imports = True\n{skipped}")
    flags = ["--no-incremental", "--config-file", str(config), "--python-version", "3.11"]
    out, err, status = api.run([*flags, str(good)])
    assert status == 0, out + err
    out, _, status = api.run([*flags, str(bad)])
    assert status == 1
    assert 'Incompatible types in assignment (expression has type "Manifest"' in out
    assert 'bad.py:4: error: Argument "zstd_level" to "save" has incompatible type "str"' in out


# -- SaveOptions ------------------------------------------------------------------------------------


def test_save_options_is_frozen_and_keeps_copies() -> None:
    shapes = {"w": [2, 3]}
    keys = ["a", "b"]
    options = SaveOptions(chunk_shapes=shapes, pickle_keys=keys)
    shapes["w"].append(4)
    keys.append("c")
    assert options.chunk_shapes == {"w": (2, 3)} and options.pickle_keys == frozenset({"a", "b"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.chunk_bytes = 5  # type: ignore[misc]
    assert SaveOptions() == SaveOptions(chunk_bytes=64 * 2**20, compression=None, threads=None)
    assert hash(SaveOptions(compression=Zstd(3))) == hash(SaveOptions(compression=Zstd()))


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: SaveOptions(chunk_bytes=0), ValueError, r"chunk_bytes=0.*at least 1 byte"),
        (lambda: SaveOptions(chunk_bytes=2.5), TypeError, r"chunk_bytes=.*int"),
        (lambda: SaveOptions(chunk_bytes=True), TypeError, r"chunk_bytes=.*int"),
        (lambda: SaveOptions(compression="zstd"), TypeError, r"tessera.Zstd\(level=...\) or None"),
        (lambda: Zstd(level=23), ValueError, r"levels run from -131072 to 22"),
        (lambda: Zstd(level="3"), TypeError, r"takes an int"),
        (lambda: SaveOptions(threads=0), ValueError, r"threads=0.*at least 1"),
        (lambda: SaveOptions(threads="4"), TypeError, r"threads=.*int or None"),
        (lambda: SaveOptions(chunk_shapes=[("w", (2,))]), TypeError, r"mapping of path to shape"),
        (lambda: SaveOptions(chunk_shapes={"w": "23"}), TypeError, r"'w' is a sequence of ints"),
        (lambda: SaveOptions(chunk_shapes={"w": [2, 0]}), ValueError, r"'w' must be >= 1.*\[2, 0\]"),
        (lambda: SaveOptions(chunk_shapes={1: [2]}), TypeError, r"a path is a str, got 1"),
        (lambda: SaveOptions(pickle_keys="obj"), TypeError, r"collection of paths, e.g. \['obj'\]"),
        (lambda: SaveOptions(pickle_keys=[b"obj"]), TypeError, r"a path is a str"),
    ],
)
def test_save_options_refuses_wrong_arguments_when_made(
    make: Any, error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern) as raised:
        make()
    assert not isinstance(raised.value, tessera.TesseraError)  # an argument error, not a format error


def test_options_that_are_not_save_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"save\(options=...\) takes a tessera.SaveOptions, got dict"):
        tessera.save(_state(), tmp_path / "ck", options={"chunk_bytes": 16})  # type: ignore[arg-type]
    assert not (tmp_path / "ck").exists()


def test_every_option_reaches_the_checkpoint(tmp_path: Path) -> None:
    state = {**_state(), "obj": {1, 2}}
    options = SaveOptions(
        chunk_bytes=24, compression=Zstd(7), threads=1, chunk_shapes={"w": [4, 4]}, pickle_keys=["obj"]
    )
    manifest = tessera.save(state, tmp_path / "ck", options=options)
    layouts = {e.path: e.layout for e in manifest.entries if hasattr(e, "layout")}
    assert layouts["w"].chunk_shape == (4, 4) and layouts["w"].zstd_level == 7
    assert layouts["obj"].zstd_level == 7
    assert tessera.load(tmp_path / "ck", allow_pickle=True)["obj"] == {1, 2}


# -- the deprecated keywords -------------------------------------------------------------------------

_ALIASES = [
    ({"chunk_bytes": 24}, SaveOptions(chunk_bytes=24), "SaveOptions(chunk_bytes=...)"),
    (
        {"compression": "zstd"},
        SaveOptions(compression=Zstd()),
        "SaveOptions(compression=tessera.Zstd(level))",
    ),
    (
        {"compression": "zstd", "zstd_level": 9},
        SaveOptions(compression=Zstd(9)),
        "SaveOptions(compression=tessera.Zstd(level))",
    ),
    ({"threads": 1}, SaveOptions(threads=1), "SaveOptions(threads=...)"),
    (
        {"chunk_shapes": {"w": [3, 2]}},
        SaveOptions(chunk_shapes={"w": [3, 2]}),
        "SaveOptions(chunk_shapes=...)",
    ),
    ({"pickle_keys": ["obj"]}, SaveOptions(pickle_keys=["obj"]), "SaveOptions(pickle_keys=...)"),
]


@pytest.mark.parametrize(("old", "new", "replacement"), _ALIASES)
def test_each_deprecated_keyword_warns_and_still_works(
    tmp_path: Path, old: dict[str, Any], new: SaveOptions, replacement: str
) -> None:
    state = {**_state(), "obj": {3}} if "pickle_keys" in old else _state()
    pattern = (
        rf"^save\({next(iter(old))}=...\) is deprecated.*; pass options=tessera\.{re.escape(replacement)}$"
    )
    with pytest.warns(DeprecationWarning) as caught:  # zstd_level comes with compression: two warnings
        before = tessera.save(state, tmp_path / "old", **old)
    assert any(re.match(pattern, str(w.message)) for w in caught), [str(w.message) for w in caught]
    after = tessera.save(state, tmp_path / "new", options=new)
    assert before.entries == after.entries
    old_state = tessera.load(tmp_path / "old", allow_pickle=True)
    assert_tree_bit_equal(old_state, tessera.load(tmp_path / "new", allow_pickle=True))


def test_a_deprecated_keyword_warns_at_the_callers_line(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tessera.save(_state(), tmp_path / "a", chunk_bytes=24)
        tessera.save_async(_state(), tmp_path / "b", chunk_bytes=24).wait()
        RunDirectory(tmp_path / "run").save(_state(), 1, chunk_bytes=24)
        RunDirectory(tmp_path / "run").save_async(_state(), 2, chunk_bytes=24).wait()
        with tessera.AsyncSaver() as saver:
            saver.save(_state(), tmp_path / "c", chunk_bytes=24).wait()
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 5
    assert {Path(w.filename).name for w in deprecations} == {Path(__file__).name}
    assert all(_chunk_shapes(tmp_path / name)["w"] == (1, 5) for name in "abc")  # 24 bytes: a row


def test_the_deprecated_keywords_work_for_every_entry_point(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning) as caught:
        handle = tessera.save_async(_state(), tmp_path / "a", compression="zstd", zstd_level=2)
    assert sorted(str(w.message).split("=")[0] for w in caught) == [
        "save_async(compression",
        "save_async(zstd_level",
    ]
    assert {e.layout.zstd_level for e in handle.wait().entries if hasattr(e, "layout")} == {2}
    with pytest.warns(DeprecationWarning, match=r"RunDirectory.save\(pickle_keys=...\)"):
        RunDirectory(tmp_path / "run").save({"obj": {5}}, 1, pickle_keys=["obj"])
    assert tessera.load(tmp_path / "run" / "step-00000001", allow_pickle=True)["obj"] == {5}


@pytest.mark.parametrize("old", [{"chunk_bytes": 16}, {"compression": "zstd"}, {"zstd_level": 5}])
def test_a_setting_given_both_ways_is_refused(tmp_path: Path, old: dict[str, Any]) -> None:
    name = next(iter(old))
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(TypeError, match=rf"{name} both as a keyword and in options="),
    ):
        tessera.save(_state(), tmp_path / "ck", options=SaveOptions(), **old)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="both"):
        tessera.save_async(_state(), tmp_path / "ck", options=SaveOptions(chunk_bytes=16), **old)
    assert not (tmp_path / "ck").exists()


def test_wrong_values_of_deprecated_keywords_are_argument_errors(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="None or 'zstd'"):
        tessera.save(_state(), tmp_path / "ck", compression="lz4")  # type: ignore[arg-type]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="chunk_bytes=-1"):
        tessera.save(_state(), tmp_path / "ck", chunk_bytes=-1)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="gpu_direct=...\\) takes a bool"):
        tessera.save(_state(), tmp_path / "ck", gpu_direct="yes")  # type: ignore[typeddict-item]
    assert not (tmp_path / "ck").exists()


def test_gpu_direct_false_is_the_default_storage(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="gpu_direct_storage"):
        tessera.save({"w": torch.ones(3)}, tmp_path / "ck", gpu_direct=False)
    assert tessera.verify(tmp_path / "ck").ok


def test_save_async_resolves_its_location_at_the_call(tmp_path: Path) -> None:
    """A handle prints where it saves for any storage; a location no storage supports is refused
    by the call itself, before the state is copied or anything is written."""
    handle = tessera.save_async(_state(), LocalStorage(tmp_path / "ck"))
    assert handle.location == str(tmp_path / "ck")
    handle.wait()
    with pytest.raises(UnsupportedLocationError, match="weird"):
        tessera.save_async(_state(), "weird://bucket/x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and not Path("weird:").exists()
