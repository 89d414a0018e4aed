"""Durable save / cold load throughput of Tessera against raw I/O and the usual formats.

One run builds one deterministic GPT-like training state dict (bf16 weights plus fp32
Adam state and fp32 master weights), then, for each method, saves it into a fresh
directory, drops the page cache of the written files, loads it back, and checks the
load bit-exact against the source. Every number in a run is compared with the raw
write and raw read measured in that same run.

A save is timed from the call until the checkpoint is *durable*, i.e. a power loss
right after it could not lose it:

- raw:         one file per tensor, ``os.write`` straight from the tensor's memory;
               then ``fsync`` of every file, of the checkpoint directory and of its
               parent (the directory is new).
- torch.save:  ``torch.save`` of the whole state dict to one file, then ``fsync`` of
               that file and of its directory.
- dcp:         ``torch.distributed.checkpoint.save`` with ``FileSystemWriter(path,
               sync_files=True)`` (fsyncs the data files and ``.metadata``), single
               process, no process group; DCP does not fsync directories, so the
               checkpoint directory and its parent are fsynced after it returns.
- safetensors: ``safetensors.torch.save_file`` of the state dict flattened to
               '.'-joined keys (the flattening is timed), then ``fsync`` of the file
               and of its directory.
- tessera:     ``tessera.save(state_dict, path)``, durable when it returns (it fsyncs
               every file and every new directory before publishing the root).

A load is timed from the call until every page of every loaded tensor has been
touched (so lazily mmapped results, as safetensors', pay for their reads inside the
timing). Before every load the page cache of the checkpoint's files is dropped with
``posix_fadvise(DONTNEED)`` and, where permitted, ``/proc/sys/vm/drop_caches``; the
bytes still resident are recorded (``fincore``) to show the load really read the disk.
In-place loads (raw readinto, dcp.load, tessera.load(path, sd)) fill a preallocated
state dict that is poisoned with 0xFF bytes before each load; the others return new
tensors. GB/s is payload bytes (the tensors' bytes) / seconds / 1e9.

Run ``python bench/bench_save_load.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

StateDict = dict[Any, Any]
KeyPath = tuple[Any, ...]
GB = 1e9
PAGE = 4096


class BenchmarkError(RuntimeError):
    """A load did not give back the saved bytes, or a method broke its contract."""


# -- the state dict ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    layers: int
    vocab: int
    context: int


def choose_shape(target_bytes: int) -> ModelShape:
    """The widest GPT-2-style shape whose full training state (14 B/param) reaches the target."""
    budget = target_bytes / 14  # bf16 weight + fp32 exp_avg, exp_avg_sq, master
    for d in (2048, 1536, 1280, 1024, 768, 512, 384, 256, 128, 64):
        vocab = 50304 if d >= 768 else 32000 if d >= 512 else 8192
        context = 1024 if d >= 512 else 512
        embed, per_layer = (vocab + context) * d, 12 * d * d + 13 * d
        if embed + 2 * per_layer <= budget or d == 64:
            layers = max(2, math.ceil((budget - embed) / per_layer))
            return ModelShape(d, layers, vocab, context)
    raise AssertionError("unreachable")


def param_shapes(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2 parameter names and shapes (lm_head tied to wte), in model order."""
    d = shape.d_model
    params: list[tuple[str, tuple[int, ...]]] = [
        ("wte.weight", (shape.vocab, d)), ("wpe.weight", (shape.context, d)),
    ]
    for i in range(shape.layers):
        p = f"h.{i}."
        params += [
            (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (3 * d, d)), (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (4 * d, d)), (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (d, 4 * d)), (p + "mlp.c_proj.bias", (d,)),
        ]
    return params + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def build_state_dict(target_bytes: int, seed: int) -> tuple[StateDict, dict[str, Any]]:
    """{"model": {name: bf16}, "optimizer": {"state": {i: {step, exp_avg, exp_avg_sq,
    master_param}}}}; optimizer state covers the longest prefix of parameters that keeps
    the total within the target (the rest live on "another rank")."""
    shape = choose_shape(target_bytes)
    params = param_shapes(shape)
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    remaining = target_bytes - 2 * sum(math.prod(s) for _, s in params)
    for idx, (name, dims) in enumerate(params):
        numel = math.prod(dims)
        std = 0.02 if len(dims) == 2 else 0.1
        master = torch.randn(dims, generator=gen) * std
        if ".ln_" in f".{name}" and name.endswith(".weight"):
            master += 1.0  # layernorm gains sit near 1
        model[name] = master.to(torch.bfloat16)
        if len(opt_state) == idx and 12 * numel + 4 <= remaining:
            remaining -= 12 * numel + 4
            opt_state[idx] = {
                "step": torch.tensor(1000.0),
                "exp_avg": torch.randn(dims, generator=gen) * 1e-3,
                "exp_avg_sq": (torch.randn(dims, generator=gen) * 1e-3).square(),
                "master_param": master,
            }
    sd: StateDict = {"model": model, "optimizer": {"state": opt_state}}
    info = {
        "shape": shape.__dict__, "parameters": sum(math.prod(s) for _, s in params),
        "params_with_optimizer_state": f"{len(opt_state)}/{len(params)}",
        "tensors": sum(1 for _ in leaves(sd)), "bytes": payload_bytes(sd),
    }
    return sd, info


