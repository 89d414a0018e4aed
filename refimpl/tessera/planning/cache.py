"""Reuse of a global plan while the layout of the saved state stays the same (spec R16.3).

Planning a thousand ranks' layout costs a gather of every rank's shards and a
coverage check; between two saves of one training run nothing of that
changes, only the bytes and the JSON values. Each rank keeps the digest of
its own layout and its part of the plan; the coordinator also keeps every
rank's digest, and reuses the plan only when all of them match.
"""

from __future__ import annotations

from dataclasses import dataclass

from .global_plan import GlobalPlan, RankPlan

__all__ = ["PlanCache"]


@dataclass
class PlanCache:
    """Pass the same object to every ``save`` of a run: ``tessera.save(..., plan_cache=cache)``."""

    digest: bytes | None = None
    """This rank's layout digest when the cached plan was made."""
    rank_plan: RankPlan | None = None
    all_digests: tuple[bytes, ...] | None = None
    """Coordinator only: every rank's digest."""
    plan: GlobalPlan | None = None
    """Coordinator only."""
    hits: int = 0
    """Saves that reused the plan (for tests and logs)."""

    def holds(self, digest: bytes) -> bool:
        return self.digest == digest and self.rank_plan is not None
