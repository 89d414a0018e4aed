"""Progress of reads (issue 16, item 7): ``load``, a handle's reads and ``verify`` draw a bar on
stderr when asked, as ``save`` does, and nothing when not; ``tessera verify`` draws it on a
terminal only. Also the handle's lifetime: ``close`` and context-manager use."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tessera
import torch
from tessera import ShardedTensor
from tessera.storage.local import LocalStorage

from .conftest import ROOT, assert_bit_equal, forced_chunks, random_tensor
from .ranks import run_ranks

BAR = re.compile(r"\r(\w+) \[[#.]{30}\] +([\d.]+)% ")


def _bars(stderr: str) -> list[tuple[str, float]]:
    """Every bar drawn: its label and percentage."""
    return [(label, float(percent)) for label, percent in BAR.findall(stderr)]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {"w": random_tensor("float32", (300, 100), seed=1), "b": random_tensor("bfloat16", (77,), seed=2)}
    with forced_chunks(lambda shape: tuple(min(s, 32) for s in shape)):
        tessera.save(state, tmp_path / "ck")
    return tmp_path / "ck", state


def test_load_draws_a_bar_only_when_asked(
    saved: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, state = saved
    template = {k: torch.zeros_like(v) for k, v in state.items()}
    tessera.load(root, template)
    tessera.load(root)
    assert capsys.readouterr().err == ""
    tessera.load(root, template, progress=True)
    bars = _bars(capsys.readouterr().err)
    assert bars and bars[-1] == ("loading", 100.0)
    assert all(label == "loading" for label, _ in bars)
    got = tessera.load(root, progress=True)
    assert _bars(capsys.readouterr().err)[-1][1] == 100.0
    assert_bit_equal(got["w"], state["w"])


def test_a_handles_reads_draw_a_bar_only_when_asked(
    saved: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, state = saved
    checkpoint = tessera.open(root)
    checkpoint.read("w", [slice(10, 70)])
    checkpoint.values(["w", "b"])
    assert capsys.readouterr().err == ""
    part = checkpoint.read("w", [slice(10, 70)], progress=True)
    assert_bit_equal(part, state["w"][10:70])
    assert _bars(capsys.readouterr().err)[-1] == ("reading", 100.0)
    out = torch.zeros(77, dtype=torch.bfloat16)
    checkpoint.read_into("b", out, progress=True)
    assert _bars(capsys.readouterr().err)[-1] == ("reading", 100.0)
    checkpoint.values(["w", "b"], progress=True)
    assert _bars(capsys.readouterr().err)[-1] == ("reading", 100.0)


def test_verify_draws_a_bar_only_when_asked(
    saved: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = saved
    assert tessera.verify(root).ok
    assert capsys.readouterr().err == ""
    assert tessera.verify(root, progress=True, threads=2).ok
    assert _bars(capsys.readouterr().err)[-1] == ("verifying", 100.0)


def _cli_verify(root: Path, stderr: int) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "verify", str(root)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_the_cli_draws_the_bar_on_a_terminal_only(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, _ = saved
    plain = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "verify", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plain.returncode == 0 and plain.stderr == "" and plain.stdout.startswith("OK")
    controller, terminal = pty.openpty()
    try:
        stdout = _cli_verify(root, terminal)
        os.close(terminal)
        terminal = -1
        drawn = b""
        with contextlib.suppress(OSError):  # EIO once the terminal's other end is closed
            while chunk := os.read(controller, 4096):
                drawn += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert stdout.startswith("OK")
    assert _bars(drawn.decode())[-1] == ("verifying", 100.0)


def _load_together(rank: int, world_size: int, path: str) -> tuple[str, bool]:
    """Each rank loads half the rows of ``w`` together with the other, progress asked; returns
    what it drew on stderr and whether its rows are right."""
    rows = 300 // world_size
    out = torch.zeros(rows, 100)
    template: dict[str, Any] = {"w": ShardedTensor(out, (300, 100), (rank * rows, 0))}
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        tessera.load(path, template, process_group=torch.distributed.group.WORLD, progress=True)
    want = random_tensor("float32", (300, 100), seed=1)[rank * rows : (rank + 1) * rows]
    return captured.getvalue(), bool(torch.equal(out.view(torch.int32), want.view(torch.int32)))


def test_loading_together_draws_rank_0s_bar(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, _ = saved
    (drawn_0, right_0), (drawn_1, right_1) = run_ranks(2, _load_together, str(root))
    assert right_0 and right_1
    assert _bars(drawn_0)[-1] == ("loading", 100.0)
    assert drawn_1 == ""


def test_a_closed_handle_reads_nothing(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, state = saved
    with tessera.open(root) as checkpoint:
        assert_bit_equal(checkpoint.read("b"), state["b"])
    assert "closed" in repr(checkpoint)
    assert checkpoint.keys() == ["w", "b"]  # the manifest stays readable
    with pytest.raises(ValueError, match="closed"):
        checkpoint.read("w")
    with pytest.raises(ValueError, match="closed"):
        checkpoint.read_into("b", torch.zeros(77, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="closed"):
        tessera.load(checkpoint)
    checkpoint.close()  # closing twice is harmless


def test_open_load_and_verify_take_a_storage_and_threads(
    saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """The readers resolve their location through one resolver: a ``Storage`` object is used
    as it is; ``threads`` means the same I/O threads for all three."""
    root, state = saved
    storage = LocalStorage(root)
    with tessera.open(storage, threads=2) as checkpoint:
        assert checkpoint.storage is storage
        assert_bit_equal(checkpoint.read("w"), state["w"])
    assert_bit_equal(tessera.load(storage, threads=3)["b"], state["b"])
    assert tessera.verify(storage, threads=2).ok
    with pytest.raises(tessera.StorageError, match="weird"):
        tessera.load("weird://bucket/ck")
    assert not (tmp_path / "weird:").exists()
