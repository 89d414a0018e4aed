"""Scale of the save metadata: planning time and manifest size for a simulated 1,024-rank job.

Tessera's coordinator (rank 0) gathers every rank's local plan (metadata only: keys, shapes,
the boxes and flat ranges each rank holds), checks that the main copies tile every tensor,
gives every chunk one writer, builds the root ``zarr.json`` (the manifest) and reads it back
as a reader would, all before a byte of data is written. All of that is serial work on one
process while every other rank waits, so it must stay small as the job grows. The goal
(issue "Scale of the metadata"): for a 70B-parameter model on 1,024 ranks (TP=8, PP=8,
DP=16), planning and checking take under 2 s and the manifest stays under 20 MB, growing
no faster than linearly in the number of ranks.

No process, tensor or file is involved: the benchmark builds the :class:`LeafSpec` objects
each rank would send, pickles them per rank (the gather's payload) and unpickles them (what
the coordinator receives), then times the coordinator's steps as ``writer._coordinate``
runs them:

- ``plan``:     ``make_global_plan`` (agreement and coverage checks, chunk grids, owners,
                transfers);
- ``contents``: ``manifest_contents`` (JSON values merged, sharded-object cells checked,
                state-dict order);
- ``root``:     ``Manifest(...)`` and its root bytes with zeros for the chunk lists, sealed
                with its digest (``with_chunk_lists(manifest, {}).root_bytes()``);
- ``check``:    ``check_root_document`` of those bytes (strict JSON, digest, schema, entries),
                which the writer runs on its own root before claiming the path;
- ``commit``:   after the writes: the chunk lists from every rank's reported CRCs (4 bytes a
                chunk, random here), the final root sealed with its digest and compared with
                the checked one (only hex digits may differ), as ``writer._commit`` does before
                it publishes.

``unpickle`` (decoding the gathered local plans) is reported beside them but not in the total.

The simulated job is Llama-2-70B-like: 80 layers, hidden 8192, FFN 28672, 64 query heads and
8 KV heads, vocabulary 32000, untied embedding and head; q, k, v, gate and up are separate
tensors (the Hugging Face split: 9 tensors per layer, 723 parameters in all). Rank
``r = (pp * DP + dp) * TP + tp``. PP: 10 layers per stage, the embedding on stage 0, final
norm and head on the last. TP: q, k, v, gate, up and the embedding and head are split on
dim 0, o_proj and down_proj on dim 1, norms are whole on every rank (plain tensors).
Model weights (bf16) are replicas across DP (``replica_id = dp``). The optimizer state
(fp32 ``exp_avg``, ``exp_avg_sq``, ``fp32_param`` per parameter) is held as Megatron-LM's
distributed optimizer holds it: each (pp, tp) rank group lays its parameters' TP shards out
in one flat buffer (reverse order, starts padded to 64 elements, buckets of
``max(40M, 1M * DP)`` elements padded to ``lcm(DP, 128)``), and DP rank ``d`` holds the
``d``-th equal part of every bucket, hence flat ranges of the TP box at unaligned boundaries
(``--ranges even`` instead splits every box at ``numel * k // DP``). Norms' optimizer state
is main on TP rank 0 only (``replica_id = tp``). Each rank also holds a per-rank RNG state
(a 5,056-byte ``ShardedObject`` cell of a (PP, DP, TP) grid) and a few JSON values.

Run ``python bench/bench_plan_scale.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import hashlib
import math
import os
import pickle
import platform
import pstats
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
from tessera.format.dtypes import dtype_by_name
from tessera.format.keys import Key
from tessera.format.manifest import Manifest, WriterInfo
from tessera.format.root import check_root_document
from tessera.planning.chunk_crcs import chunk_lists, only_hex_digits_differ, with_chunk_lists
from tessera.planning.contents import manifest_contents
from tessera.planning.global_plan import GlobalPlan, make_global_plan
from tessera.planning.local_plan import Cell, Extent, LeafSpec
from tessera.planning.options import SaveOptions

T = TypeVar("T")

HIDDEN, FFN, VOCAB, LAYERS, HEADS, KV_HEADS = 8192, 28672, 32000, 80, 64, 8
HEAD_DIM = HIDDEN // HEADS
RNG_BYTES = 5056
"""``torch.get_rng_state()`` is 5,056 bytes."""
OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq", "fp32_param")
LISTS: tuple[Key, ...] = (("optimizer", "param_groups"),)
WRITER = WriterInfo("tessera-python", "bench")


class Param(NamedTuple):
    """One model parameter: its key, global shape and the dimension TP splits (``None``: whole)."""

    key: Key
    shape: tuple[int, ...]
    split: int | None


@dataclass(frozen=True)
class Layout:
    """The parallel layout: sizes of the TP, PP and DP dimensions, and how DP splits the optimizer."""

    tp: int
    pp: int
    dp: int
    ranges: str
    """``bucketed`` (Megatron's buffer) or ``even`` (``numel * k // dp``)."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp


# --- the model and its sharding --------------------------------------------------------------


def layer_params(i: int) -> list[Param]:
    pre: Key = ("model", "layers", i)
    kv = KV_HEADS * HEAD_DIM
    return [
        Param((*pre, "input_layernorm", "weight"), (HIDDEN,), None),
        Param((*pre, "self_attn", "q_proj", "weight"), (HIDDEN, HIDDEN), 0),
        Param((*pre, "self_attn", "k_proj", "weight"), (kv, HIDDEN), 0),
        Param((*pre, "self_attn", "v_proj", "weight"), (kv, HIDDEN), 0),
        Param((*pre, "self_attn", "o_proj", "weight"), (HIDDEN, HIDDEN), 1),
        Param((*pre, "post_attention_layernorm", "weight"), (HIDDEN,), None),
        Param((*pre, "mlp", "gate_proj", "weight"), (FFN, HIDDEN), 0),
        Param((*pre, "mlp", "up_proj", "weight"), (FFN, HIDDEN), 0),
        Param((*pre, "mlp", "down_proj", "weight"), (HIDDEN, FFN), 1),
    ]


def stage_params(stage: int, stages: int) -> list[Param]:
    """The parameters of one pipeline stage, in model order."""
    per = LAYERS // stages
    params = [p for i in range(stage * per, (stage + 1) * per) for p in layer_params(i)]
    if stage == 0:
        params.insert(0, Param(("model", "embed_tokens", "weight"), (VOCAB, HIDDEN), 0))
    if stage == stages - 1:
        params += [
            Param(("model", "norm", "weight"), (HIDDEN,), None),
            Param(("lm_head", "weight"), (VOCAB, HIDDEN), 0),
        ]
    return params


def tp_box(param: Param, tp: int, tps: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Offset and shape of TP rank ``tp``'s shard of ``param``."""
    if param.split is None:
        return (0,) * len(param.shape), param.shape
    size = param.shape[param.split] // tps
    offset = tuple(tp * size if d == param.split else 0 for d in range(len(param.shape)))
    shape = tuple(size if d == param.split else s for d, s in enumerate(param.shape))
    return offset, shape


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def bucketed_ranges(numels: Sequence[int], dps: int) -> list[list[tuple[int, int, int]]]:
    """Megatron's distributed-optimizer split: per parameter, ``(dp, start, stop)`` flat ranges.

    Parameters go into one flat buffer in reverse order, each starting at a multiple of 64;
    a bucket closes once it holds ``max(40M, 1M * dp)`` elements and its end is padded to
    ``lcm(dp, 128)``; DP rank ``d`` holds the ``d``-th equal part of every bucket.
    """
    bucket_size = max(40_000_000, 1_000_000 * dps)
    starts = [0] * len(numels)
    buckets: list[tuple[int, int]] = []
    position = bucket_start = 0
    for i in reversed(range(len(numels))):
        starts[i] = position = _pad(position, 64)
        position += numels[i]
        if position - bucket_start >= bucket_size or i == 0:
            end = _pad(position, math.lcm(dps, 128))
            buckets.append((bucket_start, end))
            position = bucket_start = end
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in numels]
    for i, (start, numel) in enumerate(zip(starts, numels, strict=True)):
        lo, hi = next((a, b) for a, b in buckets if a <= start < b)
        part = (hi - lo) // dps
        for dp in range(dps):
            a, b = max(start, lo + dp * part), min(start + numel, lo + (dp + 1) * part)
            if a < b:
                ranges[i].append((dp, a - start, b - start))
    return ranges


def even_ranges(numels: Sequence[int], dps: int) -> list[list[tuple[int, int, int]]]:
    return [
        [(k, n * k // dps, n * (k + 1) // dps) for k in range(dps) if n * k // dps < n * (k + 1) // dps]
        for n in numels
    ]


# --- what each rank sends --------------------------------------------------------------------


@dataclass(frozen=True)
class RankReport:
    """One rank's part of the gather: its array leaves, JSON values, leaf order and lists."""

    arrays: tuple[LeafSpec, ...]
    values: tuple[LeafSpec, ...]
    order: tuple[str, ...]


def rank_reports(layout: Layout) -> list[RankReport]:
    """Every rank's local plan, in rank order."""
    split = bucketed_ranges if layout.ranges == "bucketed" else even_ranges
    reports: dict[int, RankReport] = {}
    for pp in range(layout.pp):
        params = stage_params(pp, layout.pp)
        for tp in range(layout.tp):
            boxes = [tp_box(p, tp, layout.tp) for p in params]
            held = split([math.prod(shape) for _, shape in boxes], layout.dp)
            for dp in range(layout.dp):
                ranges = [next(((a, b) for d, a, b in r if d == dp), None) for r in held]
                reports[layout.rank(pp, dp, tp)] = _rank_report(layout, pp, dp, tp, params, boxes, ranges)
    return [reports[r] for r in range(layout.world)]


def _rank_report(
    layout: Layout,
    pp: int,
    dp: int,
    tp: int,
    params: list[Param],
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]],
    ranges: list[tuple[int, int] | None],
) -> RankReport:
    arrays = [_weight(p, box, dp) for p, box in zip(params, boxes, strict=True)]
    for state in OPTIMIZER_STATES:
        for param, (offset, shape), flat in zip(params, boxes, ranges, strict=True):
            if flat is not None:
                extent = Extent(offset, shape, flat, tp if param.split is None else 0)
                arrays.append(
                    LeafSpec(
                        ("optimizer", state, *param.key),
                        "tensor",
                        "float32",
                        param.shape,
                        "torch",
                        sharded=True,
                        extents=(extent,),
                    )
                )
    cell = Cell("rng_state", (layout.pp, layout.dp, layout.tp), (pp, dp, tp), True)
    arrays.append(LeafSpec(("rng_state", pp, dp, tp), "object", "uint8", (RNG_BYTES,), "bytes", cell=cell))
    values = [
        LeafSpec(("iteration",), "value", value=1000, tag="json"),
        LeafSpec(("optimizer", "param_groups", 0, "lr"), "value", value=1.5e-4, tag="json"),
        LeafSpec(("optimizer", "param_groups", 0, "weight_decay"), "value", value=0.1, tag="json"),
        LeafSpec(("optimizer", "step"), "value", value=1000, tag="json"),
    ]
    order = tuple(s.path for s in [values[0], *arrays[: len(params)], *values[1:], *arrays[len(params) :]])
    return RankReport(tuple(arrays), tuple(values), order)


def _weight(param: Param, box: tuple[tuple[int, ...], tuple[int, ...]], dp: int) -> LeafSpec:
    """The bf16 model weight: a TP shard, replica ``dp`` across DP; or a whole (plain) tensor."""
    if param.split is None:
        return LeafSpec(param.key, "tensor", "bfloat16", param.shape, "torch")
    extent = Extent(box[0], box[1], None, dp)
    return LeafSpec(param.key, "tensor", "bfloat16", param.shape, "torch", sharded=True, extents=(extent,))


def gather_blob(report: RankReport) -> bytes:
    """What the rank pickles for the gather, shaped like ``writer._Report.compact()``."""
    digest = hashlib.blake2b(pickle.dumps(report.arrays), digest_size=16).digest()
    payload: tuple[Any, ...] = (
        None, digest, report.arrays, report.values, report.order, LISTS, (), frozenset()
    )  # fmt: skip
    return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)


