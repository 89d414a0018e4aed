"""Tessera end to end: train a small GPT, checkpoint it, crash, resume bit-exactly, inspect, verify.

What it shows, in order:

1. A GPT-like model (token and position embeddings, transformer blocks with
   causal attention, MLP and LayerNorm) trains with bf16 weights and fp32
   AdamW master weights on a synthetic, seeded token stream. Every K steps the
   full training state goes into a ``tessera.RunDirectory`` (keep_last=2):
   model, master weights, optimizer, LR scheduler, data position, and the
   Python, NumPy and torch RNG states, with step, tokens seen and the config
   as metadata. Then the run "crashes" a few steps after a checkpoint.
2. A restart builds new model and optimizer objects, scrambles every RNG, and
   loads ``latest`` in place: ``tessera.load(path, template)`` fills the
   model's and the master weights' own tensors. Training continues to the end.
3. A reference run trains the same steps in one go. The losses after the
   restart, and the final weights, must be bit-identical to it: PASS or FAIL
   (exit status 1 on FAIL).
4. ``tessera ls``, ``tessera inspect`` and ``tessera verify`` on the run, and
   ``verify`` on a deliberately damaged copy.
5. zarr-python and tensorstore open one bf16 weight array of the checkpoint
   with no Tessera code (zarr-python only needs ``import tessera.format.zarr_dtypes``
   to learn the name ``bfloat16``).

Run: ``python refimpl/examples/train_gpt.py [--out DIR]`` (about 10 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import tessera
import torch
import torch.nn.functional as F
from tessera.cli.main import main as tessera_cli
from torch import nn

MARKER = ".tessera-demo"
"""Written into --out, so that a later run may delete the folder: it never deletes anything else."""


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

    The window offset jitters with Python's ``random`` and 5% of the input
    tokens are replaced through NumPy's global RNG, so that a resumed run
    matches only if both RNG states were restored along with the position.
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


# -- training ---------------------------------------------------------------------------------


class Trainer:
    """Model (bf16), fp32 master weights, AdamW over the master weights, LR schedule, data."""

    def __init__(self, cfg: Config, corpus: np.ndarray, seed: int) -> None:
        self.cfg = cfg
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.model = GPT(cfg).to(torch.bfloat16)
        self.names = [name for name, _ in self.model.named_parameters()]
        self.master = [p.detach().float().clone() for p in self.model.parameters()]
        self.optimizer = torch.optim.AdamW(self.master, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup)
        )
        self.loader = Loader(corpus, cfg)
        self.step = 0

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.master)

    def train_step(self) -> float:
        inputs, targets = self.loader.next_batch()
        self.model.train()
        logits = self.model(inputs).float()
        loss = F.cross_entropy(logits.view(-1, self.cfg.vocab), targets.view(-1))
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        for master, param in zip(self.master, self.model.parameters(), strict=True):
            assert param.grad is not None
            master.grad = param.grad.float()
        torch.nn.utils.clip_grad_norm_(self.master, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for master, param in zip(self.master, self.model.parameters(), strict=True):
                param.copy_(master)
        self.step += 1
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs; tensors are the live ones (no copies)."""
        return {
            "model": self.model.state_dict(),
            "master": dict(zip(self.names, self.master, strict=True)),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": rng_state(),
            "step": self.step,
        }

    def resume(self, path: Path) -> None:
        """Load a checkpoint in place: the template's tensors are this trainer's own."""
        template: dict[str, Any] = {
            "model": self.model.state_dict(),  # filled in place: these are the model's weights
            "master": dict(zip(self.names, self.master, strict=True)),  # filled in place
            # Optimizer state does not exist before the first step, so it cannot be filled in
            # place: a template leaf {} stands for the whole stored subtree, loaded as new tensors.
            "optimizer": {},
            "scheduler": {},
            "data": {},
            "rng": rng_state(),  # gives the stored lists back the tuple types setstate needs
            "step": 0,
        }
        tessera.load(path, template)
        self.optimizer.load_state_dict(template["optimizer"])
        self.scheduler.load_state_dict(template["scheduler"])
        self.loader.load_state_dict(template["data"])
        set_rng_state(template["rng"])
        self.step = template["step"]


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def metadata(trainer: Trainer, loss: float) -> dict[str, Any]:
    cfg = trainer.cfg
    return {
        "tokens_seen": trainer.step * cfg.batch * cfg.seq_len,
        "loss": loss,
        "config": dataclasses.asdict(cfg),
    }


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def train(
    trainer: Trainer, until: int, run: tessera.RunDirectory | None, losses: dict[int, float]
) -> Iterator[str]:
    """Train to step ``until``, checkpointing every ``cfg.every`` steps; yields one line per save."""
    while trainer.step < until:
        loss = trainer.train_step()
        losses[trainer.step] = loss
        if run is not None and trainer.step % trainer.cfg.every == 0:
            start = time.perf_counter()
            run.save(trainer.state_dict(), trainer.step, metadata=metadata(trainer, loss))
            seconds = time.perf_counter() - start
            path = run.root / run.name_of(trainer.step)
            yield (
                f"   step {trainer.step:3d}  loss {loss:.4f}  saved {path.name} "
                f"({disk_bytes(path) / 2**20:.1f} MiB) in {seconds:.3f} s"
            )


