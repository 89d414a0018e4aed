"""Every case of the suite, in the order the runner takes them."""

from __future__ import annotations

from collections import Counter

from . import multi_rank, reading, writing
from .model import PROFILES, Case

__all__ = ["all_cases"]


def all_cases() -> list[Case]:
    """The cases of every profile, profile by profile; ids are unique."""
    cases = [*reading.cases(), *writing.cases(), *multi_rank.cases()]
    twice = [case_id for case_id, n in Counter(c.id for c in cases).items() if n > 1]
    if twice:
        raise AssertionError(f"case ids defined twice: {twice}")
    return sorted(cases, key=lambda c: PROFILES.index(c.profile))
