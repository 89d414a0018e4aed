"""Sharded save and load from several GPUs through NCCL, one process a GPU (issue 3, item 8).

Run with ``torchrun --nproc-per-node N bench/bench_sharded_gpu.py [--gib 8] [--dir PATH]``.

The state: ``--gib`` GiB of bf16 weights as ``DTensor`` s on a 1-d mesh of the
N GPUs, alternately ``Shard(0)`` (column-parallel) and ``Shard(1)``
(row-parallel), a few replicated norms, and an fp32 optimizer buffer held
as flat ranges whose boundaries fall mid-row (so some chunks are assembled
from two ranks' pieces over NCCL). Every tensor is a function of its key,
so any rank can check any region it loads bit for bit.

What is measured, in one run, all ranks together (barrier to barrier):

- the anchor: each rank copies its shards to host memory and writes them to
  one file with fsync (what the save must at least do);
- ``tessera.save`` of the sharded state (durable; rank 0 commits);
- ``tessera.load`` into the same layout, and into the transposed layout
  (``Shard(0)`` weights loaded as ``Shard(1)`` and back), each rank reading
  only the chunks that overlap its boxes, into GPU memory; and the transposed
  load again with ``process_group`` (loading together: each chunk read from
  disk by one rank, pieces sent over NCCL). Every loaded tensor is compared
  bit for bit with the expected values.

Page cache: loads are measured after ``drop_caches`` when the machine allows
it (reported), else warm.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import tessera
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

ROWS = 8192
COLS = 8192


def expected(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The global tensor stored under ``key``: seeded from the key, generated on this GPU."""
    gen = torch.Generator(device="cuda").manual_seed(sum(ord(c) * 131**i for i, c in enumerate(key)) % 2**63)
    return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def weights(gib: float) -> list[tuple[str, int]]:
    """Keys of the bf16 weights and the dim each is sharded on in the saving layout."""
    count = max(2, round(gib * 2**30 / (ROWS * COLS * 2)))
    return [(f"layers/{i}/{'qkv' if i % 2 == 0 else 'proj'}.weight", i % 2) for i in range(count)]


