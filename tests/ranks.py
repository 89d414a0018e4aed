"""Run a test function on real ranks: fresh processes joined in a gloo process group.

Ranks are forked from a forkserver that has already imported torch and tessera,
so a world of four starts in well under a second on a 2-core machine instead
of paying four torch imports per test. A rank's exception comes back with its
traceback; a rank that exits without reporting is reported as ``RankDied``.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

_CONTEXT = mp.get_context("forkserver")
# ``import tessera`` imports its API lazily: preload the API modules themselves, so that each rank
# starts with them imported (must match conformance/generator/multi_writer.py's list).
_CONTEXT.set_forkserver_preload(
    ["torch", "torch.distributed", "torch.distributed.tensor", "torch._dynamo", "numpy", "tessera"]
    + ["tessera.api.load", "tessera.api.run_dir", "tessera.api.verify"]
)


@dataclass(frozen=True)
class RankDied:
    """What ``run_ranks`` returns for a rank that exited without a result."""

    exitcode: int | None


class RanksFailed(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out: Any,
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=dt.timedelta(seconds=timeout_s),
        )
        # Plain pickle copies tensors by value; the queue's own pickler would share them
        # through this process, which exits before the parent reads them.
        result = pickle.dumps(fn(rank, world_size, *args))
        out.put((rank, True, result))
    except BaseException as exc:  # reported to the parent with the traceback
        out.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    allow_death: bool = False,
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; the list of their return values.

    ``fn`` must be a module-level function (it is pickled by name). With
    ``allow_death`` a rank that exits without a result yields ``RankDied``
    instead of failing the test, and other ranks' errors come back as strings.
    """
    port = _free_port()
    results: Any = _CONTEXT.Queue()
    procs = [
        _CONTEXT.Process(
            target=_rank_main,
            args=(rank, world_size, port, collective_timeout_s, fn, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = dt.datetime.now() + dt.timedelta(seconds=timeout_s)
    while len(got) < world_size and dt.datetime.now() < deadline:
        try:
            rank, ok, value = results.get(timeout=0.2)
            got[rank] = (ok, value)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    failures = [f"rank {r}: {v}" for r, (ok, v) in sorted(got.items()) if not ok]
    silent = [r for r in range(world_size) if r not in got]
    if not allow_death and (failures or silent):
        died = [f"rank {r} exited with code {procs[r].exitcode} and no result" for r in silent]
        raise RanksFailed("\n".join(failures + died))
    results = []
    for rank in range(world_size):
        if rank not in got:
            results.append(RankDied(procs[rank].exitcode))
        else:
            ok, value = got[rank]
            results.append(pickle.loads(value) if ok else value)
    return results
