"""The ``tessera`` command line: output, ``--json`` shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tessera
import torch
from tessera.cli.main import main

from .conftest import flip_byte


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory with two committed checkpoints and one uncommitted claim."""
    runs = tessera.RunDirectory(tmp_path / "run")
    for step in (10, 20):
        runs.save({"model": {"w": torch.arange(12.0).reshape(3, 4) + step}, "step": step}, step)
    (tmp_path / "run" / "step-00000030").mkdir()
    (tmp_path / "run" / "step-00000030" / ".tessera-claim.json").write_text("{}")
    return tmp_path / "run"


def test_inspect_prints_keys_and_shapes(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(run / "step-00000020")]) == 0
    out = capsys.readouterr().out
    assert "w" in out and "float32" in out and "[3, 4]" in out


def test_inspect_json_is_the_manifest(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(run)]) == 0
    doc = json.loads(capsys.readouterr().out)
    text = json.dumps(doc)
    assert "model/w" in text and '"format_version": "1.2"' in text


def test_verify_ok_and_damaged(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = run / "step-00000020"
    assert main(["verify", "-q", str(checkpoint)]) == 0
    flip_byte(checkpoint / "model" / "w" / "c" / "0" / "0", 3)
    assert main(["verify", "-q", str(checkpoint)]) == 1
    assert "checksum_mismatch: model/w chunk c/0/0" in capsys.readouterr().out


def test_ls_marks_latest_and_uncommitted(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    latest = [line for line in lines if "step-00000020" in line]
    assert latest and "*" in latest[0]
    assert any("step-00000030" in line and "UNCOMMITTED" in line for line in lines)


def test_errors_are_one_line_with_their_code(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(run / "step-00000030")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera: error[uncommitted]: ") and "\n" not in err
    assert main(["verify", str(run / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("tessera: error[not_found]: no checkpoint")
