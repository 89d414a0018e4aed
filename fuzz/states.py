"""The small checkpoints every fuzz case starts from, and the equality a load must keep.

Each state is deterministic, so a case made from it can be loaded with a template of the same
structure and compared bit for bit with what was saved. Chunks are tiny (``chunk_bytes=24``) so
that one checkpoint has many chunks of equal size (a swap stays size-valid) in a few KiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tessera
import torch

from .sealing import upgrade, write_root

__all__ = ["STATES", "METADATA", "make_checkpoint", "template_of", "state_equal", "first_difference"]

METADATA: dict[str, Any] = {"step": 7, "config": {"lr": 0.001, "layers": [4, 4], "name": "fuzz"}}


def _small() -> dict[str, Any]:
    return {
        "w": torch.arange(24.0).reshape(4, 6),
        "grp": {"v": torch.arange(5, dtype=torch.int16), "n": 3, "tag": "abc"},
        "flag": torch.tensor([True, False, True, True]),
        "blob": b"opaque-bytes",
        "lst": [torch.arange(6, dtype=torch.int64), {"x": 1.5}],
    }


def _mixed() -> dict[str, Any]:
    """Several dtypes, half-precision and 8-bit floats among them, and odd shapes with edge chunks."""
    gen = torch.Generator().manual_seed(3)
    return {
        "model": {
            "a": torch.randn(6, 5, generator=gen),
            "b": torch.randn(7, generator=gen).to(torch.bfloat16),
            "c": torch.randint(-100, 100, (3, 3), generator=gen, dtype=torch.int32),
            "d": torch.randn(9, generator=gen).to(torch.float16),
            "e": torch.randn(4, 2, generator=gen).to(torch.float8_e4m3fn),
        },
        "opt": {"state": {0: {"m": torch.randn(5, 2, generator=gen, dtype=torch.float64)}}, "lr": 0.1},
        "rng": bytes(range(40)),
        "done": False,
        "none": None,
    }


def _tiny() -> dict[str, Any]:
    return {"x": torch.arange(2.0)}


STATES = {"small": _small, "mixed": _mixed, "tiny": _tiny}
"""Name -> a function making the state (fresh tensors every call)."""


def make_checkpoint(path: Path, state: str = "small", *, compression: str | None = None) -> Path:
    """Save ``STATES[state]`` at ``path`` with tiny chunks; the root is upgraded to format 1.1."""
    if compression not in (None, "zstd"):
        raise ValueError(f"compression is None or 'zstd', not {compression!r}")
    options = tessera.SaveOptions(chunk_bytes=24, compression=tessera.Zstd() if compression else None)
    tessera.save(STATES[state](), path, options=options, metadata=METADATA)
    write_root(path, upgrade(path))
    return path


def template_of(state: str) -> dict[str, Any]:
    """A template of the state's structure (zeroed tensors), for ``load(path, template)``."""

    def blank(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.zeros_like(value)
        if isinstance(value, Mapping):
            return {k: blank(v) for k, v in value.items()}
        if isinstance(value, list):
            return [blank(v) for v in value]
        return value

    return dict(blank(STATES[state]()))


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where two loaded states differ (tensors bit for bit, JSON values as JSON), or ``None``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: tensor against {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{list(a.shape)} against {b.dtype}{list(b.shape)}"
        same = np.array_equal(
            a.contiguous().view(torch.uint8).numpy() if a.numel() else np.empty(0),
            b.contiguous().view(torch.uint8).numpy() if b.numel() else np.empty(0),
        )
        return None if same else f"{where}: tensor bits differ"
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if list(a) != list(b):
            return f"{where}: keys {list(a)} against {list(b)}"
        for k in a:
            diff = first_difference(a[k], b[k], f"{where}/{k}")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: list of {len(a)} against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = first_difference(x, y, f"{where}/{i}")
            if diff:
                return diff
        return None
    if type(a) is not type(b) or a != b:
        return f"{where}: {a!r:.60} against {b!r:.60}"
    return None


def state_equal(a: Any, b: Any) -> bool:
    return first_difference(a, b) is None
