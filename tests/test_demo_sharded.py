"""The multi-rank demo end to end (issue 17, "What it must show"): an FSDP2 GPT saved by 4 gloo
ranks that are then SIGKILLed, resumed at 2 ranks, bit for bit.

The program spawns its own ranks as real processes: 4 that train, save and are SIGKILLed; 2
that load that checkpoint and train straight to the end (run A); 2 that load it, save part way
and are SIGKILLed, and 2 fresh ones that load ``latest`` and finish (run B). It exits 0 only if
the state right after the 4 -> 2 load equals the 4 ranks' saved state (every weight and AdamW
moment gathered whole, scheduler, data position, ranks 0-1's RNG states) and B's losses and
final weights equal A's bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def test_fsdp2_saved_at_4_ranks_resumes_at_2_bit_exactly(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(REPO / "refimpl/examples/train_sharded.py"), "--out", str(out)]
        + ["--steps", "5", "--save-at", "2", "--crash-at", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert "step-00000002 committed, then the parent SIGKILLed the 4 ranks" in result.stdout, output
    assert "exit codes [-9, -9, -9, -9]" in result.stdout, output
    assert "the data position equal the 4 ranks' saved state: True" in result.stdout, output
    assert "ranks 0-1 got their own saved states back: True" in result.stdout, output
    assert "restarted from latest = step-00000003 at step 3" in result.stdout, output
    assert "losses of steps 3-5: 3/3 bit-identical; final weights and AdamW moments identical: True" in (
        result.stdout
    ), output
    assert "PASS: saved by 4 ranks, resumed at 2 bit-exactly" in result.stdout, output
