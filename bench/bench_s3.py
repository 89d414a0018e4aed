"""Tessera on S3 against the raw transfer of the same bytes and against tensorstore (issue 18).

Starts its own ``moto_server`` on 127.0.0.1 (``tessera.testing.moto.running_moto_server``),
builds a state dict, and in every round runs each method once, in the balanced orders of
:func:`bench_save_load.round_orders`. Two profiles, because an object store's cost is per
request as well as per byte, and Tessera (like tensorstore) stores each tensor as its own
objects (a ``zarr.json`` and its chunks): ``--profile gpt`` (default) is the GPT-like state dict
of bench_save_load.py, hundreds of tensors (Adam's per-parameter ``step`` too), where the
server's requests per second bound every per-tensor format; ``--profile large`` is the same
bytes in float32 tensors of ``--tensor-mib`` each (one chunk each), where bytes dominate.

- ``tessera``: ``tessera.save(sd, "s3://bucket/r<i>-tessera")``, then ``tessera.load`` of it
  into a new dict and in place;
- ``raw``: every tensor's bytes, in order, as ONE object: obstore's multipart upload (chunk
  size and parts in flight tuned first, best kept) and one download (a streamed GET or
  parallel ranged GETs, whichever the tuning found faster) straight into preallocated tensors;
- ``tensorstore``: every tensor as a zarr v3 array (Tessera's chunk shapes, bytes + crc32c
  codecs like Tessera's) on tensorstore's ``s3`` kvstore, all written through concurrent
  futures, then all read back.

Every load is checked bit-exact against the source (outside the timing). Prints GB/s per
method and the ratios Tessera/raw and Tessera/tensorstore, median and spread (min-max of the
per-round ratios), as a table; ``--markdown FILE`` appends it as a section.

    .venv/bin/python bench/bench_s3.py --quick                 # smoke run, a few seconds
    .venv/bin/python bench/bench_s3.py --size-mib 256 --repeat 3 --markdown bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_save_load import (  # noqa: E402
    GB,
    StateDict,
    build_state_dict,
    choose_layout,
    empty_like_tree,
    leaves,
    memory,
    payload_bytes,
    poison,
    round_orders,
    run_stamp,
    verify,
)
from tessera.testing.moto import S3Server, running_moto_server  # noqa: E402

MIB = 2**20
RAW_UPLOADS = ((8 * MIB, 8), (16 * MIB, 8), (16 * MIB, 16), (32 * MIB, 16))
"""(part size, parts in flight) tried for raw's multipart upload; obstore's default is 5 MiB x 12."""
RANGE_BYTES = 16 * MIB
"""The size of each ranged GET of raw's parallel download."""


@dataclass
class Raw:
    """raw's transfer settings, found by :func:`tune_raw`."""

    part_bytes: int = 16 * MIB
    parts_in_flight: int = 8
    download: str = "get"  # or "ranges"