# --- the coordinator's steps -----------------------------------------------------------------


def best_of(repeat: int, step: Callable[[], T]) -> tuple[float, float, T]:
    """Fastest wall-clock and CPU seconds of ``repeat`` runs (a full collection before each),
    and the last result. CPU time shows how much of the wall time was waiting for a core."""
    wall = cpu = math.inf
    result = None
    for _ in range(repeat):
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = step()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, result  # type: ignore[return-value]


def build_root(plan: GlobalPlan, gathered: list[tuple[Any, ...]], layout: Layout) -> bytes:
    """The root ``zarr.json`` bytes, as the coordinator builds them."""
    values, orders, lists, tuples = ([g[i] for g in gathered] for i in (3, 4, 5, 6))
    entries, lists, _ = manifest_contents(plan, values, orders, lists, tuples)
    return with_chunk_lists(_manifest(entries, lists, layout), {}).root_bytes()


def _manifest(entries: Any, lists: Any, layout: Layout) -> Manifest:
    return Manifest(
        save_id=str(uuid.uuid4()),
        created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        writer=WRITER,
        entries=entries,
        lists=lists,
        metadata={"iteration": 1000},
        world_size=layout.world,
        parallelism={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
    )


@dataclass
class Point:
    """The measurements of one world size."""

    layout: Layout
    wall: dict[str, float]
    cpu: dict[str, float]
    arrays: int
    entries: int
    chunks: int
    transfers: int
    moved_bytes: int
    balance: float
    gather_bytes: int
    scatter_bytes: int
    root_bytes: int

    @property
    def total(self) -> float:
        return sum(self.wall[s] for s in STEPS)

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu[s] for s in STEPS)