def leaves(tree: StateDict, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, torch.Tensor]]:
    """Every tensor of a nested dict with its key path, in insertion order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def flatten(tree: StateDict) -> dict[str, torch.Tensor]:
    """One level of '.'-joined keys (what safetensors can hold)."""
    return {".".join(map(str, path)): t for path, t in leaves(tree)}


def empty_like_tree(tree: StateDict) -> StateDict:
    return {k: empty_like_tree(v) if isinstance(v, dict) else torch.empty_like(v)
            for k, v in tree.items()}


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (no copy); tensors here are contiguous."""
    return t.reshape(-1).view(torch.uint8)


def memory(t: torch.Tensor) -> memoryview:
    """A writable memoryview of the tensor's own bytes, for os.write / readinto."""
    return memoryview(cast(Any, byte_view(t).numpy()))


def payload_bytes(tree: StateDict) -> int:
    return sum(t.numel() * t.element_size() for _, t in leaves(tree))


def poison(tree: StateDict) -> None:
    """Fill with 0xFF (NaN in bf16/fp32, never in the source) so a skipped tensor fails."""
    for _, t in leaves(tree):
        byte_view(t).fill_(0xFF)


def touch_pages(tree: StateDict) -> None:
    """Read one byte of every page of every tensor, forcing lazily mapped data in."""
    for _, t in leaves(tree):
        b = byte_view(t)
        if b.numel():
            int(b[::PAGE].sum())


def verify(expected: StateDict, actual: Any, what: str) -> None:
    """Same keys, dtypes, shapes and bytes; raises BenchmarkError on the first difference."""
    if not isinstance(actual, dict):
        raise BenchmarkError(f"{what}: expected a dict, got {type(actual).__name__}")
    if set(actual) != set(expected):
        diff = sorted(map(repr, set(expected) ^ set(actual)))
        raise BenchmarkError(f"{what}: keys differ: {diff[:5]}")
    for key, want in expected.items():
        got, where = actual[key], f"{what}[{key!r}]"
        if isinstance(want, dict):
            verify(want, got, where)
        elif not isinstance(got, torch.Tensor):
            raise BenchmarkError(f"{where}: expected a tensor, got {type(got).__name__}")
        elif (got.dtype, got.shape) != (want.dtype, want.shape):
            raise BenchmarkError(f"{where}: expected {want.dtype} {tuple(want.shape)}, "
                                 f"got {got.dtype} {tuple(got.shape)}")
        elif not torch.equal(byte_view(want), byte_view(got.contiguous())):
            raise BenchmarkError(f"{where}: bytes differ from the saved tensor")


