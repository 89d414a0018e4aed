"""The few collective steps a multi-rank save needs, over ``torch.distributed`` or none.

A save gathers the ranks' plans to the coordinator (rank 0), scatters each
rank its part of the global plan, moves the pieces of shared chunks between
ranks, and gathers "my data is durable" before the commit; a preemption check asks
whether any rank was signalled (``any_true``). ``SingleProcess``
does the same with no communication, so a one-process save runs the very
same code. Any failure of the process group (a rank that died, a timeout)
becomes a :class:`~tessera.errors.CollectiveError`, so that no rank commits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CollectiveError

__all__ = ["Collective", "ProcessGroupCollective", "SingleProcess", "collective_for"]


class Collective(ABC):
    rank: int
    world_size: int

    @abstractmethod
    def gather(self, obj: Any, step: str) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (``None`` elsewhere)."""

    @abstractmethod
    def all_gather(self, obj: Any, step: str) -> list[Any]:
        """Every rank's ``obj`` on every rank."""

    @abstractmethod
    def scatter(self, objs: list[Any] | None, step: str) -> Any:
        """Rank 0 gives ``objs[r]`` to rank ``r``."""

    @abstractmethod
    def broadcast(self, obj: Any, step: str) -> Any:
        """Rank 0's ``obj`` on every rank."""

    @abstractmethod
    def any_true(self, flag: bool, step: str) -> bool:
        """Whether any rank's ``flag`` is true, on every rank (one all-reduce MAX of a number)."""

    @abstractmethod
    def exchange(
        self,
        sends: Sequence[tuple[int, int, np.ndarray]],
        receives: Sequence[tuple[int, int, int]],
        step: str,
    ) -> list[np.ndarray]:
        """Send each ``(peer, tag, bytes)`` and receive each ``(peer, tag, nbytes)``; the received bytes."""


class SingleProcess(Collective):
    rank = 0
    world_size = 1

    def gather(self, obj: Any, step: str) -> list[Any] | None:
        return [obj]

    def all_gather(self, obj: Any, step: str) -> list[Any]:
        return [obj]

    def scatter(self, objs: list[Any] | None, step: str) -> Any:
        assert objs is not None
        return objs[0]

    def broadcast(self, obj: Any, step: str) -> Any:
        return obj

    def any_true(self, flag: bool, step: str) -> bool:
        return flag

    def exchange(
        self,
        sends: Sequence[tuple[int, int, np.ndarray]],
        receives: Sequence[tuple[int, int, int]],
        step: str,
    ) -> list[np.ndarray]:
        if sends or receives:
            raise AssertionError("a single process has no peer to exchange pieces with")
        return []


class ProcessGroupCollective(Collective):
    """A ``torch.distributed`` process group; pieces travel on the GPU when the group is NCCL only."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group))
        self._device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend and "gloo" not in backend
            else torch.device("cpu")
        )
        self._root = dist.get_global_rank(group, 0) if group is not None else 0

    @contextmanager
    def _failures(self, step: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, ValueError, dist.DistError) as exc:
            raise CollectiveError(
                f"rank {self.rank} of {self.world_size}: {step} failed: another rank failed, died or "
                f"timed out ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "nothing was committed"
            ) from exc

    def gather(self, obj: Any, step: str) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        with self._failures(step):
            dist.gather_object(obj, out, dst=self._root, group=self.group)
        return out

    def all_gather(self, obj: Any, step: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        with self._failures(step):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def scatter(self, objs: list[Any] | None, step: str) -> Any:
        out: list[Any] = [None]
        with self._failures(step):
            dist.scatter_object_list(out, objs if self.rank == 0 else None, src=self._root, group=self.group)
        return out[0]

    def broadcast(self, obj: Any, step: str) -> Any:
        box = [obj]
        with self._failures(step):
            dist.broadcast_object_list(box, src=self._root, group=self.group)
        return box[0]

    def any_true(self, flag: bool, step: str) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self._device)
        with self._failures(step):
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def exchange(
        self,
        sends: Sequence[tuple[int, int, np.ndarray]],
        receives: Sequence[tuple[int, int, int]],
        step: str,
    ) -> list[np.ndarray]:
        ops: list[dist.P2POp] = []
        for peer, tag, data in sends:
            payload = torch.from_numpy(np.ascontiguousarray(data).reshape(-1).view(np.uint8)).to(self._device)
            ops.append(dist.P2POp(dist.isend, payload, self._global(peer), self.group, tag))
        buffers = [torch.empty(nbytes, dtype=torch.uint8, device=self._device) for _, _, nbytes in receives]
        for (peer, tag, _), buffer in zip(receives, buffers, strict=True):
            ops.append(dist.P2POp(dist.irecv, buffer, self._global(peer), self.group, tag))
        if ops:
            with self._failures(step):
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
        return [buffer.cpu().numpy() for buffer in buffers]

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank


def collective_for(group: dist.ProcessGroup | None) -> Collective:
    """The process group's collective, or a single process when ``torch.distributed`` is not in use."""
    if not dist.is_available() or not dist.is_initialized():
        return SingleProcess()
    if dist.get_world_size(group) == 1:
        return SingleProcess()
    return ProcessGroupCollective(group)