STEPS = ("plan", "contents", "root", "check", "commit")
"""The coordinator's timed steps; ``unpickle`` is reported but not in the total."""


def measure(layout: Layout, repeat: int, options: SaveOptions) -> Point:
    blobs = [gather_blob(r) for r in rank_reports(layout)]
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name: str, step: Callable[[], T]) -> T:
        wall[name], cpu[name], result = best_of(repeat, step)
        return result

    gathered = timed("unpickle", lambda: [pickle.loads(b) for b in blobs])
    specs = [g[2] for g in gathered]
    plan = timed("plan", lambda: make_global_plan(specs, options))
    values, orders, lists = [g[3] for g in gathered], [g[4] for g in gathered], [g[5] for g in gathered]
    tuples = [g[6] for g in gathered]
    entries, keys, _ = timed("contents", lambda: manifest_contents(plan, values, orders, lists, tuples))
    manifest = _manifest(entries, keys, layout)
    root = timed("root", lambda: with_chunk_lists(manifest, {}).root_bytes())
    timed("check", lambda: check_root_document(root, "the simulated root"))
    rng = np.random.default_rng(0)
    counts = [sum(len(a.chunks) for a in r.arrays) for r in plan.ranks]
    reported = [rng.integers(0, 2**32, n, dtype="<u4").tobytes() for n in counts]

    def commit() -> None:
        final = with_chunk_lists(manifest, chunk_lists(plan.ranks, reported)).root_bytes()
        assert only_hex_digits_differ(root, final)

    timed("commit", commit)
    return Point(
        layout,
        wall,
        cpu,
        arrays=len(plan.entries),
        entries=len(entries),
        chunks=sum(e.layout.chunk_count for e in plan.entries.values()),
        transfers=sum(len(r.sends) for r in plan.ranks),
        moved_bytes=moved_bytes(plan, specs),
        balance=max(plan.loads) / (sum(plan.loads) / len(plan.loads)),
        gather_bytes=sum(len(b) for b in blobs),
        scatter_bytes=sum(len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)) for r in plan.ranks),
        root_bytes=len(root),
    )


