"""The conformance vectors (issue 4): checkpoints with the answers every reader must give.

``python -m conformance.generator [--out DIR]`` writes every vector, from
scratch and deterministically, into ``conformance/vectors/`` (or ``DIR``):
valid checkpoints the reference writer saves (from one process or several),
and malformed, invalid and unsupported ones made from them by one fault each.
``conformance/vectors/README.md`` describes a vector folder.
"""

from __future__ import annotations

from .build import GROUPS, VECTORS_DIR, generate

__all__ = ["GROUPS", "VECTORS_DIR", "generate"]
