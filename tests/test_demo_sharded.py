"""The multi-rank demo end to end: ZeRO-sharded AdamW saved at DP=4, resumed at DP=2 and DP=1 (R16.6).

It spawns its own gloo ranks (4, 2, 1, then 4 for the reference run) and
exits 0 only if both resumed runs' losses and final fp32 master weights are
bit-identical to an uninterrupted DP=4 run, and the checkpoint saved by two
ranks reads back in one process as the one-process run's weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def test_sharded_demo_resumes_bit_exactly_under_other_layouts(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(REPO / "refimpl/examples/train_sharded.py"), "--out", str(out)]
        + ["--steps", "6", "--every", "3", "--crash-at", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS: resumed under other layouts, bit-identical" in result.stdout
    assert "saved by 4 ranks" in result.stdout
