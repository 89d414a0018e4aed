"""Steps of a tiny FSDP2 training run shared by the tests that save and resume one (every rank
calls each function: gathering a DTensor is a collective)."""

from __future__ import annotations

import torch

BATCH = 8
"""The global batch: each rank trains on its slice, whatever the world size."""


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, world: int, n: int
) -> None:
    """Step ``n`` on this rank's slice of a batch seeded by ``n`` (one global batch at any world size)."""
    x = torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(100 + n))
    share = BATCH // world
    model(x[rank * share : (rank + 1) * share]).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def gathered(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer tensor, whole and copied."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
        for k, v in optimizer.state[p].items():
            out[f"{name}/{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
    return out
