"""Run directories (§10): one checkpoint per step, a ``latest`` pointer, retention."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera import RunDirectory
from tessera.storage.base import Storage
from tessera.storage.local import LocalStorage
from tessera.testing import FaultyStorage, RecordingStorage

from .conftest import assert_tree_bit_equal
from .syscalls import traced_syscalls


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.full((3,), float(step)), "step": step}


def _steps(run: RunDirectory) -> list[int]:
    return [c.step for c in run.checkpoints()]


def test_names_and_latest_R10_1_R10_2(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    assert run.latest() is None  # R10.4: no latest yet, no committed checkpoint
    assert run.checkpoints() == []
    for step in (0, 100, 123456789):
        manifest = run.save(_state(step), step=step, metadata={"tokens": step * 10})
        assert manifest.metadata == {"step": step, "tokens": step * 10}
    assert sorted(os.listdir(tmp_path / "run")) == [
        "latest",
        "step-00000000",
        "step-00000100",
        "step-123456789",
    ]
    assert (tmp_path / "run" / "latest").read_text(encoding="utf-8") == "step-123456789\n"
    assert run.latest() == tmp_path / "run" / "step-123456789"
    assert_tree_bit_equal(tessera.load(run.latest()), _state(123456789))
    assert tessera.open(tmp_path / "run" / "step-00000100").metadata == {"step": 100, "tokens": 1000}
    assert _steps(run) == [0, 100, 123456789]
    assert [c.latest for c in run.checkpoints()] == [False, False, True]


def test_latest_moves_only_after_the_commit_R10_3(tmp_path: Path) -> None:
    storage = RecordingStorage(LocalStorage(tmp_path / "run"))
    run = RunDirectory(storage)
    run.save(_state(1), step=1)
    run.save(_state(2), step=2)
    steps = [
        (c.op, c.location.rsplit("/", 1)[-1], c.data) for c in storage.ops("publish_root", "replace_file")
    ]
    assert [(op, where) for op, where, _ in steps] == [
        ("publish_root", "step-00000001"),
        ("replace_file", "run"),
        ("publish_root", "step-00000002"),
        ("replace_file", "run"),
    ]
    assert [data for op, _, data in steps if op == "replace_file"] == [b"step-00000001\n", b"step-00000002\n"]
    assert RunDirectory(tmp_path / "run").latest() == tmp_path / "run" / "step-00000002"
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".")], "temporary pointer left behind"


def test_saving_an_existing_step_leaves_latest_alone_R9_6(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.save(_state(5), step=5)
    run.save(_state(6), step=6)
    with pytest.raises(tessera.CheckpointExistsError):
        run.save(_state(7), step=5)
    assert run.latest() == tmp_path / "run" / "step-00000006"
    assert_tree_bit_equal(tessera.load(tmp_path / "run" / "step-00000005"), _state(5))


@pytest.mark.parametrize(
    ("keep_last", "keep_every", "kept"),
    [
        (2, None, [4, 5]),
        (1, None, [5]),
        (10, None, [1, 2, 3, 4, 5]),
        (1, 2, [2, 4, 5]),
        (2, 3, [3, 4, 5]),
        (None, None, [1, 2, 3, 4, 5]),
    ],
)
def test_retention_R10_6(
    tmp_path: Path, keep_last: int | None, keep_every: int | None, kept: list[int]
) -> None:
    run = RunDirectory(tmp_path / "run", keep_last=keep_last, keep_every=keep_every)
    for step in range(1, 6):
        run.save(_state(step), step=step)
    assert _steps(run) == kept
    for step in kept:
        assert_tree_bit_equal(tessera.load(tmp_path / "run" / run.name_of(step)), _state(step))


def test_retention_never_deletes_uncommitted_or_latest_R10_6(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run", keep_last=1)
    run.save(_state(1), step=1)
    # An uncommitted checkpoint made by a plain save (maybe live, on another node): claimed,
    # no root, no run-directory lock file. Retention never deletes it, even below latest.
    foreign = tmp_path / "run" / "step-00000002"
    foreign.mkdir()
    (foreign / ".tessera-claim.json").write_text("{}")
    assert [(c.step, c.committed) for c in run.checkpoints()] == [(1, True), (2, False)]
    run.save(_state(3), step=3)
    run.save(_state(4), step=4)
    assert [(c.step, c.committed) for c in run.checkpoints()] == [(2, False), (4, True)]
    # latest names an older step: it is kept although it is not among the last N.
    (tmp_path / "run" / "latest").write_text("step-00000000\n")
    tessera.save(_state(0), tmp_path / "run" / "step-00000000")
    assert run.latest() == tmp_path / "run" / "step-00000000"
    assert [(c.step, c.committed, c.latest) for c in run.checkpoints()] == [
        (0, True, True),
        (2, False, False),
        (4, True, False),
    ]
    assert run.apply_retention() == []


def test_retention_deletes_the_root_first_R10_6(tmp_path: Path) -> None:
    """A deletion cut short leaves an uncommitted checkpoint, never a committed one with holes;
    the save that committed still succeeds (a warning), and a later retention finishes the job."""
    RunDirectory(tmp_path / "run").save(_state(1), step=1)

    def root_gone(inner: Storage, path: str) -> None:  # as far as a deletion gets, root first
        (Path(inner.location) / path / "zarr.json").unlink()

    failing = RunDirectory(FaultyStorage(LocalStorage(tmp_path / "run")).fail_remove(root_gone), keep_last=1)
    with pytest.warns(tessera.TesseraWarning, match="step-00000002 is committed, but retention failed"):
        manifest = failing.save(_state(2), step=2)
    assert manifest.metadata == {"step": 2}
    run = RunDirectory(tmp_path / "run", keep_last=1)
    assert run.latest() == tmp_path / "run" / "step-00000002"
    with pytest.raises(tessera.UncommittedCheckpointError):
        tessera.load(tmp_path / "run" / "step-00000001")
    assert [(c.step, c.committed) for c in run.checkpoints()] == [(1, False), (2, True)]
    # The interrupted deletion left its lock file: a later retention removes the leftover (R10.10).
    assert (tmp_path / "run" / ".step-00000001.lock").exists()
    assert run.apply_retention() == ["step-00000001"]
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000002"]


def test_latest_naming_an_uncommitted_checkpoint_R10_4(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.save(_state(1), step=1)
    (tmp_path / "run" / "step-00000001" / "zarr.json").unlink()
    with pytest.raises(tessera.UncommittedCheckpointError, match="step-00000001") as info:
        run.latest()
    assert info.value.code == "uncommitted"
    (tmp_path / "run" / "latest").write_text("step-00000009\n")
    with pytest.raises(tessera.UncommittedCheckpointError, match="step-00000009"):
        run.latest()


@pytest.mark.parametrize(
    "content",
    [
        "../step-00000001\n",
        "/etc\n",
        "a/b\n",
        "\n",
        "",
        "step-00000001\nstep-00000002\n",
        ".\n",
        "..\n",
        "step 1\n",
        "step-00000001\x00\n",
    ],
    ids=repr,
)
def test_malformed_latest_R10_2(tmp_path: Path, content: str) -> None:
    run = RunDirectory(tmp_path / "run")
    run.save(_state(1), step=1)
    (tmp_path / "run" / "latest").write_text(content, encoding="utf-8")
    with pytest.raises(tessera.InvalidKeyError) as info:
        run.latest()
    assert info.value.code == "bad_key"


@pytest.mark.parametrize("content", ["step-00000001", "step-00000001\n", "  step-00000001 \r\n"], ids=repr)
def test_latest_whitespace_is_stripped_R10_2(tmp_path: Path, content: str) -> None:
    run = RunDirectory(tmp_path / "run")
    run.save(_state(1), step=1)
    (tmp_path / "run" / "latest").write_text(content, encoding="utf-8")
    assert run.latest() == tmp_path / "run" / "step-00000001"


def test_listing_skips_foreign_names_R10_5(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run", keep_last=1)
    run.save(_state(1), step=1)
    root = tmp_path / "run"
    (root / ".step-00000005").mkdir()
    (root / "notes").mkdir()
    (root / "step-5").mkdir()  # fewer than 8 digits
    (root / "step-00000006").write_text("a file, not a checkpoint")
    tessera.save(_state(9), root / "checkpoint-final")  # committed, but not a step name
    with pytest.warns(tessera.TesseraWarning, match="step-00000006 is not a directory; skipped"):
        assert [c.name for c in run.checkpoints()] == ["step-00000001"]
    with pytest.warns(tessera.TesseraWarning, match="step-00000006"):
        run.save(_state(2), step=2)
        assert _steps(run) == [2]
    for name in (".step-00000005", "notes", "step-5", "step-00000006", "checkpoint-final"):
        assert (root / name).exists(), f"retention touched {name}"


def test_keep_last_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RunDirectory(tmp_path, keep_last=0)


def test_latest_is_replaced_durably_R10_3(tmp_path: Path) -> None:
    """Temporary dot-file, fsync, rename over ``latest``, fsync of the run directory, in that order:
    the system calls of a real save, traced."""
    run = str(tmp_path / "run")
    calls = traced_syscalls(
        f"import tessera, torch; tessera.RunDirectory({run!r}).save({{'w': torch.ones(2)}}, step=1)"
    )
    log = []
    for c in calls:
        if c.name == "fsync" and c.fd_path is not None and c.fd_path.startswith(run):
            log.append(("fsync", c.fd_path))
        elif c.name.startswith("rename") and c.ok:
            log.append(("rename", " -> ".join(os.path.basename(p) for p in c.strings())))
    renames = [i for i, (kind, _) in enumerate(log) if kind == "rename"]
    assert len(renames) == 1, log
    source, target = log[renames[0]][1].split(" -> ")
    assert source.startswith(".latest.") and target == "latest"
    assert ("fsync", f"{run}/{source}") in log[: renames[0]], "the pointer is durable before the rename"
    assert log[renames[0] + 1 :] == [("fsync", run)], "then the run directory's entry"
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000001"], "temporary files left"
