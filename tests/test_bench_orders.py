"""The benchmark's round orders (bench/bench_save_load.py): every method comes straight after
every other one equally often, so no method always pays for the same predecessor."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from bench_save_load import round_orders  # noqa: E402


@pytest.mark.parametrize("n", range(1, 10))
def test_each_method_follows_each_other_equally_often(n: int) -> None:
    rows = round_orders(n)
    assert len(rows) == (2 * n if n % 2 and n > 1 else n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    follows = Counter((a, b) for row in rows for a, b in zip(row, row[1:], strict=False))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1