def moved_bytes(plan: GlobalPlan, specs: Sequence[Sequence[LeafSpec]]) -> int:
    """Bytes the plan moves between ranks before writing (pieces of chunks no rank holds whole)."""
    return sum(
        t.source.region.volume * dtype_by_name(specs[rank][t.source.leaf].dtype).itemsize
        for rank, r in enumerate(plan.ranks)
        for t in r.sends
    )


def profile(layout: Layout, options: SaveOptions, top: int) -> None:
    """cProfile of the coordinator's steps (plan to check) at one world size."""
    gathered = [pickle.loads(gather_blob(r)) for r in rank_reports(layout)]
    profiler = cProfile.Profile()
    profiler.enable()
    plan = make_global_plan([g[2] for g in gathered], options)
    check_root_document(build_root(plan, gathered, layout), "the simulated root")
    profiler.disable()
    print(f"\n### cProfile, {layout.world} ranks (plan + contents + root + check)\n")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


# --- report ----------------------------------------------------------------------------------


def print_table(points: list[Point]) -> None:
    head = [
        "ranks", "DP", "arrays", "entries", "chunks", "transfers", "moved GB", "load max/mean",
        "gather MB", "scatter MB", "root MB", "unpickle s", *(f"{s} s" for s in STEPS), "total s",
        "total CPU s",
    ]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for p in points:
        cells = [
            p.layout.world, p.layout.dp, p.arrays, p.entries, p.chunks, p.transfers,
            f"{p.moved_bytes / 1e9:.1f}", f"{p.balance:.3f}", f"{p.gather_bytes / 1e6:.1f}",
            f"{p.scatter_bytes / 1e6:.1f}", f"{p.root_bytes / 1e6:.2f}", f"{p.wall['unpickle']:.3f}",
            *(f"{p.wall[s]:.3f}" for s in STEPS), f"{p.total:.3f}", f"{p.total_cpu:.3f}",
        ]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")


