"""Tessera end to end: a GPT run checkpointed by ``tessera.Checkpointer``, killed, resumed bit-exactly.

Every run below is its own process, and every kill is a real signal. The training
script (:func:`train`) is what a user writes: one state dict of the run's live
objects (model, AdamW, an LR scheduler with warmup, the data loader's position,
``tessera.RNGState`` for the Python, NumPy and torch generators that the loop draws
from: batch offsets, token noise, dropout), ``ckpt.load(state)`` at the start and
``ckpt.save(step, state)`` every K steps, in the background (``async_save``), with
the config saved and its architecture keys checked on load (``must_match``).

1. Run A trains N steps straight: the reference.
2. kill -9 after a checkpoint: run B is SIGKILLed some steps after a save committed; a
   restart in a new process loads ``latest`` and trains to N.
3. kill -9 during a save: the parent SIGKILLs run C while its save of a step is under way
   (the step directory is claimed, its root ``zarr.json`` not yet written); the restart
   saves and commits that same step (no crash loop, nothing to delete by hand).
4. Preemption: run D gets SIGTERM, saves at the next step boundary (``ckpt.preempted``)
   and exits 0; its restart goes on.
   In 2-4, the losses after the restart and the final weights must be bit-identical to
   A's: PASS or FAIL (exit status 1 on FAIL).
5. A finetune load of A's last checkpoint (weights only, step 0), and a load with
   another ``n_layer`` refused with both values named.
6. ``tessera ls`` / ``inspect`` / ``verify`` on A's run, ``verify`` on a damaged copy, and
   zarr-python and tensorstore reading one weight with no Tessera code.

Run: ``python refimpl/examples/train_gpt.py [--out DIR]`` (about 40 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import multiprocessing
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import tessera
import torch
import torch.nn.functional as F
from tessera.cli.main import main as tessera_cli
from tessera.storage.base import CLAIM_FILE, Buffer, Storage
from tessera.storage.local import LocalStorage
from tessera.testing import StorageWrapper
from torch import nn

MARKER = ".tessera-demo"
"""Written into --out, so that a later run may delete the folder: it never deletes anything else."""

ARCHITECTURE = ("vocab", "seq_len", "d_model", "n_head", "n_layer")
"""The config keys a checkpoint must match to load (``must_match``): the others may change."""


# -- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    vocab: int = 512
    seq_len: int = 64
    d_model: int = 128
    n_head: int = 4
    n_layer: int = 4
    dropout: float = 0.1
    batch: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 10
    steps: int = 50
    every: int = 10
    crash_at: int = 35
    seed: int = 1234


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# -- the data ---------------------------------------------------------------------------------


def synthetic_corpus(cfg: Config, length: int = 2**17) -> np.ndarray:
    """A fixed token stream from a seeded random "language": each token has 4 likely successors."""
    gen = np.random.default_rng(cfg.seed)
    successors = gen.integers(0, cfg.vocab, size=(cfg.vocab, 4))
    choice = gen.integers(0, 4, size=length)
    noise = gen.random(length) < 0.1
    random_tokens = gen.integers(0, cfg.vocab, size=length)
    tokens = np.zeros(length, dtype=np.int64)
    for i in range(1, length):
        tokens[i] = random_tokens[i] if noise[i] else successors[tokens[i - 1], choice[i]]
    return tokens


class Loader:
    """Batches from the corpus; ``position`` (sequences consumed) is its whole state.

    The window offset jitters with Python's ``random`` and 5% of the input tokens are
    replaced through NumPy's global RNG, so that a resumed run matches only if the RNG
    states were restored along with the position. It is a stateful object
    (``state_dict`` / ``load_state_dict``), so it goes into the checkpoint as itself.
    """

    def __init__(self, corpus: np.ndarray, cfg: Config) -> None:
        self.corpus = corpus
        self.cfg = cfg
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        n = cfg.batch * (cfg.seq_len + 1)
        start = (self.position * (cfg.seq_len + 1) + random.randrange(cfg.seq_len)) % (len(self.corpus) - n)
        window = self.corpus[start : start + n].reshape(cfg.batch, cfg.seq_len + 1)
        inputs, targets = window[:, :-1].copy(), window[:, 1:].copy()
        mask = np.random.random(inputs.shape) < 0.05
        inputs[mask] = np.random.randint(0, cfg.vocab, size=int(mask.sum()))
        self.position += cfg.batch
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


# -- the training script ------------------------------------------------------------------------


class Trainer:
    """The run's live objects, built the same way by every process (same seed, as a real job is)."""

    def __init__(self, cfg: Config, corpus: np.ndarray) -> None:
        self.cfg = cfg
        # One thread in every process: bit-exact resumes need the same thread count (a reduction
        # split over other threads rounds differently), and one is fastest for this small model.
        torch.set_num_threads(1)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = GPT(cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup)
        )
        self.loader = Loader(corpus, cfg)
        # What a checkpoint holds: stateful objects as themselves, saved through state_dict()
        # and loaded in place through load_state_dict(). Nothing here is pickled.
        self.state: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "data": self.loader,
            "rng": tessera.RNGState(),  # Python random, NumPy global, torch CPU (and CUDA) generators
        }

    def train_step(self) -> float:
        inputs, targets = self.loader.next_batch()
        self.model.train()
        loss = F.cross_entropy(self.model(inputs).view(-1, self.cfg.vocab), targets.view(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def digest(self) -> str:
        """SHA-256 of every weight's bytes: equal digests are bit-identical weights."""
        sha = hashlib.sha256()
        for tensor in self.model.state_dict().values():
            sha.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()


class HangingDisk(StorageWrapper):
    """A disk whose first write into checkpoint ``name`` never returns, so that the parent
    can kill the run in the middle of that save (any other write goes through)."""

    def __init__(self, inner: Storage, name: str) -> None:
        super().__init__(inner)
        self.name = name

    def wrap(self, inner: Storage) -> HangingDisk:
        return HangingDisk(inner, self.name)

    def write_file(self, path: str, buffers: Iterable[Buffer]) -> None:
        if Path(self.inner.location).name == self.name:
            time.sleep(3600)
        super().write_file(path, buffers)


@dataclass(frozen=True)
class Job:
    """What one training process does: its run directory, its log, where it stops."""

    cfg: Config
    root: Path
    log: Path
    crash_at: int = 0  # wait there to be SIGKILLed (after the last save committed)
    sigterm_at: int = 0  # wait there for the parent's SIGTERM
    hang_in_save_of: int = 0  # the save of this step hangs on its first write (HangingDisk)
    keep_last: int | None = 2  # retention: the newest checkpoints kept (None: all)


def train(job: Job) -> None:
    """One training process: load ``latest`` if there is one, train to ``cfg.steps``, checkpoint."""
    cfg = job.cfg
    trainer = Trainer(cfg, synthetic_corpus(cfg))
    state = trainer.state
    storage: Path | Storage = job.root
    if job.hang_in_save_of:
        storage = HangingDisk(LocalStorage(job.root), tessera.RunDirectory.name_of(job.hang_in_save_of))
    preemption = tessera.Preemption()  # SIGTERM / SIGUSR1: save at the next step boundary, exit 0
    with job.log.open("a", buffering=1) as log:  # a line per step: what survives a SIGKILL
        with tessera.Checkpointer(
            storage,
            config=cfg,
            must_match=ARCHITECTURE,
            keep_last=job.keep_last,
            async_save=True,
            preemption=preemption,
        ) as ckpt:
            resumed = ckpt.load(state)  # step 0 and nothing loaded on a fresh start
            log.write(f"start {resumed.step}\n")
            for step in range(resumed.step + 1, cfg.steps + 1):
                log.write(f"loss {step} {trainer.train_step().hex()}\n")
                if step % cfg.every == 0:
                    ckpt.save(step, state)  # returns once the state is copied; written in the background
                if step == job.crash_at:
                    ckpt.wait()  # the save in flight commits: the kill comes right after
                    log.write("waiting for SIGKILL\n")
                    time.sleep(3600)
                if step == job.sigterm_at:  # the scheduler's signal comes here, so the demo is repeatable
                    log.write("waiting for SIGTERM\n")
                    while preemption.received is None:
                        time.sleep(0.01)
                if ckpt.preempted(step, state):  # a signal came: `step` is saved and committed
                    log.write(f"preempted {step}\n")
                    return
            if cfg.steps % cfg.every:
                ckpt.save(cfg.steps, state)  # the last step too: what a finetune or an export starts from
        log.write(f"done {trainer.digest()}\n")  # after the with: the last save has committed


# -- the demo: processes and signals ------------------------------------------------------------


@dataclass
class Result:
    """What a training process logged."""

    losses: dict[int, str]
    start: int
    digest: str = ""
    preempted_at: int = 0


def read_log(path: Path) -> Result:
    result = Result({}, 0)
    for line in path.read_text().splitlines():
        word, *rest = line.split()
        if word == "loss":
            result.losses[int(rest[0])] = rest[1]
        elif word == "start":
            result.start = int(rest[0])
        elif word == "done":
            result.digest = rest[0]
        elif word == "preempted":
            result.preempted_at = int(rest[0])
    return result


STARTED: list[multiprocessing.process.BaseProcess] = []
"""Every training process, so that the demo kills what is left of them if it fails."""


def start(job: Job) -> multiprocessing.process.BaseProcess:
    context = multiprocessing.get_context("forkserver")
    process = context.Process(target=train, args=(job,))
    process.start()
    STARTED.append(process)
    return process


def logged(job: Job, line: str) -> Callable[[], bool]:
    return lambda: job.log.is_file() and line in job.log.read_text().splitlines()


def wait_for(what: str, ready: Callable[[], bool], process: multiprocessing.process.BaseProcess) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        if not process.is_alive():
            raise SystemExit(f"FAIL: the training process exited ({process.exitcode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"FAIL: timed out waiting for {what}")
        time.sleep(0.005)


def run_to_end(job: Job) -> Result:
    process = start(job)
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"FAIL: the run of {job.log.name} exited with status {process.exitcode}")
    return read_log(job.log)


def compare(name: str, before: Result, after: Result, reference: Result) -> bool:
    """Every loss both processes logged, and the final weights, against run A's, bit for bit."""
    steps = sorted({**before.losses, **after.losses})
    losses = {**before.losses, **after.losses}  # a step both ran (lost in the kill): the restart's
    same = [s for s in steps if losses[s] == reference.losses[s]]
    lost = [s for s in before.losses if s > after.start]
    ok = len(same) == len(steps) == len(reference.losses) and after.digest == reference.digest
    print(
        f"   restart: loaded step {after.start}"
        + (f" (steps {lost[0]}-{lost[-1]} were lost and run again)" if lost else "")
        + f"; losses of steps 1-{steps[-1]}: {len(same)}/{len(reference.losses)} bit-identical to A; "
        f"final weights identical: {after.digest == reference.digest}"
    )
    print(f"   {'PASS' if ok else 'FAIL'}: {name}: resumed bit-identical to the uninterrupted run")
    return ok


def committed_steps(root: Path) -> list[int]:
    return [c.step for c in tessera.RunDirectory(root).checkpoints() if c.committed]


def kill_after_checkpoint(cfg: Config, out: Path, reference: Result) -> bool:
    job = Job(cfg, out / "run-B", out / "B.log", crash_at=cfg.crash_at)
    process = start(job)
    wait_for(f"step {cfg.crash_at}", logged(job, "waiting for SIGKILL"), process)
    process.kill()  # SIGKILL
    process.join()
    print(
        f"   run B: trained steps 1-{cfg.crash_at}, committed {committed_steps(job.root)}, SIGKILLed "
        f"(exit {process.exitcode})"
    )
    restart = run_to_end(replace(job, crash_at=0))
    return compare("kill -9 after a checkpoint", read_log(job.log), restart, reference)


def kill_during_save(cfg: Config, out: Path, reference: Result) -> bool:
    step = cfg.crash_at // cfg.every * cfg.every
    # keep_last=None: every checkpoint stays, so that the one whose save was killed is there to check.
    job = Job(cfg, out / "run-C", out / "C.log", hang_in_save_of=step, keep_last=None)
    directory = job.root / tessera.RunDirectory.name_of(step)
    process = start(job)

    def saving() -> bool:  # the save has begun: the directory is claimed, nothing committed
        return (directory / CLAIM_FILE).is_file() and not (directory / "zarr.json").exists()

    wait_for(f"the save of step {step}", saving, process)
    process.kill()  # SIGKILL
    process.join()
    print(
        f"   run C: SIGKILLed (exit {process.exitcode}) while saving {directory.name} "
        f"(claimed by its {CLAIM_FILE}, no zarr.json); committed "
        f"{committed_steps(job.root)}"
    )
    restart = run_to_end(replace(job, hang_in_save_of=0))
    saved = step in committed_steps(job.root)
    print(
        f"   the restarted run saved {directory.name} again and committed it: {saved}; committed "
        f"{committed_steps(job.root)}"
    )
    ok = compare("kill -9 during a save", read_log(job.log), restart, reference)
    print(f"   {'PASS' if saved else 'FAIL'}: kill -9 during a save: the restart committed the same step")
    return ok and saved


def preempt(cfg: Config, out: Path, reference: Result) -> bool:
    job = Job(cfg, out / "run-D", out / "D.log", sigterm_at=cfg.crash_at)
    process = start(job)
    wait_for(f"step {cfg.crash_at}", logged(job, "waiting for SIGTERM"), process)
    process.terminate()  # SIGTERM, as a scheduler sends before its SIGKILL
    process.join()
    before = read_log(job.log)
    clean = process.exitcode == 0 and before.preempted_at == cfg.crash_at
    clean = clean and committed_steps(job.root)[-1] == cfg.crash_at
    print(
        f"   run D: SIGTERM at step {cfg.crash_at}: saved step {before.preempted_at}, exit status "
        f"{process.exitcode}; committed {committed_steps(job.root)}"
    )
    print(f"   {'PASS' if clean else 'FAIL'}: SIGTERM: saved at the step boundary and exited 0")
    restart = run_to_end(replace(job, sigterm_at=0))
    return compare("preemption", before, restart, reference) and clean


def finetune_and_mismatch(cfg: Config, root: Path, reference: Result) -> bool:
    trainer = Trainer(replace(cfg, seed=cfg.seed + 1), synthetic_corpus(cfg))  # other weights
    with tessera.Checkpointer(root, config=cfg, must_match=ARCHITECTURE) as ckpt:
        resumed = ckpt.load(trainer.state, mode="finetune")
    same = trainer.digest() == reference.digest
    ok = resumed.step == 0 and resumed.loaded == ("model",) and same
    print(
        f"   finetune from {Path(str(resumed.path)).name}: step {resumed.step}, "
        f"loaded {list(resumed.loaded)}, kept {list(resumed.skipped)}; weights are A's: {same}"
    )
    print(f"   {'PASS' if ok else 'FAIL'}: finetune loads the weights only and starts at step 0")
    deeper = replace(cfg, n_layer=cfg.n_layer + 2)
    try:
        with tessera.Checkpointer(root, config=deeper, must_match=ARCHITECTURE) as ckpt:
            ckpt.load(trainer.state)
        refused = ""
    except tessera.ConfigMismatchError as error:
        refused = str(error)
    named = f"{cfg.n_layer}" in refused and f"{deeper.n_layer}" in refused and "n_layer" in refused
    print(f"   n_layer={deeper.n_layer}: {refused or 'loaded!'}")
    print(f"   {'PASS' if named else 'FAIL'}: a config mismatch on n_layer is refused naming both values")
    return ok and named


# -- the demo: tools ------------------------------------------------------------------------------


def prepare(out: Path) -> None:
    """Empty ``out`` if an earlier demo made it; refuse any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            sys.exit(f"{out} exists and was not made by this demo; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by refimpl/examples/train_gpt.py; safe to delete\n")


class _Captured(io.StringIO):
    encoding = sys.stdout.encoding  # so the CLI draws its tree as it would on this terminal


def cli(*argv: str, head: int = 0, tail: int = 0) -> int:
    """Run ``tessera ARGV`` in this process; print its output indented, cut to head + tail lines."""
    print(f"   $ tessera {' '.join(argv)}")
    captured = _Captured()
    with contextlib.redirect_stdout(captured):
        status = tessera_cli(list(argv))
    lines = captured.getvalue().splitlines()
    if head and len(lines) > head + tail + 1:
        cut = len(lines) - head - tail
        lines = [*lines[:head], f"... {cut} more lines ...", *lines[-tail:]]
    for line in lines:
        print(f"     {line}".rstrip())
    return status


def stock_readers(checkpoint: Path, key: str, expected: torch.Tensor) -> bool:
    """Read one array with zarr-python and with tensorstore; compare bit for bit."""
    import tensorstore as ts
    import zarr

    group = zarr.open_group(checkpoint, mode="r")
    array = group[key]
    assert isinstance(array, zarr.Array)
    with_zarr = np.asarray(array[...])
    store = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(checkpoint / key)}}
    ).result()
    with_ts = np.asarray(store.read().result())
    ok = True
    for name, got in (("zarr", with_zarr), ("tensorstore", with_ts)):
        same = np.array_equal(got, expected.numpy())
        ok = ok and same
        print(f"   {name} {version(name)}: {key} {got.dtype.name} {list(got.shape)}, bit-identical: {same}")
    return ok


def damage(source: Path, target: Path) -> None:
    """A copy of ``source`` with one bit flipped in one chunk and another chunk cut short."""
    shutil.copytree(source, target)
    flipped = target / "model" / "tok_emb.weight" / "c" / "0" / "0"
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x01
    flipped.write_bytes(data)
    truncated = target / "model" / "head.weight" / "c" / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:-64])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("demo-run"), help="output folder (default ./demo-run)"
    )
    parser.add_argument("--steps", type=int, default=Config.steps, help="steps in all")
    parser.add_argument("--every", type=int, default=Config.every, help="checkpoint every N steps")
    parser.add_argument("--crash-at", type=int, default=Config.crash_at, help="step at which runs are killed")
    args = parser.parse_args()
    cfg = Config(steps=args.steps, every=args.every, crash_at=args.crash_at)
    if not cfg.every <= cfg.crash_at < cfg.steps:
        parser.error("need --every <= --crash-at < --steps")
    prepare(args.out)
    try:
        return demo(cfg, args.out)
    finally:
        for process in STARTED:
            if process.is_alive():
                process.kill()


def demo(cfg: Config, out: Path) -> int:
    # Each training process is forked from a server that has imported torch and Tessera once
    # (and torch._dynamo, which the first optimizer imports: a second per process otherwise).
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "numpy", "tessera"])

    params = sum(p.numel() for p in GPT(cfg).parameters())
    print(
        f"Tessera demo: GPT, {params / 1e6:.2f}M parameters ({cfg.n_layer} blocks, d_model {cfg.d_model}, "
        f"dropout {cfg.dropout}), AdamW, warmup {cfg.warmup} steps; {cfg.steps} steps, a checkpoint every "
        f"{cfg.every} (async, keep_last=2); every run is its own process\n"
    )
    print(f"1. run A: steps 1-{cfg.steps} straight")
    a = Job(cfg, out / "run-A", out / "A.log")
    reference = run_to_end(a)
    print(f"   committed {committed_steps(a.root)}; final weights sha256 {reference.digest[:16]}...")

    print(f"\n2. kill -9 after a checkpoint: run B is SIGKILLed at step {cfg.crash_at}, then resumes")
    passed = kill_after_checkpoint(cfg, out, reference)
    print("\n3. kill -9 during a save: run C is SIGKILLed in the middle of writing a checkpoint")
    passed = kill_during_save(cfg, out, reference) and passed
    print(f"\n4. preemption: run D gets SIGTERM at step {cfg.crash_at}")
    passed = preempt(cfg, out, reference) and passed
    print(f"\n5. finetune from run A's step {cfg.steps}; a config mismatch")
    passed = finetune_and_mismatch(cfg, a.root, reference) and passed

    print("\n6. the tessera command, and stock Zarr readers (no Tessera code)")
    latest = tessera.RunDirectory(a.root).latest()
    assert isinstance(latest, Path)
    cli("ls", str(a.root))
    cli("inspect", str(latest), head=14, tail=4)
    status = cli("verify", str(a.root))
    damaged = out / "damaged"
    damage(latest, damaged)
    print("   a copy with one bit flipped in model/tok_emb.weight and model/head.weight cut short:")
    status_damaged = cli("verify", str(damaged))
    print(f"   (exit status {status}, then {status_damaged})")
    key = "model/blocks.0.qkv.weight"
    weight = tessera.load(latest, keys=[key])["model"]["blocks.0.qkv.weight"]
    readers = stock_readers(latest, key, weight)

    ok = passed and status == 0 and status_damaged == 1 and readers
    print(f"\n{'PASS' if ok else 'FAIL'}: demo {'complete' if ok else 'failed'}; output in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