# -- durability and the page cache ---------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def drop_cache(path: Path) -> dict[str, Any]:
    """Evict the checkpoint's pages: fadvise(DONTNEED) per file, then drop_caches if allowed."""
    files = files_under(path)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    dropped = True
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as knob:
            knob.write("1\n")
    except OSError:
        dropped = False
    return {"fadvise_files": len(files), "drop_caches": dropped,
            "resident_bytes": resident_bytes(files)}


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of these files in the page cache (util-linux fincore), or None if unavailable."""
    if not files or shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          *map(str, files)], capture_output=True, text=True)
    return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else None


# -- the methods ---------------------------------------------------------------------------


def raw_save(sd: StateDict, path: Path) -> None:
    path.mkdir()
    files = [path / f"{i:06d}.bin" for i, _ in enumerate(leaves(sd))]
    for file, (_, t) in zip(files, leaves(sd), strict=True):
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, memory(t))
        finally:
            os.close(fd)
    for file in files:  # all writes first, so writeback overlaps the copying
        fsync_path(file)
    fsync_path(path)
    fsync_path(path.parent)


def raw_load(path: Path, into: StateDict) -> StateDict:
    for i, (key, t) in enumerate(leaves(into)):
        view = memory(t)
        with open(path / f"{i:06d}.bin", "rb", buffering=0) as f:
            while view:
                n = f.readinto(view)
                if not n:
                    raise BenchmarkError(f"raw: {key} is short by {len(view)} bytes")
                view = view[n:]
    return into


def torch_save(sd: StateDict, path: Path) -> None:
    torch.save(sd, path)
    fsync_path(path)
    fsync_path(path.parent)


def torch_load(path: Path, _into: StateDict) -> StateDict:
    return torch.load(path, map_location="cpu", weights_only=True)


def dcp_save(sd: StateDict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path, sync_files=True))
    fsync_path(path)
    fsync_path(path.parent)


def dcp_load(path: Path, into: StateDict) -> StateDict:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(into, storage_reader=dcp.FileSystemReader(path))
    return into


def safetensors_save(sd: StateDict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(flatten(sd), str(path))
    fsync_path(path)
    fsync_path(path.parent)


def safetensors_load(path: Path, _into: StateDict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def tessera_save(sd: StateDict, path: Path) -> None:
    import tessera

    tessera.save(sd, path)


def tessera_load_into(path: Path, into: StateDict) -> StateDict:
    import tessera

    tessera.load(path, into)
    return into


def tessera_load_new(path: Path, _into: StateDict) -> StateDict:
    import tessera

    return tessera.load(path)


def tessera_missing() -> list[str] | str:
    """What tessera lacks of save/load (empty when ready), or why it cannot be imported."""
    try:
        import tessera
    except Exception as exc:  # noqa: BLE001 - any import failure means "not ready"
        return f"import tessera failed: {exc!r}"
    return [n for n in ("save", "load") if not callable(getattr(tessera, n, None))]


@dataclass(frozen=True)
class Load:
    api: str
    fn: Callable[[Path, StateDict], Any]
    in_place: bool  # fills the preallocated state dict
    flat: bool = False  # returns '.'-joined keys


@dataclass(frozen=True)
class Method:
    name: str
    target: str  # file or directory name inside the method's fresh directory
    save: Callable[[StateDict, Path], None]
    loads: tuple[Load, ...]


METHODS = (
    Method("raw", "raw", raw_save, (Load("readinto", raw_load, True),)),
    Method("torch.save", "model.pt", torch_save, (Load("torch.load", torch_load, False),)),
    Method("dcp", "dcp", dcp_save, (Load("dcp.load, in place", dcp_load, True),)),
    Method("safetensors", "model.safetensors", safetensors_save,
           (Load("load_file", safetensors_load, False, flat=True),)),
    Method("tessera", "ckpt", tessera_save,
           (Load("load(path, sd), in place", tessera_load_into, True),
            Load("load(path), new dict", tessera_load_new, False))),
)


# -- running -------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load_and_touch(load: Load, target: Path, into: StateDict) -> Any:
    result = load.fn(target, into)
    touch_pages(result)
    return result


def run_load(
    load: Load, target: Path, sd: StateDict, into: StateDict
) -> tuple[float, dict[str, Any]]:
    """Cold-load once (cache dropped, destination poisoned) and verify; seconds, cache info."""
    if load.in_place:
        poison(into)
    cache = drop_cache(target)
    gc.collect()
    seconds, result = timed(lambda: load_and_touch(load, target, into))
    verify(flatten(sd) if load.flat else sd, result, f"{load.api}")
    del result
    return seconds, cache


def run_method(method: Method, sd: StateDict, into: StateDict, workdir: Path, rep: int,
               nbytes: int) -> list[dict[str, Any]]:
    """Save once into a fresh directory, load with each API, remove it; one sample per op."""
    home = workdir / f"r{rep}-{method.name}"
    home.mkdir()
    fsync_path(workdir)
    target = home / method.target
    os.sync()  # start from a quiet disk: no one else's dirty pages flushed inside our timing
    seconds, _ = timed(lambda: method.save(sd, target))
    samples = [{"repeat": rep, "method": method.name, "op": "save", "api": "",
                "seconds": seconds, "gbps": nbytes / seconds / GB}]
    for load in method.loads:
        seconds, cache = run_load(load, target, sd, into)
        samples.append({"repeat": rep, "method": method.name, "op": "load", "api": load.api,
                        "seconds": seconds, "gbps": nbytes / seconds / GB, "cache": cache})
    shutil.rmtree(home)
    os.sync()
    return samples


def run_all(
    methods: list[Method], sd: StateDict, workdir: Path, repeat: int, warmup: int
) -> list[dict[str, Any]]:
    """Every method once per repeat, starting one method later each repeat (round-robin);
    the first ``warmup`` rounds are run the same way and thrown away."""
    into, nbytes, samples = empty_like_tree(sd), payload_bytes(sd), []
    for rep in range(-warmup, repeat):
        for k in range(len(methods)):
            method = methods[(rep + k) % len(methods)]
            new = run_method(method, sd, into, workdir, rep, nbytes)
            done = ", ".join(f"{s['op']} {s['api']} {s['gbps']:.2f} GB/s".replace("  ", " ")
                             for s in new)
            label = "warm-up" if rep < 0 else f"{rep + 1}/{repeat}"
            print(f"  [{label}] {method.name}: {done}", flush=True)
            if rep >= 0:
                samples += new
    return samples


def summarize(samples: list[dict[str, Any]], methods: list[Method]) -> list[dict[str, Any]]:
    """One row per (method, load API): best and median GB/s, and the same over raw's."""

    def stats(method: str, op: str, api: str = "") -> dict[str, float]:
        v = [s["gbps"] for s in samples if (s["method"], s["op"], s["api"]) == (method, op, api)]
        return {"best": max(v), "median": statistics.median(v)}

    def cells(op: str, mine: dict[str, float] | None, raw: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in ("best", "median"):
            out[f"{op}_gbps_{k}"] = mine[k] if mine else None
            out[f"{op}_ratio_{k}"] = mine[k] / raw[k] if mine else None
        return out

    raw_save, raw_load = stats("raw", "save"), stats("raw", "load", "readinto")
    rows = []
    for m in methods:
        for i, load in enumerate(m.loads or (None,)):
            rows.append({
                "method": m.name, "load_api": load.api if load else "(none)",
                **cells("save", stats(m.name, "save") if i == 0 else None, raw_save),
                **cells("load", stats(m.name, "load", load.api) if load else None, raw_load),
            })
    return rows


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    """The results, each cell 'best / median'; ratios are best÷raw best / median÷raw median."""
    def pair(row: dict[str, Any], key: str) -> str:
        b = row[f"{key}_best"]
        return "" if b is None else f"{b:.2f} / {row[f'{key}_median']:.2f}"

    head = ["method", "load API", "save GB/s", "save ÷ raw", "load GB/s", "load ÷ raw read"]
    body = [[r["method"], r["load_api"], pair(r, "save_gbps"), pair(r, "save_ratio"),
             pair(r, "load_gbps"), pair(r, "load_ratio")] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(c) + " |" for c in [head, ["---"] * len(head), *body])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    pad = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body]]
    return "\n".join(line.rstrip() for line in pad)


