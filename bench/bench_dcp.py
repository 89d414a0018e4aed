"""The DCP plug-in against Tessera's own API: ``dcp.save``/``dcp.load`` through ``tessera.dcp``
against ``tessera.save``/``tessera.load`` of the same state, in one process.

One deterministic training state (a model's fp32 weights, AdamW's ``exp_avg`` and
``exp_avg_sq`` and ``step`` per weight, ``param_groups`` and a step count, nested as
``get_state_dict`` nests them) is saved by each method into a fresh directory and loaded
back cold (the page cache of the checkpoint's files dropped with
``posix_fadvise(DONTNEED)``) into a preallocated state poisoned with NaN; every load is
checked bit-exact. The methods run interleaved, their order alternating from round to
round, so that a drift of the machine hits both alike. Both saves are durable when they
return (the plug-in's save is ``tessera.save``, fed from DCP's plan).

The goal (issue 19): the plug-in's save and load within 1.1x of ``tessera.save`` and
``tessera.load``. Each round's ratio is plug-in time / Tessera time of that round.

    .venv/bin/python bench/bench_dcp.py --size-mib 256 --repeat 3
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tessera
import torch
import torch.distributed.checkpoint as dcp
from tessera.dcp import TesseraLoadPlanner, TesseraStorageReader, TesseraStorageWriter

METHODS = ("tessera", "dcp-plugin")
WIDTH = 512  # a 512 x 512 fp32 weight is 1 MiB


def make_state(size_mib: int, fill: float | None = None) -> dict[str, Any]:
    """About ``size_mib`` MiB: each layer is a weight and its two Adam moments (3 MiB)."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        if fill is not None:
            return torch.full(shape, fill)
        return torch.randn(*shape, generator=generator)

    layers = max(1, size_mib // 3)
    model = {f"layers.{i}.weight": tensor(WIDTH, WIDTH) for i in range(layers)}
    state = {
        name: {
            "step": torch.tensor(100.0),
            "exp_avg": tensor(WIDTH, WIDTH),
            "exp_avg_sq": tensor(WIDTH, WIDTH),
        }
        for name in model
    }
    groups = [{"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "params": list(model)}]
    return {"model": model, "optim": {"state": state, "param_groups": groups}, "step": 100}


def tensors_of(state: dict[str, Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    stack: list[Any] = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
    return out


def drop_cache(path: Path) -> None:
    for file in (p for p in path.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def save_with(method: str, state: dict[str, Any], path: Path) -> None:
    if method == "tessera":
        tessera.save(state, path)
    else:
        dcp.save(state, storage_writer=TesseraStorageWriter(path), no_dist=True)


def load_with(method: str, into: dict[str, Any], path: Path) -> None:
    if method == "tessera":
        tessera.load(path, into)
    else:
        dcp.load(into, storage_reader=TesseraStorageReader(path), planner=TesseraLoadPlanner(), no_dist=True)


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (every thread's): the CPU time shows the
    plug-in's own cost where other jobs on a shared machine make the wall time noisy."""
    start, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - start, time.process_time() - cpu


def run(size_mib: int, repeat: int, root: Path) -> dict[tuple[str, str], list[tuple[float, float]]]:
    source = make_state(size_mib)
    want = tensors_of(source)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {
        (m, op): [] for m in METHODS for op in ("save", "load")
    }
    for round_ in range(repeat + 1):  # round 0 warms up, untimed
        order = METHODS if round_ % 2 == 0 else METHODS[::-1]
        for method in order:
            path = root / f"{method}-{round_}"
            saved = timed(functools.partial(save_with, method, source, path))
            drop_cache(path)
            into = make_state(size_mib, fill=float("nan"))
            loaded = timed(functools.partial(load_with, method, into, path))
            got = tensors_of(into)
            if len(got) != len(want) or not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
                raise SystemExit(f"{method}: the load is not bit-exact")
            if into["step"] != 100 or into["optim"]["param_groups"][0]["lr"] != 1e-3:
                raise SystemExit(f"{method}: the values did not load")
            shutil.rmtree(path)
            if round_:
                times[method, "save"].append(saved)
                times[method, "load"].append(loaded)
    return times


def spread(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(repeat: int, times: dict[tuple[str, str], list[tuple[float, float]]], nbytes: int) -> str:
    lines = [
        f"{nbytes / 2**20:.1f} MiB, {repeat} rounds after one warm-up, {platform.platform()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, tessera {tessera.__version__}",
        "",
        "| op | tessera s | plug-in s | tessera GB/s | plug-in GB/s | ÷ tessera wall | ÷ tessera CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in ("save", "load"):
        ours, theirs = times["dcp-plugin", op], times["tessera", op]
        walls = [a[0] / b[0] for a, b in zip(ours, theirs, strict=True)]
        cpus = [a[1] / b[1] for a, b in zip(ours, theirs, strict=True)]
        rates = [[nbytes / t / 1e9 for t, _ in times[m, op]] for m in METHODS]
        seconds = [spread([t for t, _ in times[m, op]]) for m in METHODS]
        cells = [*seconds, spread(rates[0]), spread(rates[1]), spread(walls), spread(cpus)]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temporary directory)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        times = run(args.size_mib, args.repeat, Path(tmp))
    nbytes = sum(t.numel() * t.element_size() for t in tensors_of(make_state(args.size_mib)))
    print(report(args.repeat, times, nbytes))


if __name__ == "__main__":
    main()
