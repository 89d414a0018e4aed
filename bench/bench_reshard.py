"""Resharding load: bytes read from storage against bytes needed, saved at 4 ranks, loaded at 3.

Four gloo ranks (CPU processes) save a state dict of ``tessera.ShardedTensor`` s: 2-D
weights in bf16 and fp32, each rank holding a quarter of the rows, and an fp32 optimizer
tensor held as flat ranges (a quarter of the elements each, boundaries mid-row, as a
distributed optimizer holds it). Then three ranks load it into a three-way layout (a
third of the rows, a third of the elements), twice, with the page cache dropped before
each: each rank alone (``tessera.load(path, sd)``), and together
(``tessera.load(path, sd, process_group=...)``: each chunk read by one rank, its pieces
sent to the others). With ``--chunk-mib`` several chunk sizes are saved and loaded.

Bytes needed: the sum over the loading ranks of their destination tensors' bytes.
Bytes read, per rank, from ``/proc/self/io`` around the load call: ``rchar`` (bytes
returned by read-family system calls on files, including the checkpoint's JSON
metadata, and on pipes or sockets if the library reads them that way) and
``read_bytes`` (bytes the block layer fetched for this process: meaningful because the
page cache is dropped before each load; where two ranks read the same chunk at once,
only the first may be charged). Every loaded tensor is compared bit for bit with what
was saved; a mismatch fails the run. Goal (issue 5): read at most 1.25x the bytes needed.

Run ``python bench/bench_reshard.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tessera
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_save_load import BenchmarkError, add_common_options, byte_view, drop_cache, run_stamp

MIB = 2**20
GOAL = 1.25
SAVE_RANKS, LOAD_RANKS = 4, 3


@dataclass(frozen=True)
class Spec:
    """One global tensor: its key, dtype and shape, and whether it is sharded by rows or by flat range."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, int]
    flat: bool


# (key, dtype, columns, share of the total bytes, flat-range sharded); the widths differ so
# that chunk boundaries fall differently in each tensor.
TENSORS = (
    ("model/w0", torch.bfloat16, 4096, 0.25, False),
    ("model/w1", torch.bfloat16, 1536, 0.15, False),
    ("model/w2", torch.float32, 2048, 0.20, False),
    ("model/w3", torch.float32, 1000, 0.10, False),
    ("optimizer/exp_avg", torch.float32, 2048, 0.30, True),
)


def specs(total_bytes: int) -> list[Spec]:
    """The tensors, with rows chosen so that they add up to about ``total_bytes``; rows are a
    multiple of 256, as model dimensions are, so the saving ranks' row shards are even and a
    third of them is not."""
    out = []
    for key, dtype, cols, share, flat in TENSORS:
        rows = 256 * max(1, round(share * total_bytes / (cols * dtype.itemsize) / 256))
        out.append(Spec(key, dtype, (rows, cols), flat))
    return out


def global_tensor(spec: Spec, seed: int) -> torch.Tensor:
    """The saved value of ``spec``: seeded from its key, so every rank can rebuild any region."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, spec.key)) * 7919)
    return torch.randn(spec.shape, generator=gen).to(spec.dtype)


def flat_bound(spec: Spec, k: int, world: int) -> int:
    """Where flat range ``k`` starts: ``N*k//W`` moved half a row on, so that boundaries fall
    mid-row, as a distributed optimizer's padded buckets put them."""
    n = math.prod(spec.shape)
    return n if k == world else n * k // world + (spec.shape[1] // 2 if k else 0)