def print_growth(points: list[Point]) -> None:
    """Each point against the previous one: a ratio equal to the ranks' ratio is linear growth."""
    print("\n| ranks | ÷ previous ranks | total time | plan | check | root MB | gather MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for a, b in zip(points, points[1:], strict=False):
        ratios = [
            b.layout.world / a.layout.world,
            b.total / a.total,
            b.wall["plan"] / a.wall["plan"],
            b.wall["check"] / a.wall["check"],
            b.root_bytes / a.root_bytes,
            b.gather_bytes / a.gather_bytes,
        ]
        print(f"| {a.layout.world} → {b.layout.world} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


def machine() -> str:
    """Platform, CPU model, core count, load average (other work slows the wall-clock times)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")]
    model = names[0] if names else platform.machine()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.platform()}, {model}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"load average {load} at start"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4, 8, 16], help="DP sizes to run")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--pp", type=int, default=8, help="must divide 80 (the layers)")
    parser.add_argument(
        "--ranges",
        choices=["bucketed", "even"],
        default="bucketed",
        help="optimizer flat ranges: Megatron's bucketed buffer, or numel*k//DP per tensor",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per step (best is kept)")
    parser.add_argument("--profile", type=int, metavar="DP", help="also cProfile the steps at this DP")
    args = parser.parse_args(argv)
    options = SaveOptions()
    print(f"# plan scale, {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"- machine: {machine()}")
    print(f"- command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"- model: {len([p for s in range(args.pp) for p in stage_params(s, args.pp)])} parameter "
        f"tensors, TP={args.tp}, PP={args.pp}, optimizer ranges {args.ranges}, "
        f"chunk_bytes {options.chunk_bytes}, best of {args.repeat}\n"
    )
    points = []
    for dp in args.dp:
        sys.stdout.flush()
        points.append(measure(Layout(args.tp, args.pp, dp, args.ranges), args.repeat, options))
        print(f"  measured {points[-1].layout.world} ranks", file=sys.stderr, flush=True)
    print_table(points)
    print_growth(points)
    if args.profile:
        profile(Layout(args.tp, args.pp, args.profile, args.ranges), options, 30)


if __name__ == "__main__":
    main()
