"""Tessera across ranks: an FSDP2 GPT saved by 4 ranks, killed, resumed at 2 ranks bit-exactly.

What it shows, in order:

1. Four ranks (``torch.distributed``, gloo, real processes) train the small GPT of
   ``train_gpt.py`` with FSDP2 (``fully_shard``: each rank holds a quarter of every
   weight and of AdamW's moments), a warmup LR scheduler, dropout, and a data
   loader whose windows jitter with Python's ``random`` and whose tokens are
   masked through NumPy's. After K steps all four save one checkpoint through a
   ``tessera.Checkpointer``: model and optimizer (``tessera.ModelAndOptimizer``),
   scheduler, every rank's RNG states (``tessera.RNGState``), the data position
   and the config. The parent process SIGKILLs the four once ``latest`` names it.
2. Run A: two ranks load that checkpoint (each reads only its half of every
   tensor) and train straight to step N. Right after the load, the state
   gathered whole must equal the four ranks' saved state, bit for bit.
3. Run B: two ranks load the same checkpoint, train to step M, save, and are
   SIGKILLed; two fresh ranks load ``latest`` and train to step N. B's losses and
   final weights must equal A's bit for bit: PASS or FAIL (exit status 1 on FAIL).

Dropout, the data jitter and the masks draw from each rank's own generators, so
B matches A only if the RNG states, the data position, the optimizer and the
scheduler all came back. Two ranks run the math of two ranks (each reduces the
gradients over 2), which is why B is compared with A and not with the 4-rank run.

Run: ``python refimpl/examples/train_sharded.py [--out DIR]`` (about 35 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing as mp
import os
import random
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tessera
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpt import GPT, Config, prepare, synthetic_corpus  # noqa: E402

MUST_MATCH = ["vocab", "seq_len", "d_model", "n_head", "n_layer"]
"""Config keys a resume must share with the checkpoint; the others (world_size) may differ."""

TIMEOUT_S = 300
"""A launch whose ranks take longer is killed and reported as failed."""


@dataclass(frozen=True)
class Phase:
    """One launch of the job: ``world`` ranks load (or start fresh), train to ``until``, and
    either finish or save at ``until`` and wait for the parent's SIGKILL."""

    name: str
    world: int
    until: int
    load_step: int | None = None
    """The step to load; ``None``: the run's ``latest`` (a fresh start if it has none)."""
    save_and_die: bool = False