def environment(workdir: Path) -> dict[str, Any]:
    def sh(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

    meminfo = Path("/proc/meminfo").read_text().splitlines()[0].split()
    def version(module: str) -> str | None:
        try:
            return str(__import__(module).__version__)
        except Exception:  # noqa: BLE001 - absent or broken: just not reported
            return None

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "uname": sh("uname", "-a"), "nproc": os.cpu_count(),
        "memory_gib": round(int(meminfo[1]) / 2**20, 1), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "safetensors": version("safetensors"), "tessera": version("tessera"),
        "filesystem": sh("df", "-T", str(workdir)),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def cache_note(samples: list[dict[str, Any]]) -> str:
    caches = [s["cache"] for s in samples if s["op"] == "load"]
    resident = [c["resident_bytes"] for c in caches if c["resident_bytes"] is not None]
    ran = "posix_fadvise(DONTNEED) on every file" + (
        " + /proc/sys/vm/drop_caches" if all(c["drop_caches"] for c in caches)
        else " (drop_caches not permitted)" if not any(c["drop_caches"] for c in caches)
        else " + drop_caches (only on some loads)")
    return ran + (f"; at most {max(resident)} checkpoint bytes resident before a load"
                  if resident else "; residency not measured (no fincore)")


def markdown_section(env: dict[str, Any], info: dict[str, Any], rows: list[dict[str, Any]],
                     notes: list[str]) -> str:
    lines = [
        f"## Save/load throughput, {env['date']}", "",
        f"- machine: `{env['uname']}`, {env['nproc']} CPUs, {env['memory_gib']} GiB memory",
        f"- python {env['python']}, torch {env['torch']} ({env['torch_threads']} threads), "
        f"safetensors {env['safetensors']}, tessera {env['tessera']}",
        "- filesystem of --dir:", "", "```", env["filesystem"], "```", "",
        f"- command: `{env['command']}`",
        f"- state dict: {info['bytes'] / 2**30:.3f} GiB in {info['tensors']} tensors, GPT shape "
        f"{info['shape']}, optimizer state on {info['params_with_optimizer_state']} parameters",
        *(f"- {n}" for n in notes), "",
        "Cells are best / median over the timed rounds; "
        "ratios are best ÷ raw best / median ÷ raw median.",
        "", table(rows, markdown=True), "", "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="state dict size (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="64 MiB state dict, for smoke tests (overrides --size-gib)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed rounds of every method (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unrecorded rounds of every method before the timed ones (default 1)")
    p.add_argument("--dir", type=Path, default=None,
                   help="parent of the scratch directory (default: a temp dir under /tmp)")
    p.add_argument("--methods", default=",".join(m.name for m in METHODS),
                   help="comma-separated subset; raw is always run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path, help="append a markdown section to this file")
    p.add_argument("--json", type=Path, help="write machine-readable results to this file")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.size_gib <= 0:
        p.error("need --repeat >= 1, --warmup >= 0 and --size-gib > 0")
    return args


def select_methods(names: str) -> tuple[list[Method], list[str]]:
    """The requested methods (raw first), and notes on those that cannot run (fully)."""
    wanted = {"raw", *(n.strip() for n in names.split(",") if n.strip())}
    unknown = wanted - {m.name for m in METHODS}
    if unknown:
        raise SystemExit(f"unknown methods: {sorted(unknown)}")
    methods, notes = [m for m in METHODS if m.name in wanted], []
    if "tessera" in wanted and (missing := tessera_missing()):
        i = [m.name for m in methods].index("tessera")
        if missing == ["load"]:  # save is there: measure it, loads wait for tessera.load
            methods[i] = Method("tessera", "ckpt", tessera_save, ())
            notes.append("tessera loads skipped: tessera has no load() yet")
        else:
            del methods[i]
            notes.append(f"tessera skipped: {missing if isinstance(missing, str) else 'no save()'}")
    return methods, notes


def preimport(methods: list[Method]) -> None:
    """Import every method's library now, so no import lands inside a timing."""
    names = {"dcp": "torch.distributed.checkpoint", "safetensors": "safetensors.torch",
             "tessera": "tessera"}
    for m in methods:
        if m.name in names:
            __import__(names[m.name])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods, notes = select_methods(args.methods)
    preimport(methods)
    size = 1 / 16 if args.quick else args.size_gib
    sd, info = build_state_dict(int(size * 2**30), args.seed)
    print(f"state dict: {info['bytes'] / 2**30:.3f} GiB, {info['tensors']} tensors, "
          f"{info['shape']}, optimizer state on {info['params_with_optimizer_state']} params",
          flush=True)
    for n in notes:
        print(n, flush=True)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tessera-bench-", dir=args.dir or "/tmp"))
    try:
        env = environment(workdir)
        samples = run_all(methods, sd, workdir, args.repeat, args.warmup)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarize(samples, methods)
    notes.append(f"{args.repeat} timed round(s), round-robin, after {args.warmup} unrecorded "
                 "warm-up round(s)")
    notes.append(f"cache drop before each load: {cache_note(samples)}")
    print("\n" + table(rows, markdown=False))
    print("cells: best / median; ratios: best ÷ raw best / median ÷ raw median, same run")
    for n in notes:
        print(n)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(markdown_section(env, info, rows, notes))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "state_dict": info, "notes": notes,
                                         "summary": rows, "samples": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
