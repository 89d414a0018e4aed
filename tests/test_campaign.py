"""The fuzzing campaign (``fuzz/campaign.py``) run briefly, as CI's share of the release campaign.

200 cases of seed 0 in two worker processes: every case is refused with a TesseraError, loads
equal, or (recomputing tampering only) loads different; none hangs past 5 s, crashes with another
exception, grows memory past 256 MiB or deletes a checkpoint outside its run directory.
"""

from __future__ import annotations

from pathlib import Path

from fuzz.campaign import BAD, main, run_campaign
from fuzz.mutations import MUTATIONS


def test_campaign_short_run(tmp_path: Path) -> None:
    result = run_campaign(200, seed=0, workers=2, reproducers=tmp_path / "reproducers", progress=False)
    counts = result["counts"]
    assert sum(counts.values()) == 200
    assert counts.get("refused", 0) > 0 and counts.get("equal", 0) > 0, counts
    bad = {b: counts.get(b, 0) for b in BAD if counts.get(b, 0)}
    details = [
        f"case {c['case']} {c['verdict']} {c.get('mutation')}: {c.get('what')} {c.get('code') or ''}"
        for c in result["bad"][:15]
    ]
    assert not bad, f"bad outcomes {bad}; reproducers in {tmp_path / 'reproducers'}:\n" + "\n".join(details)


def test_campaign_saves_reproducers_and_exits_nonzero_on_a_bad_case(tmp_path: Path) -> None:
    """A timeout no case can meet turns every case into a hang: the exit status says so, and each
    hang leaves its seed, case number and mutated files behind."""
    status = main(
        [
            "--cases",
            "2",
            "--seed",
            "3",
            "--workers",
            "1",
            "--timeout",
            "0.001",
            "--reproducers",
            str(tmp_path),
        ]
    )
    assert status == 1
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["seed-3-case-0", "seed-3-case-1"]
    assert (tmp_path / "seed-3-case-0" / "verdict.json").is_file()
    assert any((tmp_path / "seed-3-case-0" / "mutated").iterdir())


def test_every_mutation_is_weighted() -> None:
    assert all(weight > 0 for _, _, weight in MUTATIONS.values())