class Batches:
    """The data loader: ``position`` (global batches consumed) is its whole state, saved as
    a stateful object. Each rank takes its rows of the global batch."""

    def __init__(self, corpus: np.ndarray, cfg: Config, rank: int, world: int) -> None:
        self.corpus, self.cfg, self.rank, self.world = corpus, cfg, rank, world
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, rows = self.cfg, self.cfg.batch // self.world
        n = cfg.batch * (cfg.seq_len + 1)
        start = self.position * n + random.randrange(cfg.seq_len)  # Python RNG: this rank's jitter
        start %= len(self.corpus) - n
        window = self.corpus[start : start + n].reshape(cfg.batch, cfg.seq_len + 1)
        window = window[self.rank * rows : (self.rank + 1) * rows].copy()
        mask = np.random.random(window[:, :-1].shape) < 0.05  # NumPy RNG: this rank's masks
        window[:, :-1][mask] = 0
        self.position += 1
        return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def build(cfg: Config, rank: int, world: int) -> dict[str, Any]:
    """The live objects of one rank, as the state dict that the Checkpointer saves and loads."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, before sharding
    model = GPT(cfg)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup))
    # Each rank its own draws (dropout, jitter, masks); a resume must restore them, not reseed.
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    return {
        "train": tessera.ModelAndOptimizer(model, optimizer),
        "scheduler": scheduler,
        "rng": tessera.RNGState(),
        "data": Batches(synthetic_corpus(cfg), cfg, rank, world),
    }


def train_step(state: dict[str, Any], cfg: Config) -> float:
    """One step; the mean loss over all ranks (the same float on every rank)."""
    model, optimizer = state["train"].model, state["train"].optimizers
    inputs, targets = state["data"].next()
    model.train()
    loss = F.cross_entropy(model(inputs).view(-1, cfg.vocab), targets.reshape(-1))
    loss.backward()  # FSDP2 reduce-scatters the gradients: each rank keeps its shard
    optimizer.step()
    optimizer.zero_grad()
    state["scheduler"].step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / dist.get_world_size()


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """What the comparisons need: every weight and AdamW tensor gathered whole (a collective),
    the scheduler's step, the data position, and a fingerprint of this rank's RNG states."""
    model, optimizer = state["train"].model, state["train"].optimizers
    full = {}
    for name, param in model.named_parameters():
        full[name] = param.full_tensor()
        for key, value in optimizer.state[param].items():
            # AdamW's step count is a plain tensor, stepped in place later: copy it
            full[f"{name}/{key}"] = value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
    rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    rng.update(repr(random.getstate()).encode())
    rng.update(repr(np.random.get_state(legacy=False)).encode())
    return {
        "full": full,
        "lr_step": state["scheduler"].last_epoch,
        "position": state["data"].position,
        "rng": rng.hexdigest()[:16],
    }


def rank_main(rank: int, phase: Phase, cfg: Config, root: Path, port: int, results: Path) -> None:
    """One rank of one phase. Writes ``results/<phase>-<rank>.pt`` before any save, and after the
    last step, so that what a killed phase did is known to the parent."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=phase.world)
    state = build(cfg, rank, phase.world)
    config = {**dataclasses.asdict(cfg), "world_size": phase.world}
    report: dict[str, Any] = {"losses": {}}
    with tessera.Checkpointer(root, config=config, must_match=MUST_MATCH, keep_last=3) as ckpt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", tessera.TesseraWarning)
            resumed = ckpt.load(state, step=phase.load_step)
        report["resumed"] = {
            "step": resumed.step,
            "from": Path(resumed.path).name if resumed.path else None,
            "warnings": [str(w.message) for w in caught],
        }
        report["loaded"] = snapshot(state)
        for step in range(resumed.step + 1, phase.until + 1):
            report["losses"][step] = train_step(state, cfg)
        report["final"] = snapshot(state)
        torch.save(report, results / f"{phase.name}-{rank}.pt")
        if phase.save_and_die:
            ckpt.save(phase.until, state)  # one checkpoint, every rank writing its shards
            time.sleep(120)  # a real job trains on; this one waits for the parent's SIGKILL
            sys.exit(f"rank {rank}: not killed within 120 s")
    dist.destroy_process_group()
    # Done, results on disk: skip the interpreter's teardown, in which a gloo rank at times
    # aborted ("terminate called without an active exception") after destroy_process_group.
    sys.stdout.flush()
    os._exit(0)


