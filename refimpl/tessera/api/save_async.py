"""Asynchronous save: snapshot the state to host memory, return, write and commit in the background.

The training loop waits only for the snapshot (:mod:`tessera.state.snapshot`); the ordinary writer,
:func:`tessera.api.save.save`, then plans, writes and commits it on a background thread, so an
asynchronous checkpoint is the same checkpoint, committed by the same code. What makes that safe
while training goes on:

- Under ``torch.distributed`` the background saves use a gloo group of their own over the same
  ranks, made at the first save: the training's group (NCCL above all) must not be driven from two
  threads at once. Every rank must call ``save`` in the same order; before the writer's first
  collective the ranks check that they are at the same save, so a rank that skipped one fails that
  save on every rank instead of mixing two saves into one checkpoint.
- Saves run one after another, in call order, on one thread, so that ranks' collectives pair up
  and a run directory's ``latest`` moves in step order.
- A failure is raised by ``wait()``; if no one waited, by the ``save`` that reuses the failed save's
  slot (the next one, with the default ``max_in_flight=1``), or by ``close()``: once, and on every
  rank at the same call, since which saves have finished is then the same on every rank.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Unpack

import torch.distributed as dist

from ..distributed.collective import collective_for
from ..engine.gpu.direct_io import storage_with_device_io
from ..errors import CollectiveError
from ..format.manifest import Manifest
from ..planning.cache import PlanCache
from ..planning.options import SaveOptions
from ..state.snapshot import HostBuffers
from ..storage.base import Storage
from ..storage.resolve import Location
from .save import save
from .save_arguments import DeprecatedSaveKeywords, save_options

__all__ = ["AsyncSave", "AsyncSaver", "Job", "SaveCall", "default_saver", "save_async"]

Job = Callable[[dict[Any, Any], "dist.ProcessGroup | None"], Manifest]
"""What runs in the background: ``job(staged_state_dict, process_group)``, returning the manifest."""


def save_async(
    state_dict: Mapping[Any, Any],
    location: Location,
    *,
    options: SaveOptions | None = None,
    metadata: Mapping[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    plan_cache: PlanCache | None = None,
    parallelism: Mapping[str, Any] | None = None,
    progress: bool = False,
    **deprecated: Unpack[DeprecatedSaveKeywords],
) -> AsyncSave:
    """Copy the state to host memory, then save it as :func:`~tessera.save` would, in the
    background; the handle, at once: ``wait()`` returns the committed manifest or raises.

    Takes ``tessera.save``'s arguments. The saves of one process group go through one
    :class:`AsyncSaver` kept for the process's life (one save in flight: the next call waits
    for the previous one's slot). The location is resolved now, so that an unsupported URL
    or GPU-direct I/O without a GPU fails here, before anything is copied or written. A storage
    with device I/O (``gpu_direct_storage``) is accepted: the snapshot is in host memory, so
    the chunks take the host path into the same files.
    """
    call = SaveCall.of("save_async", options, deprecated, metadata, plan_cache, parallelism, progress)
    return default_saver(process_group)._start(state_dict, location, call)


@dataclass(frozen=True, slots=True)
class SaveCall:
    """A save's arguments but the state dict, the location and the process group, checked and
    copied, for a save that runs later: on the background thread, or for a run directory's step.

    Made by :meth:`of` in the public entry point itself (its deprecation warnings point at the
    entry point's caller); ``metadata`` and ``parallelism`` are deep copies, since the caller
    may change its own as soon as the call returns; ``options`` is frozen; the plan cache is
    shared on purpose (the save fills it for the next one).
    """

    options: SaveOptions
    gpu_direct: bool
    """The deprecated ``gpu_direct=True``: the location as a storage with device I/O."""
    metadata: Mapping[str, Any] | None
    plan_cache: PlanCache | None
    parallelism: Mapping[str, Any] | None
    progress: bool

    @classmethod
    def of(
        cls,
        caller: str,
        options: SaveOptions | None,
        deprecated: Mapping[str, Any],
        metadata: Mapping[str, Any] | None,
        plan_cache: PlanCache | None,
        parallelism: Mapping[str, Any] | None,
        progress: bool,
    ) -> SaveCall:
        """Check the arguments of ``caller`` (raises ``TypeError``/``ValueError``) and copy them."""
        checked, gpu_direct = save_options(options, deprecated, caller, stacklevel=4)
        copies = copy.deepcopy(metadata), copy.deepcopy(parallelism)
        return cls(checked, gpu_direct, copies[0], plan_cache, copies[1], progress)

    def storage(self, location: Location) -> Storage:
        """The storage of ``location`` (with device I/O for the deprecated ``gpu_direct=True``)."""
        return storage_with_device_io(location, self.gpu_direct)

    def run(
        self, state_dict: Mapping[Any, Any], storage: Storage, group: dist.ProcessGroup | None
    ) -> Manifest:
        """``tessera.save`` with these arguments."""
        return save(
            state_dict,
            storage,
            options=self.options,
            metadata=self.metadata,
            process_group=group,
            plan_cache=self.plan_cache,
            parallelism=self.parallelism,
            progress=self.progress,
        )


class AsyncSave:
    """A save running in the background: ``wait()`` for its manifest, or poll ``done()``.

    ``blocked_seconds`` is how long ``save`` held the caller: ``waited_seconds`` of it waiting for
    an earlier save to free its slot, the rest staging ``staged_bytes`` bytes of host copies.
    """

    def __init__(
        self,
        location: str,
        future: Future[Manifest],
        blocked_seconds: float,
        waited_seconds: float,
        staged_bytes: int,
    ) -> None:
        self.location = location
        """Where the checkpoint goes, as messages print it (the storage's ``location``)."""
        self.blocked_seconds = blocked_seconds
        self.waited_seconds = waited_seconds
        self.staged_bytes = staged_bytes
        self._future = future
        self._observed = False

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed)."""
        return self._future.done()

    @property
    def observed(self) -> bool:
        """Whether the outcome was delivered: ``wait`` returned or raised, or a later call raised it."""
        return self._observed

    def wait(self, timeout: float | None = None) -> Manifest:
        """The committed manifest; raises the save's error, or ``TimeoutError`` after ``timeout`` seconds."""
        error = self._future.exception(timeout)
        self._observed = True
        if error is not None:
            raise error
        return self._future.result()

    def _deliver(self, error: BaseException, how: str | None = None) -> BaseException:
        """``error``, this finished save's failure, marked observed, for a later call to raise (noted how)."""
        self._observed = True
        if how is not None:
            error.add_note(f"the asynchronous save to {self.location} failed; {how}")
        return error


class AsyncSaver:
    """Saves that return once the state is copied to host memory, and write and commit in the background.

    ``save`` takes ``tessera.save``'s arguments but ``process_group``, fixed here, once. At most
    ``max_in_flight`` saves are in flight; the next ``save`` waits for the oldest. Each in-flight save
    holds a set of host buffers, reused by later saves. Use from one thread; under
    ``torch.distributed`` every rank of the group calls ``save`` for the same checkpoints in the same order.
    Wait for the last save (or ``close``) before destroying the process group.
    """

    def __init__(self, *, max_in_flight: int = 1, process_group: dist.ProcessGroup | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._training_group = process_group
        self._group: dist.ProcessGroup | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tessera-async-save")
        self._free = [HostBuffers() for _ in range(max_in_flight)]
        self._in_flight: deque[tuple[AsyncSave, HostBuffers]] = deque()
        self._failed: list[tuple[AsyncSave, BaseException]] = []
        self._calls = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def save(
        self,
        state_dict: Mapping[Any, Any],
        location: Location,
        *,
        options: SaveOptions | None = None,
        metadata: Mapping[str, Any] | None = None,
        plan_cache: PlanCache | None = None,
        parallelism: Mapping[str, Any] | None = None,
        progress: bool = False,
        **deprecated: Unpack[DeprecatedSaveKeywords],
    ) -> AsyncSave:
        """Snapshot ``state_dict``, then save it to ``location`` in the background (see ``tessera.save``).

        Raises here an earlier save's failure that no one has seen yet (and starts nothing), and
        errors of the call itself (wrong arguments, a location no storage supports, a state dict
        that is not a dict); what the writer finds wrong comes from ``wait()``, like its I/O errors.
        """
        call = SaveCall.of(
            "AsyncSaver.save", options, deprecated, metadata, plan_cache, parallelism, progress
        )
        return self._start(state_dict, location, call)

    def _start(self, state_dict: Mapping[Any, Any], location: Location, call: SaveCall) -> AsyncSave:
        """``save`` once its arguments are checked (``save_async`` calls it too), with the location
        resolved now: an unsupported URL, or device I/O without a GPU, fails before any copy."""
        storage = call.storage(location)
        return self.submit(
            state_dict, storage.location, lambda staged, group: call.run(staged, storage, group)
        )

    def submit(self, state_dict: Mapping[Any, Any], location: str, job: Job) -> AsyncSave:
        """Snapshot ``state_dict``, then run ``job(snapshot, process_group)`` in the background.

        ``save`` is this with the writer as ``job``; a job may do more once the checkpoint is
        committed (a run directory moves ``latest``). ``process_group`` is the saver's own gloo
        group (``None`` in one process): the job must use no other. ``location`` says where the
        checkpoint goes, for the handle and the messages.
        """
        start = time.perf_counter()
        if self._closed:
            raise RuntimeError("this AsyncSaver is closed")
        self._calls += 1
        call = self._calls
        while len(self._in_flight) >= self.max_in_flight:
            self._retire_oldest()
        waited = time.perf_counter() - start
        unseen = self._unseen_failures()
        if unseen:
            self._failed.extend(unseen[1:])
            failed, error = unseen[0]
            raise failed._deliver(error, "raised by the next save, which was not started")
        group = self._save_group()
        buffers = self._free.pop()
        try:
            staged, nbytes = buffers.stage(state_dict)
        except BaseException:
            self._free.append(buffers)
            raise
        future = self._thread.submit(_run, job, staged, group, call)
        handle = AsyncSave(location, future, time.perf_counter() - start, waited, nbytes)
        self._in_flight.append((handle, buffers))
        return handle

    def close(self) -> None:
        """Wait for every save in flight and free the buffers; raise a failure no one has seen."""
        if self._closed:
            return
        try:
            while self._in_flight:
                self._retire_oldest()
        finally:
            self._closed = True
            self._thread.shutdown()
            self._free.clear()
        unseen = self._unseen_failures()
        if unseen:
            handle, first = unseen[0]
            error = handle._deliver(first, "raised by close()")
            for other, failure in unseen[1:]:
                error.add_note(
                    f"the asynchronous save to {other.location} failed too: {other._deliver(failure)!r}"
                )
            raise error

    def _retire_oldest(self) -> None:
        """Wait for the oldest save in flight: its buffers are free again, its failure kept to raise."""
        handle, buffers = self._in_flight[0]
        error = handle._future.exception()
        self._in_flight.popleft()
        self._free.append(buffers)
        if error is not None:
            self._failed.append((handle, error))

    def _unseen_failures(self) -> list[tuple[AsyncSave, BaseException]]:
        """The failed saves retired so far whose error no one has seen (``wait`` may have shown some)."""
        unseen = [(handle, error) for handle, error in self._failed if not handle.observed]
        self._failed.clear()
        return unseen

    def _save_group(self) -> dist.ProcessGroup | None:
        """The background saves' gloo group over the training group's ranks, made at the first save
        under ``torch.distributed`` (a collective: every rank is at the same save)."""
        if self._group is None and dist.is_available() and dist.is_initialized():
            training = self._training_group if self._training_group is not None else dist.group.WORLD
            ranks = dist.get_process_group_ranks(training)
            if len(ranks) > 1:
                # Ranks outside a subgroup never save with it, so they must not have to join its making.
                local = len(ranks) < dist.get_world_size()
                self._group = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=local)
        return self._group


def _run(job: Job, staged: dict[Any, Any], group: dist.ProcessGroup | None, call: int) -> Manifest:
    """The background part: check that every rank is at the same save, then run the job."""
    collective = collective_for(group)
    if collective.world_size > 1:
        calls = collective.all_gather(call, "checking that every rank is at the same asynchronous save")
        if len(set(calls)) > 1:
            raise CollectiveError(
                f"rank {collective.rank}: the ranks are at different saves (save calls {calls}, by rank); "
                "every rank must call save in the same order and skip none; nothing was saved"
            )
    return job(staged, group)


_DEFAULT_SAVERS: dict[dist.ProcessGroup | None, AsyncSaver] = {}


def default_saver(process_group: dist.ProcessGroup | None = None) -> AsyncSaver:
    """The saver of ``tessera.save_async`` for ``process_group``: one per group, kept
    for the process's life (its thread finishes the saves in flight when the interpreter exits)."""
    saver = _DEFAULT_SAVERS.get(process_group)
    if saver is None or saver.closed:
        saver = _DEFAULT_SAVERS[process_group] = AsyncSaver(process_group=process_group)
    return saver
