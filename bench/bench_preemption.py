"""What ``Preemption.stop_requested()`` costs a training loop, to choose how often to ask it.

Two numbers: the call itself between N gloo ranks on one host (one all-reduce of an int32 on
the CPU), and, on a GPU, what a per-step NCCL all-reduce of a flag plus the ``.item()`` that
reads it add to a training step (the read waits for the step's queued GPU work, so the CPU
can no longer run ahead of the GPU). Run: ``python bench/bench_preemption.py --ranks 2 4 8``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

import tessera
import torch
import torch.distributed as dist


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gloo_rank(rank: int, world: int, port: int, calls: int, out: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=dt.timedelta(seconds=60),
    )
    with tessera.Preemption() as preemption:
        for _ in range(50):
            preemption.stop_requested()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            preemption.stop_requested()
        out.put((time.perf_counter() - start) / calls)
    dist.destroy_process_group()


def gloo_call_us(world: int, calls: int) -> float:
    """The median over ranks of one stop_requested() call, in microseconds."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_gloo_rank, args=(r, world, port, calls, out)) for r in range(world)]
    for p in procs:
        p.start()
    times = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return statistics.median(times) * 1e6


def gpu_step_ms(layers: int, width: int, tokens: int, check: bool, steps: int = 60) -> float:
    """Milliseconds per training step of a small transformer, with or without a per-step check."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(width, width // 64, 4 * width, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, layers).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, tokens, width, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")

    def step() -> None:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if check:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            flag.item()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    for world in args.ranks:
        print(
            f"gloo, {world} ranks: stop_requested() {gloo_call_us(world, args.calls):.0f} us per call",
            flush=True,
        )
    if torch.cuda.is_available():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_port()))
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        for layers, width, tokens in ((2, 256, 128), (6, 512, 256), (12, 768, 512)):
            plain = min(gpu_step_ms(layers, width, tokens, False) for _ in range(3))
            checked = min(gpu_step_ms(layers, width, tokens, True) for _ in range(3))
            print(
                f"GPU step, {layers} layers x {width}, 8 x {tokens} tokens: {plain:.2f} ms, "
                f"{checked:.2f} ms with an all-reduce + .item() per step (+{checked - plain:.2f} ms)",
                flush=True,
            )
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