class Bench:
    """The server, the clients, and the state dict being moved."""

    def __init__(self, server: S3Server, sd: StateDict) -> None:
        import obstore
        from obstore.store import S3Store

        self.server, self.sd = server, sd
        self.obstore = obstore
        env = server.env()
        self.store = S3Store(
            server.bucket,
            endpoint=server.endpoint,
            access_key_id=env["AWS_ACCESS_KEY_ID"],
            secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env["AWS_REGION"],
            client_options={"allow_http": True, "timeout": "120s"},
        )
        self.raw = Raw()
        self.views = [memory(t) for _, t in leaves(sd)]
        self.nbytes = payload_bytes(sd)

    # -- raw -------------------------------------------------------------------------------

    def raw_save(self, key: str) -> None:
        self.obstore.put(
            self.store,
            key,
            self.views,
            use_multipart=True,
            chunk_size=self.raw.part_bytes,
            max_concurrency=self.raw.parts_in_flight,
        )

    def raw_load(self, key: str, into: StateDict) -> StateDict:
        views = [memory(t) for _, t in leaves(into)]
        if self.raw.download == "get":
            result = self.obstore.get(self.store, key)
            scatter((memoryview(c) for c in result.stream(min_chunk_size=8 * MIB)), views)
        else:
            starts = list(range(0, self.nbytes, RANGE_BYTES))
            ends = [min(s + RANGE_BYTES, self.nbytes) for s in starts]
            got = self.obstore.get_ranges(self.store, key, starts=starts, ends=ends)
            scatter((memoryview(c) for c in got), views)
        return into

    def remove(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (moto keeps them all in memory)."""
        keys = [m["path"] for batch in self.obstore.list(self.store, prefix=f"{prefix}") for m in batch]
        for start in range(0, len(keys), 1000):
            self.obstore.delete(self.store, keys[start : start + 1000])

    # -- tessera ---------------------------------------------------------------------------

    def url(self, prefix: str) -> str:
        return f"s3://{self.server.bucket}/{prefix}"

    def tessera_save(self, prefix: str) -> None:
        import tessera

        tessera.save(self.sd, self.url(prefix))

    def tessera_load_new(self, prefix: str) -> StateDict:
        import tessera

        loaded: StateDict = tessera.load(self.url(prefix))
        return loaded

    def tessera_load_into(self, prefix: str, into: StateDict) -> StateDict:
        import tessera

        tessera.load(self.url(prefix), into)
        return into

    # -- tensorstore -----------------------------------------------------------------------

    def _ts_spec(self, prefix: str, name: str) -> dict[str, Any]:
        return {
            "driver": "zarr3",
            "kvstore": {
                "driver": "s3",
                "bucket": self.server.bucket,
                "path": f"{prefix}/{name}/",
                "endpoint": self.server.endpoint,
                "aws_region": "us-east-1",
                "aws_credentials": {"type": "environment"},
            },
        }

    def ts_save(self, prefix: str) -> None:
        import tensorstore as ts
        from tessera.planning import DEFAULT_CHUNK_BYTES
        from tessera.planning.chunk_grid import choose_chunk_shape

        opened = []
        for path, t in leaves(self.sd):
            shape = tuple(t.shape)
            metadata = {
                "shape": list(shape),
                "data_type": TS_DTYPES[t.dtype],
                "chunk_grid": {
                    "name": "regular",
                    "configuration": {
                        "chunk_shape": list(choose_chunk_shape(shape, t.element_size(), DEFAULT_CHUNK_BYTES))
                    },
                },
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            }
            spec = {**self._ts_spec(prefix, "/".join(map(str, path))), "metadata": metadata}
            opened.append((ts.open(spec, create=True), to_numpy(t)))
        writes = [store.result().write(array) for store, array in opened]
        for w in writes:
            w.result()

    def ts_load(self, prefix: str) -> StateDict:
        import tensorstore as ts

        paths = [path for path, _ in leaves(self.sd)]
        opened = [ts.open(self._ts_spec(prefix, "/".join(map(str, p))), open=True) for p in paths]
        reads = [o.result().read() for o in opened]
        out = skeleton(self.sd)
        for path, read, (_, like) in zip(paths, reads, leaves(self.sd), strict=True):
            node = out
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = from_numpy(read.result(), like.dtype).reshape(like.shape)
        return out


def large_tensors(size_mib: float, tensor_mib: float) -> tuple[StateDict, dict[str, Any]]:
    """``size_mib`` of seeded float32 tensors of ``tensor_mib`` each (the last may be smaller)."""
    gen = torch.Generator().manual_seed(0)
    left, sd, i = int(size_mib * MIB) // 4, {}, 0
    while left > 0:
        n = min(left, int(tensor_mib * MIB) // 4)
        sd[f"t{i:04d}"] = torch.randn(n, generator=gen)
        left, i = left - n, i + 1
    total = sum(t.nbytes for t in sd.values())
    return {"model": sd}, {"bytes": total, "tensors": len(sd), "about": f"float32, {tensor_mib:g} MiB each"}


def skeleton(tree: StateDict) -> StateDict:
    """The nested dicts of ``tree`` (empty ones too), without its tensors."""
    return {k: skeleton(v) for k, v in tree.items() if isinstance(v, dict)}


TS_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array of tensorstore's dtype (bf16: ml_dtypes'), no copy."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def scatter(chunks: Iterable[memoryview], views: list[memoryview]) -> None:
    """Copy a byte stream, in order, into consecutive buffers; it must fill them exactly."""
    i, at = 0, 0
    for chunk in chunks:
        data = chunk.cast("B")
        while data.nbytes:
            while i < len(views) and at == views[i].nbytes:
                i, at = i + 1, 0
            if i == len(views):
                raise RuntimeError("raw: the object is longer than the state dict")
            n = min(data.nbytes, views[i].nbytes - at)
            views[i][at : at + n] = data[:n]
            data, at = data[n:], at + n
    if sum(v.nbytes for v in views[i + 1 :]) + (views[i].nbytes - at if i < len(views) else 0):
        raise RuntimeError("raw: the object ended before the state dict")


# -- running -------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def tune_raw(bench: Bench, quick: bool) -> list[str]:
    """One upload per (part size, parts in flight) and one download each way; keeps the fastest."""
    notes, best = [], (0.0, RAW_UPLOADS[0])
    into = empty_like_tree(bench.sd)
    for n, (part, flight) in enumerate(RAW_UPLOADS[:2] if quick else RAW_UPLOADS):
        bench.raw.part_bytes, bench.raw.parts_in_flight = part, flight
        seconds, _ = timed(lambda: bench.raw_save(f"tune-{n}"))  # noqa: B023 - called at once
        if n:
            bench.remove(f"tune-{n}")
        gbps = bench.nbytes / seconds / GB
        notes.append(f"upload {part // MIB} MiB parts x {flight} in flight: {gbps:.3f} GB/s")
        best = max(best, (gbps, (part, flight)))
    bench.raw.part_bytes, bench.raw.parts_in_flight = best[1]
    fastest = (0.0, "get")
    for how in ("get", "ranges"):
        bench.raw.download = how
        seconds, got = timed(lambda: bench.raw_load("tune-0", into))
        verify(bench.sd, got, f"raw download ({how})")
        gbps = bench.nbytes / seconds / GB
        notes.append(f"download by {how}: {gbps:.3f} GB/s")
        fastest = max(fastest, (gbps, how))
    bench.raw.download = fastest[1]
    bench.remove("tune-")
    return notes


def run_round(bench: Bench, rep: int, order: list[int]) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []

    def record(method: str, op: str, seconds: float) -> None:
        samples.append({"repeat": rep, "method": method, "op": op, "gbps": bench.nbytes / seconds / GB})
        print(f"  [{rep}] {method} {op}: {bench.nbytes / seconds / GB:.3f} GB/s", flush=True)

    for k in order:
        name = METHODS[k]
        prefix = f"r{rep}-{name}"
        if name == "tessera":
            record(name, "save", timed(lambda: bench.tessera_save(prefix))[0])  # noqa: B023
            seconds, got = timed(lambda: bench.tessera_load_new(prefix))  # noqa: B023
            verify(bench.sd, got, "tessera.load")
            record(name, "load (new dict)", seconds)
            del got
            into = empty_like_tree(bench.sd)
            poison(into)
            seconds, got = timed(lambda: bench.tessera_load_into(prefix, into))  # noqa: B023
            verify(bench.sd, got, "tessera.load in place")
            record(name, "load (in place)", seconds)
        elif name == "raw":
            record(name, "save", timed(lambda: bench.raw_save(prefix))[0])  # noqa: B023
            into = empty_like_tree(bench.sd)
            poison(into)
            seconds, got = timed(lambda: bench.raw_load(prefix, into))  # noqa: B023
            verify(bench.sd, got, "raw")
            record(name, "load (in place)", seconds)
        else:
            record(name, "save", timed(lambda: bench.ts_save(prefix))[0])  # noqa: B023
            seconds, got = timed(lambda: bench.ts_load(prefix))  # noqa: B023
            verify(bench.sd, got, "tensorstore")
            record(name, "load (new dict)", seconds)
        del got
        bench.remove(prefix)
    return samples


METHODS = ("tessera", "raw", "tensorstore")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(samples: list[dict[str, Any]]) -> str:
    """GB/s per method and op, and Tessera's per-round ratios: median (min-max)."""

    def by(method: str, op: str) -> dict[int, float]:
        return {s["repeat"]: s["gbps"] for s in samples if (s["method"], s["op"]) == (method, op)}

    def ratio(mine: dict[int, float], other: dict[int, float]) -> str:
        return spread([mine[r] / other[r] for r in mine if r in other]) if mine and other else ""

    raw_save, raw_load = by("raw", "save"), by("raw", "load (in place)")
    ts_save, ts_load = by("tensorstore", "save"), by("tensorstore", "load (new dict)")
    rows = ["| method | op | GB/s median (min-max) | ÷ raw | ÷ tensorstore |", "|---|---|---|---|---|"]
    ops = sorted({(s["method"], s["op"]) for s in samples}, key=lambda mo: (METHODS.index(mo[0]), mo[1]))
    for method, op in ops:
        mine = by(method, op)
        raw, ts = (raw_save, ts_save) if op == "save" else (raw_load, ts_load)
        rows.append(
            f"| {method} | {op} | {spread(list(mine.values()))} | {ratio(mine, raw)} | {ratio(mine, ts)} |"
        )
    return "\n".join(rows)


def environment(server_log: Path) -> list[str]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    date, command = run_stamp()
    names = ("tessera-checkpoint", "obstore", "moto", "tensorstore", "torch")
    return [
        f"date: {date}",
        f"command: `{command}`",
        f"machine: `{platform.uname().system} {platform.uname().release} {platform.machine()}`, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}",
        "versions: " + ", ".join(f"{n} {version(n)}" for n in names),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=float, default=256.0, help="state dict size (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: at most 2 MiB, 1 round, little tuning"
    )
    parser.add_argument("--profile", choices=("gpt", "large"), default="gpt", help="see above")
    parser.add_argument(
        "--tensor-mib", type=float, default=32.0, help="--profile large: MiB per tensor (default 32)"
    )
    parser.add_argument("--markdown", type=Path, help="append the results as a section of this file")
    args = parser.parse_args(argv)
    size_mib, repeat = (args.size_mib, args.repeat) if not args.quick else (min(args.size_mib, 2.0), 1)
    if args.profile == "gpt":
        sd, info = build_state_dict(
            choose_layout(int(size_mib * MIB), "adam"), seed=0, device=torch.device("cpu")
        )
        info["about"] = (
            f"GPT shape {info['shape']}, Adam state on {info['params_with_optimizer_state']} parameters"
        )
    else:
        sd, info = large_tensors(size_mib, min(args.tensor_mib, size_mib))
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        log = Path(tmp) / "moto_server.log"
        with running_moto_server(log) as server:
            os.environ.update(server.env())  # tessera's s3:// entry point and tensorstore read these
            bench = Bench(server, sd)
            mib = info["bytes"] / MIB
            print(f"state dict: {mib:.1f} MiB in {info['tensors']} tensors; moto at {server.endpoint}")
            notes = tune_raw(bench, args.quick)
            print("raw tuning: " + "; ".join(notes))
            samples: list[dict[str, Any]] = []
            orders = round_orders(len(METHODS))
            for rep in range(repeat):
                samples += run_round(bench, rep, orders[rep % len(orders)])
        text = table(samples)
        print(text)
        if args.markdown:
            section = [
                f"## S3 (moto_server) save/load, {info['bytes'] / MIB:.0f} MiB, {repeat} rounds",
                "",
                *(f"- {line}" for line in environment(log)),
                f"- state dict: {info['bytes'] / MIB:.1f} MiB in {info['tensors']} tensors ({info['about']})",
                f"- raw: multipart {bench.raw.part_bytes // MIB} MiB parts x {bench.raw.parts_in_flight} "
                f"in flight, download by {bench.raw.download} (tuning: {'; '.join(notes)})",
                "",
                text,
                "",
                "",
            ]
            with args.markdown.open("a") as f:
                f.write("\n".join(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