def shard(spec: Spec, full: torch.Tensor, rank: int, world: int, fill: int | None) -> tessera.ShardedTensor:
    """Rank ``rank`` of ``world``'s part: rows ``[R*r//W, R*(r+1)//W)``, or a flat range of the
    whole tensor (``flat_bound``) for a flat-range spec; a copy of ``full``'s values, or every
    byte set to ``fill`` (a template to load into)."""
    if spec.flat:
        start, stop = flat_bound(spec, rank, world), flat_bound(spec, rank + 1, world)
        local = full.reshape(-1)[start:stop]
        box: dict[str, Any] = {"box_shape": spec.shape, "flat_range": (start, stop)}
        offset = (0, 0)
    else:
        rows = spec.shape[0]
        first, last = rows * rank // world, rows * (rank + 1) // world
        local, box, offset = full[first:last], {}, (first, 0)
    local = local.clone()
    if fill is not None:
        byte_view(local).fill_(fill)
    return tessera.ShardedTensor(local, spec.shape, offset, **box)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model/w0": v} -> {"model": {"w0": v}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        group, name = key.split("/")
        out.setdefault(group, {})[name] = value
    return out


def io_counters() -> dict[str, int]:
    """This process's I/O accounting (all its threads)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(fields[k]) for k in ("rchar", "read_bytes")}


def barrier_timed(fn: Callable[[], Any]) -> float:
    """Seconds this rank spent in ``fn``, all ranks starting together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def save_rank(rank: int, port: int, paths: dict[str, str], specs_: list[Spec], seed: int) -> None:
    """One of the saving ranks: its quarter of every tensor, one checkpoint per chunk size."""
    init(rank, SAVE_RANKS, port)
    state = nested({s.key: shard(s, global_tensor(s, seed), rank, SAVE_RANKS, None) for s in specs_})
    for label, path in paths.items():
        default = tessera.SaveOptions()
        options = default if label == "default" else tessera.SaveOptions(chunk_bytes=int(float(label) * MIB))
        tessera.save(state, path, options=options)
    dist.destroy_process_group()


def check(
    shards: dict[str, tessera.ShardedTensor], fulls: dict[str, torch.Tensor], specs_: list[Spec], rank: int
) -> None:
    """Every destination shard (filled in place) equals its region of the saved tensor, bit for bit."""
    for s in specs_:
        want = shard(s, fulls[s.key], rank, LOAD_RANKS, None).local
        if not torch.equal(byte_view(shards[s.key].local), byte_view(want)):
            raise BenchmarkError(f"rank {rank}: {s.key} differs from what was saved")


def load_once(
    path: str, fulls: dict[str, torch.Tensor], specs_: list[Spec], together: bool
) -> dict[str, Any]:
    """Load this rank's third, cold, counting its reads; checks the result."""
    rank = dist.get_rank()
    shards = {s.key: shard(s, fulls[s.key], rank, LOAD_RANKS, 0xFF) for s in specs_}
    template = nested(shards)
    needed = sum(t.local.numel() * t.local.element_size() for t in shards.values())
    cache = drop_cache(Path(path), everything=False) if rank == 0 else None
    group = dist.group.WORLD if together else None
    before = io_counters()
    seconds = barrier_timed(lambda: tessera.load(path, template, process_group=group))
    after = io_counters()
    check(shards, fulls, specs_, rank)
    return {
        "rank": rank,
        "needed": needed,
        "seconds": seconds,
        "cache": cache,
        **{k: after[k] - before[k] for k in before},
    }


def load_rank(rank: int, port: int, paths: dict[str, str], specs_: list[Spec], seed: int, out: str) -> None:
    """One of the loading ranks: every checkpoint, alone then together; results to ``out``."""
    init(rank, LOAD_RANKS, port)
    fulls = {s.key: global_tensor(s, seed) for s in specs_}
    results = []
    for label, path in paths.items():
        for together in (False, True):
            result = load_once(path, fulls, specs_, together)
            results.append({"chunk": label, "mode": "together" if together else "alone", **result})
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summarize(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (chunk size, mode): sums over ranks, the slowest rank's seconds."""
    rows = []
    for samples in zip(*per_rank, strict=True):
        needed = sum(s["needed"] for s in samples)
        rows.append(
            {
                "chunk": samples[0]["chunk"],
                "mode": samples[0]["mode"],
                "needed": needed,
                "rchar": sum(s["rchar"] for s in samples),
                "read_bytes": sum(s["read_bytes"] for s in samples),
                "seconds": max(s["seconds"] for s in samples),
                "cache": samples[0]["cache"],
                "per_rank": samples,
            }
        )
    return rows


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["chunk MiB", "mode", "MB needed", "MB read (rchar)", "÷ needed", "MB read_bytes", "÷ needed", "s"]
    body = [
        [
            r["chunk"],
            r["mode"],
            f"{r['needed'] / 1e6:.1f}",
            f"{r['rchar'] / 1e6:.1f}",
            f"{r['rchar'] / r['needed']:.2f}",
            f"{r['read_bytes'] / 1e6:.1f}",
            f"{r['read_bytes'] / r['needed']:.2f}",
            f"{r['seconds']:.2f}",
        ]
        for r in rows
    ]
    if markdown:
        return "\n".join("| " + " | ".join(c) + " |" for c in [head, ["---"] * len(head), *body])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *body]
    )


