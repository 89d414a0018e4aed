"""Steps of a tiny FSDP2 training run shared by the tests that save and resume one (every rank
calls each function: gathering a DTensor is a collective)."""

from __future__ import annotations

import torch

BATCH = 8
"""The global batch: each rank trains on its slice, whatever the world size."""


def fsdp_model(world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small MLP and its AdamW, seeded; each Linear and the whole model sharded with FSDP2 over
    ``world`` ranks, or left plain at one rank (as a consumer of the checkpoint would train it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 3))
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))


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