def sharded_state(gib: float, mesh: Any, flip: bool, rank: int, world: int) -> dict[str, Any]:
    """The state dict of this rank; ``flip`` swaps every weight's sharded dimension."""
    state: dict[str, Any] = {"model": {}, "optimizer": {}}
    for key, dim in weights(gib):
        full = expected(key, (ROWS, COLS), torch.bfloat16)
        state["model"][key] = distribute_tensor(
            full, mesh, [Shard(1 - dim if flip else dim)], src_data_rank=None
        )
        del full
    for i in range(4):
        key = f"layers/{i}/norm.weight"
        state["model"][key] = distribute_tensor(
            expected(key, (COLS,), torch.bfloat16), mesh, [Replicate()], src_data_rank=None
        )
    # An fp32 optimizer buffer, flat ranges at uneven element boundaries (mid-row).
    key, shape = "optimizer/exp_avg", (ROWS, COLS // 2)
    total = shape[0] * shape[1]
    offset = 0 if not flip else 1
    bounds = [0, *[min(total, total * r // world + 1000 * (r + offset)) for r in range(1, world)], total]
    full = expected(key, shape, torch.float32).reshape(-1)
    state["optimizer"]["exp_avg"] = tessera.ShardedTensor(
        full[bounds[rank] : bounds[rank + 1]].clone(),
        shape,
        (0, 0),
        box_shape=shape,
        flat_range=(bounds[rank], bounds[rank + 1]),
    )
    state["step"] = 1000
    return state


def local_bytes(state: dict[str, Any]) -> list[torch.Tensor]:
    out = []
    for value in [*state["model"].values(), *state["optimizer"].values()]:
        out.append(value.to_local() if isinstance(value, DTensor) else value.local)
    return out


def check(state: dict[str, Any], gib: float, flip: bool, mesh: Any, rank: int, world: int) -> int:
    """Compare every loaded value with what it must be; the number of mismatching tensors."""
    want = sharded_state(gib, mesh, flip, rank, world)
    bad = 0
    for group in ("model", "optimizer"):
        for key, value in want[group].items():
            got = state[group][key]
            a = got.to_local() if isinstance(got, DTensor) else got
            b = value.to_local() if isinstance(value, DTensor) else value.local
            bad += not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return bad


def empty_like_state(state: dict[str, Any]) -> dict[str, Any]:
    """A template of the same layout with every local shard zeroed (loading must fill it)."""
    out: dict[str, Any] = {"model": {}, "optimizer": {}, "step": 0}
    for key, value in state["model"].items():
        out["model"][key] = DTensor.from_local(
            torch.zeros_like(value.to_local()),
            value.device_mesh,
            value.placements,
            shape=value.shape,
            stride=value.stride(),
        )
    for key, value in state["optimizer"].items():
        out["optimizer"][key] = tessera.ShardedTensor(
            torch.zeros_like(value.local),
            value.global_shape,
            value.global_offset,
            box_shape=value.box_shape,
            flat_range=value.flat_range,
        )
    return out


def timed(fn: Any) -> float:
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=8.0, help="GiB of bf16 weights (default 8)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tessera-gpu-bench"))
    parser.add_argument("--report", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    mesh = init_device_mesh("cuda", (world,))
    if rank == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
        args.dir.mkdir(parents=True)
    state = sharded_state(args.gib, mesh, False, rank, world)
    mine = local_bytes(state)
    nbytes_local = sum(t.numel() * t.element_size() for t in mine)
    total = torch.tensor([nbytes_local], device="cuda")
    dist.all_reduce(total)
    results: dict[str, Any] = {"world": world, "local_bytes": nbytes_local, "all_ranks_bytes": int(total)}

    def raw_write() -> None:
        with open(args.dir / f"raw-{rank}.bin", "wb") as f:
            for t in mine:
                f.write(t.cpu().contiguous().view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())

    results["raw_write_s"] = timed(raw_write)
    path = args.dir / "ckpt"
    results["save_s"] = timed(lambda: tessera.save(state, path, parallelism={"tp": world}))
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if rank == 0 else 0
    results["stored_bytes"] = stored
    loads = (
        ("load_same_layout", False, None),
        ("load_transposed_layout", True, None),
        ("load_transposed_layout_together", True, dist.group.WORLD),
    )
    for name, flip, group in loads:
        layout = sharded_state(args.gib, mesh, flip, rank, world) if flip else state
        template = empty_like_state(layout)
        del layout
        dist.barrier()
        cold = drop_caches() if rank == 0 else False
        results[f"{name}_cold"] = cold
        results[f"{name}_s"] = timed(
            lambda template=template, group=group: tessera.load(path, template, process_group=group)
        )
        bad = torch.tensor([check(template, args.gib, flip, mesh, rank, world)], device="cuda")
        dist.all_reduce(bad)
        results[f"{name}_mismatching_tensors"] = int(bad)
        del template
    if rank == 0:
        gb = results["all_ranks_bytes"] / 1e9
        results.update(
            date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            gpu=torch.cuda.get_device_name(0),
            torch=torch.__version__,
            python=platform.python_version(),
            raw_write_GBps=gb / results["raw_write_s"],
            save_GBps=gb / results["save_s"],
            save_over_raw=results["raw_write_s"] / results["save_s"],
            load_same_layout_GBps=gb / results["load_same_layout_s"],
            load_transposed_layout_GBps=gb / results["load_transposed_layout_s"],
            load_transposed_layout_together_GBps=gb / results["load_transposed_layout_together_s"],
        )
        print(json.dumps(results, indent=1))
        if args.report:
            args.report.write_text(json.dumps(results, indent=1))
        shutil.rmtree(args.dir, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