def notes(rows: list[dict[str, Any]]) -> list[str]:
    resident = [r["cache"]["resident_bytes"] for r in rows if r["cache"]["resident_bytes"] is not None]
    out = [
        "cache before each load: posix_fadvise(DONTNEED) on every checkpoint file"
        + (f", then at most {max(resident)} of its bytes resident (fincore)" if resident else ""),
        "rchar includes the JSON metadata every rank reads (not gloo's transfers: sockets are read with "
        "recv); read_bytes: block reads, charged to the first rank to fault a page; s: slowest rank",
    ]
    for r in rows:
        ratio = r["rchar"] / r["needed"]
        verdict = "met" if ratio <= GOAL else "NOT met"
        out.append(
            f"goal: chunk {r['chunk']}, {r['mode']}: read (rchar) ÷ needed {ratio:.2f} ≤ {GOAL} ({verdict})"
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size-mib", type=float, default=256, help="total bytes of the saved tensors (default 256)"
    )
    p.add_argument(
        "--chunk-mib",
        type=float,
        nargs="+",
        default=None,
        help="chunk sizes to save with (default: tessera's)",
    )
    p.add_argument("--quick", action="store_true", help="32 MiB, for smoke tests (overrides --size-mib)")
    add_common_options(p, "append a markdown section to this file")
    args = p.parse_args(argv)
    if args.size_mib <= 0 or (args.chunk_mib and min(args.chunk_mib) <= 0):
        p.error("sizes must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs_ = specs(int((32 if args.quick else args.size_mib) * MIB))
    labels = [f"{c:g}" for c in args.chunk_mib] if args.chunk_mib else ["default"]
    total = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs_)
    print(
        f"{total / MIB:.1f} MiB in {len(specs_)} tensors, saved by {SAVE_RANKS} ranks, loaded by {LOAD_RANKS}"
    )
    for s in specs_:
        how = "flat ranges" if s.flat else "rows"
        print(f"  {s.key}: {str(s.dtype).removeprefix('torch.')} {list(s.shape)}, {how}")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)  # as bench_save_load.py does
    workdir = Path(tempfile.mkdtemp(prefix="tessera-reshard-", dir=args.dir))
    try:
        paths = {label: str(workdir / f"chunk-{label}") for label in labels}
        start = time.perf_counter()
        mp.spawn(save_rank, (free_port(), paths, specs_, args.seed), nprocs=SAVE_RANKS)
        print(f"saved in {time.perf_counter() - start:.1f} s (with process start-up)", flush=True)
        mp.spawn(load_rank, (free_port(), paths, specs_, args.seed, str(workdir)), nprocs=LOAD_RANKS)
        per_rank = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(LOAD_RANKS)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarize(per_rank)
    lines = notes(rows)
    print("\n" + table(rows, markdown=False))
    print("\n".join(lines))
    date, command = run_stamp()
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(f"## Resharding load, 4 -> 3 ranks, {date}\n\n- command: `{command}`\n")
            f.write(f"- {total / MIB:.1f} MiB in {len(specs_)} tensors\n")
            f.write("".join(f"- {n}\n" for n in lines) + "\n" + table(rows, markdown=True) + "\n\n")
    if args.json:
        args.json.write_text(json.dumps({"date": date, "command": command, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