# -- the demo ---------------------------------------------------------------------------------


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
    import tessera.format.zarr_dtypes  # noqa: F401  (registers bfloat16 & float8 with zarr-python)
    import zarr

    want = expected.view(torch.int16).numpy().view(np.uint16)
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
        same = got.dtype.name == "bfloat16" and np.array_equal(got.view(np.uint16), want)
        ok = ok and same
        print(
            f"   {name} {version(name)}: {key} {got.dtype.name} {list(got.shape)}, "
            f"bit-identical to the model's weight: {same}"
        )
    return ok


def damage(source: Path, target: Path) -> None:
    """A copy of ``source`` with one bit flipped in one chunk and another chunk cut short."""
    shutil.copytree(source, target)
    flipped = target / "model" / "tok_emb.weight" / "c" / "0" / "0"
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x01
    flipped.write_bytes(data)
    truncated = target / "master" / "head.weight" / "c" / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:-64])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("demo-run"), help="output folder (default ./demo-run)"
    )
    parser.add_argument("--steps", type=int, default=Config.steps, help="steps in all")
    parser.add_argument("--every", type=int, default=Config.every, help="checkpoint every N steps")
    parser.add_argument("--crash-at", type=int, default=Config.crash_at, help="step after which to crash")
    args = parser.parse_args()
    cfg = Config(steps=args.steps, every=args.every, crash_at=args.crash_at)
    if not cfg.every <= cfg.crash_at < cfg.steps:
        parser.error("need --every <= --crash-at < --steps")
    prepare(args.out)
    root = args.out / "run"
    corpus = synthetic_corpus(cfg)

    trainer = Trainer(cfg, corpus, cfg.seed)
    print(
        f"Tessera demo: GPT, {trainer.parameters / 1e6:.2f}M parameters ({cfg.n_layer} blocks, "
        f"d_model {cfg.d_model}, vocab {cfg.vocab}), bf16 weights + fp32 AdamW master weights"
    )
    print(f"run directory {root}: a checkpoint every {cfg.every} steps, keep_last=2\n")

    print(f"1. train steps 1-{cfg.crash_at}, then crash")
    run = tessera.RunDirectory(root, keep_last=2)
    first: dict[int, float] = {}
    for line in train(trainer, cfg.crash_at, run, first):
        print(line)
    latest = run.latest()
    assert latest is not None
    print(
        f"   step {cfg.crash_at:3d}  loss {first[cfg.crash_at]:.4f}  CRASH: steps after "
        f"{latest.name} are lost"
    )
    cli("ls", str(root))
    del trainer

    print("\n2. restart: new model and optimizer objects, every RNG reseeded, load latest in place")
    resumed = Trainer(cfg, corpus, seed=99)
    start = time.perf_counter()
    latest = run.latest()
    assert latest is not None
    resumed.resume(latest)
    print(
        f"   loaded {latest.name} in {time.perf_counter() - start:.3f} s: step {resumed.step}, "
        f"data position {resumed.loader.position}"
    )
    second: dict[int, float] = {}
    for line in train(resumed, cfg.steps, run, second):
        print(line)

    print(f"\n3. reference: steps 1-{cfg.steps} in one go, no checkpoint, no restart")
    reference = Trainer(cfg, corpus, cfg.seed)
    expected: dict[int, float] = {}
    for _ in train(reference, cfg.steps, None, expected):
        pass
    same = [s for s in second if second[s].hex() == expected[s].hex()]
    weights = all(
        torch.equal(a, b)
        for a, b in zip(
            resumed.model.state_dict().values(), reference.model.state_dict().values(), strict=True
        )
    ) and all(torch.equal(a, b) for a, b in zip(resumed.master, reference.master, strict=True))
    steps = f"{min(second)}-{max(second)}"
    print(f"   losses of steps {steps} after the restart: {len(same)}/{len(second)} bit-identical")
    print(f"   final bf16 weights and fp32 master weights identical: {weights}")
    passed = len(same) == len(second) and weights
    print(
        "   PASS: the resumed run is bit-identical to the uninterrupted one"
        if passed
        else "   FAIL: the resumed run differs from the uninterrupted one"
    )
    if not passed:
        for s in sorted(second):
            print(f"     step {s}: resumed {second[s]!r}, reference {expected[s]!r}")

    print("\n4. the tessera command")
    latest = run.latest()
    assert latest is not None
    cli("inspect", str(root), head=26, tail=15)
    status = cli("verify", str(root))
    print(f"   (exit status {status})")
    damaged = args.out / "damaged"
    damage(latest, damaged)
    print("   a copy with one bit flipped in model/tok_emb.weight and master/head.weight cut short:")
    status_damaged = cli("verify", str(damaged))
    print(f"   (exit status {status_damaged})")

    print("\n5. stock Zarr readers (no Tessera code; zarr-python needs the bfloat16 name registered)")
    key = "model/blocks.0.qkv.weight"
    readers = stock_readers(latest, key, resumed.model.state_dict()["blocks.0.qkv.weight"])

    ok = passed and status == 0 and status_damaged == 1 and readers
    print(f"\n{'PASS' if ok else 'FAIL'}: demo {'complete' if ok else 'failed'}; output in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
