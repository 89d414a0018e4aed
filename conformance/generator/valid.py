"""Valid tensors saved by one process: what every reader must read, bit for bit.

Each vector isolates one part of the format: a data type, a shape, a chunk
grid, a compression. Region probes (feature ``regions``) ask for boxes of
some arrays. Keys and non-tensor values are in :mod:`.values`; what readers
must accept or ignore in :mod:`.tolerated`; several writers in
:mod:`.multi_writer`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tessera
from numcodecs import Zstd

from ..protocol.arrays import DTYPE_NAMES, dtype_rules
from .damage import chunk_body, write_chunk, zstd_frame
from .data import tensor
from .vector import VectorWriter

__all__ = ["build"]

_REGIONS = ("R14.2",)


def build(out: Path) -> None:
    """Write every vector of this module under ``out/valid``."""
    for i, name in enumerate(DTYPE_NAMES):
        _dtype(out, name, seed=10 + i)
    builders: list[Callable[[Path], None]] = [
        _scalars,
        _zero_size,
        _edges_1d,
        _edges_3d,
        _chunk_whole,
        _chunk_ones,
        _chunk_larger,
        _rank_6,
        _regions,
        _zstd_3,
        _zstd_negative,
        _zstd_raw_blocks,
    ]
    for builder in builders:
        builder(out)


def _grid(
    out: Path,
    name: str,
    title: str,
    rules: list[str],
    state: dict[str, Any],
    chunk_shapes: dict[str, list[int]],
) -> None:
    """A vector of one or a few tensors on a given grid: read every entry, verify."""
    v = VectorWriter(out, "valid", name)
    v.save(state, options=tessera.SaveOptions(chunk_shapes=chunk_shapes))
    v.finish(title, rules, [v.read(), v.verify()])


def _dtype(out: Path, name: str, seed: int) -> None:
    v = VectorWriter(out, "valid", f"dtype-{name}")
    v.save({"x": tensor(name, (5, 3), seed)}, options=tessera.SaveOptions(chunk_shapes={"x": [2, 2]}))
    probes = [v.read(), v.verify()]
    if name == "bfloat16":
        probes.insert(1, v.read("region", [(("x",), [(1, 4), (1, 3)])], rules=_REGIONS, features=["regions"]))
    rules = ["R7.1", "R7.2", *dtype_rules(name), "R6.2", "R5.3", "R5.4"]
    v.finish(
        f"a {name} tensor [5, 3] in chunks [2, 2]: edge values, then random bits; edge chunks in both "
        "dimensions",
        rules,
        probes,
    )


def _scalars(out: Path) -> None:
    v = VectorWriter(out, "valid", "scalars-0d")
    state = {
        "step": tensor("float32", (), 20),
        "count": tensor("int64", (), 21),
        "scale": tensor("bfloat16", (), 22),
        "flag": tensor("bool", (), 23),
        "numpy": np.float64(2.5),
    }
    v.save(state)
    region = v.read("region", [(("step",), [])], rules=_REGIONS, features=["regions"])
    v.finish(
        "0-d tensors (one of them a NumPy scalar): shape [], one chunk at <path>/c",
        ["R5.2", "R3.14", "R8.5"],
        [v.read(), region, v.verify()],
    )


def _zero_size(out: Path) -> None:
    v = VectorWriter(out, "valid", "zero-size")
    state = {
        "rows": tensor("float32", (0, 3), 24),
        "cols": tensor("int32", (4, 0), 25),
        "flat": tensor("uint8", (0,), 26),
    }
    v.save(state)
    region = v.read("region", [(("cols",), [(1, 3), (0, 0)])], rules=_REGIONS, features=["regions"])
    v.finish(
        "zero-size tensors [0, 3], [4, 0] and [0]: no chunks at all, still an array zarr.json",
        ["R5.6", "R3.14"],
        [v.read(), region, v.verify()],
    )


def _edges_1d(out: Path) -> None:
    state = {"x": tensor("float64", (10,), 27).numpy()}
    _grid(
        out,
        "edges-1d",
        "a NumPy float64 [10] in chunks [3]: the last chunk holds one element",
        ["R5.3", "R5.4", "R8.5"],
        state,
        chunk_shapes={"x": [3]},
    )


def _edges_3d(out: Path) -> None:
    v = VectorWriter(out, "valid", "edges-3d")
    v.save({"x": tensor("int16", (5, 4, 3), 28)}, options=tessera.SaveOptions(chunk_shapes={"x": [2, 3, 2]}))
    region = v.read("region", [(("x",), [(1, 4), (2, 4), (0, 3)])], rules=_REGIONS, features=["regions"])
    v.finish(
        "an int16 [5, 4, 3] in chunks [2, 3, 2]: edge chunks along every dimension",
        ["R5.2", "R5.3", "R5.4"],
        [v.read(), region, v.verify()],
    )


def _chunk_whole(out: Path) -> None:
    _grid(
        out,
        "chunk-whole",
        "a float32 [4, 6] in one chunk of its own shape",
        ["R5.3", "R5.12"],
        {"x": tensor("float32", (4, 6), 29)},
        chunk_shapes={"x": [4, 6]},
    )


def _chunk_ones(out: Path) -> None:
    _grid(
        out,
        "chunk-ones",
        "an int32 [3, 4] in chunks [1, 1]: one element per chunk, 12 chunks",
        ["R5.2", "R5.3"],
        {"x": tensor("int32", (3, 4), 30)},
        chunk_shapes={"x": [1, 1]},
    )


def _chunk_larger(out: Path) -> None:
    _grid(
        out,
        "chunk-larger",
        "a float32 [3, 5] in one chunk [8, 8], mostly fill value",
        ["R5.3", "R5.4", "R5.9"],
        {"x": tensor("float32", (3, 5), 31)},
        chunk_shapes={"x": [8, 8]},
    )


def _rank_6(out: Path) -> None:
    _grid(
        out,
        "rank-6",
        "a float16 of rank 6 [2, 1, 3, 1, 2, 2] in chunks [1, 1, 2, 1, 2, 1]",
        ["R5.2", "R5.3", "R11.6"],
        {"x": tensor("float16", (2, 1, 3, 1, 2, 2), 32)},
        chunk_shapes={"x": [1, 1, 2, 1, 2, 1]},
    )


def _regions(out: Path) -> None:
    v = VectorWriter(out, "valid", "regions")
    v.save(
        {"w": tensor("float32", (7, 9), 33), "v": tensor("int64", (5,), 34)},
        options=tessera.SaveOptions(chunk_shapes={"w": [3, 4]}),
    )
    w = ("w",)
    boxes: dict[str, list[tuple[tuple[str, ...], list[tuple[int, int]] | None]]] = {
        "region-inside": [(w, [(0, 2), (1, 3)])],
        "region-across": [(w, [(2, 5), (3, 9)])],
        "region-empty": [(w, [(2, 2), (0, 9)])],
        "region-whole": [(w, [(0, 7), (0, 9)])],
        "region-several": [(w, [(6, 7), (8, 9)]), (("v",), None), (w, [(0, 7), (4, 5)])],
    }
    probes = [v.read()]
    probes += [v.read(name, asked, rules=_REGIONS, features=["regions"]) for name, asked in boxes.items()]
    probes.append(
        v.read(
            "region-outside",
            [(w, [(0, 8), (0, 9)])],
            error="tensor_mismatch",
            rules=_REGIONS,
            features=["regions"],
        )  # fmt: skip
    )
    v.finish(
        "boxes of a float32 [7, 9] in chunks [3, 4]: inside a chunk, across chunk edges, empty, whole, "
        "several in one read, and one reaching past the end (tensor_mismatch)",
        ["R14.2", "R5.3"],
        [*probes, v.verify()],
    )


def _zstd_state(seed: int) -> dict[str, Any]:
    return {
        "w": tensor("float32", (6, 5), seed),
        "ids": tensor("int64", (10,), seed + 1),
        "mask": tensor("bool", (7,), seed + 2),
        "h": tensor("bfloat16", (3, 3), seed + 3),
        "zeros": np.zeros(64, np.float32),
    }


_ZSTD_CHUNKS = {"w": [4, 4], "ids": [4], "mask": [3], "h": [2, 2], "zeros": [64]}


def _zstd_3(out: Path) -> None:
    v = VectorWriter(out, "valid", "zstd-3")
    v.save(
        _zstd_state(40), options=tessera.SaveOptions(compression=tessera.Zstd(3), chunk_shapes=_ZSTD_CHUNKS)
    )
    region = v.read("region", [(("w",), [(1, 5), (3, 5)])], rules=_REGIONS, features=["regions"])
    v.finish(
        "zstd level 3 on float32, int64, bool, bfloat16 and an all-zero array, with edge chunks",
        ["R6.1", "R6.3", "R6.4", "R6.5"],
        [v.read(), region, v.verify()],
    )


def _zstd_negative(out: Path) -> None:
    v = VectorWriter(out, "valid", "zstd-negative")
    v.save(
        _zstd_state(50), options=tessera.SaveOptions(compression=tessera.Zstd(-5), chunk_shapes=_ZSTD_CHUNKS)
    )
    v.finish(
        "zstd at the negative level -5: readers accept any integer level",
        ["R6.3", "R6.1", "R3.7"],
        [v.read(), v.verify()],
    )


def _zstd_raw_blocks(out: Path) -> None:
    v = VectorWriter(out, "valid", "zstd-raw-blocks")
    v.save(
        {"w": tensor("float32", (4, 6), 55)},
        options=tessera.SaveOptions(compression=tessera.Zstd(3), chunk_shapes={"w": [2, 3]}),
    )
    for chunk in sorted((v.checkpoint / "w" / "c").glob("*/*")):
        decoded = bytes(Zstd().decode(chunk_body(chunk)))
        write_chunk(chunk, zstd_frame(decoded, len(decoded)))
    v.finish(
        "zstd chunks as another encoder may write them: one frame of one raw (stored) block each",
        ["R6.3", "R6.4"],
        [v.read(), v.verify()],
    )