def launch(ctx: Any, phase: Phase, cfg: Config, root: Path, results: Path) -> list[dict[str, Any]]:
    """Run ``phase`` on ``phase.world`` fresh processes; SIGKILL them once its save is ``latest``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=rank_main, args=(r, phase, cfg, root, port, results), daemon=True)
        for r in range(phase.world)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    run, name = tessera.RunDirectory(root), tessera.RunDirectory.name_of(phase.until)
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.is_alive() for p in procs):
        failed = any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline
        if failed or phase.save_and_die and run.latest() == run.root / name:
            for p in procs:
                p.kill()  # SIGKILL: the moment the commit is visible (or the ranks of a failed run)
            break
        time.sleep(0.05)
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    expected = -signal.SIGKILL if phase.save_and_die else 0
    print(f"   {phase.world} processes, {time.perf_counter() - start:.1f} s, exit codes {codes}")
    if any(code != expected for code in codes):
        raise SystemExit(f"{phase.name}: the ranks exited with {codes}, expected {expected}")
    return [torch.load(results / f"{phase.name}-{r}.pt") for r in range(phase.world)]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-run-sharded"), help="output folder")
    parser.add_argument("--steps", type=int, default=12, help="N: steps in all")
    parser.add_argument("--save-at", type=int, default=4, help="K: the 4 ranks save after K steps")
    parser.add_argument("--crash-at", type=int, default=8, help="M: run B saves after M steps and is killed")
    args = parser.parse_args()
    if not 0 < args.save_at < args.crash_at < args.steps:
        parser.error("need 0 < --save-at < --crash-at < --steps")
    cfg = replace(Config(), batch=8)  # 8 sequences a step: 2 a rank at 4 ranks, 4 at 2
    prepare(args.out)
    root, results = args.out / "run", args.out / "results"
    results.mkdir()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Ranks fork from a server that has imported torch and tessera once, not once per rank.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch.distributed.checkpoint.state_dict"])
    k, m, n = args.save_at, args.crash_at, args.steps
    params = sum(p.numel() for p in GPT(cfg).parameters())
    print(f"Tessera sharded demo: GPT, {params / 1e6:.2f}M parameters, FSDP2 (fully_shard) on gloo ranks\n")

    print(f"1. 4 ranks: train steps 1-{k}, save step {k} from all 4, SIGKILL")
    four = launch(ctx, Phase("four", 4, k, save_and_die=True), cfg, root, results)
    print(f"   losses {' '.join(f'{x:.4f}' for x in four[0]['losses'].values())}")
    print(f"   {tessera.RunDirectory.name_of(k)} committed, then the parent SIGKILLed the 4 ranks")

    print(f"\n2. run A, 2 ranks: load step {k}, train to step {n}")
    a = launch(ctx, Phase("A", 2, n, load_step=k), cfg, root, results)
    loaded = a[0]["loaded"]
    same_load = equal(loaded["full"], four[0]["final"]["full"])
    same_load &= (loaded["lr_step"], loaded["position"]) == (four[0]["final"]["lr_step"], k)
    same_rng = [a[r]["loaded"]["rng"] == four[r]["final"]["rng"] for r in range(2)]
    print(
        f"   right after the load, every weight and AdamW moment gathered whole, the scheduler and the "
        f"data position equal the 4 ranks' saved state: {same_load}"
    )
    print(
        f"   RNG: ranks 0-1 got their own saved states back: {all(same_rng)}; ranks 2-3's states stay in "
        f"the checkpoint, unread (each rank reads only its own cells)"
    )
    for warned in a[0]["resumed"]["warnings"]:
        print(f"   rank 0 warned: {warned}")

    print(f"\n3. run B, 2 ranks: load step {k}, train to step {m}, save step {m}, SIGKILL; then 2 fresh")
    print(f"   ranks load latest and train to step {n}")
    b1 = launch(ctx, Phase("B1", 2, m, load_step=k, save_and_die=True), cfg, root, results)
    b2 = launch(ctx, Phase("B2", 2, n), cfg, root, results)
    print(f"   restarted from latest = {b2[0]['resumed']['from']} at step {b2[0]['resumed']['step']}")
    b_losses = {**b1[0]["losses"], **b2[0]["losses"]}
    same = [s for s, x in a[0]["losses"].items() if b_losses.get(s) == x]
    for s, x in a[0]["losses"].items():
        print(f"   step {s:3d}  A {x:.6f}  B {b_losses.get(s, float('nan')):.6f}")
    weights = all(equal(a[r]["final"]["full"], b2[r]["final"]["full"]) for r in range(2))
    print(
        f"   losses of steps {k + 1}-{n}: {len(same)}/{len(a[0]['losses'])} bit-identical; final weights "
        f"and AdamW moments identical: {weights}"
    )
    passed = same_load and all(same_rng) and len(same) == len(a[0]["losses"]) == n - k and weights
    verdict = "PASS" if passed else "FAIL"
    print(f"\n{verdict}: saved by 4 ranks, resumed at 2 bit-exactly; output in {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
