"""``tessera.Checkpointer``: a training run's checkpoints in one call each, save and load.

A training script hands it one state dict of its live objects and calls ``save(step, state)``
every so often and ``load(state)`` once at the start::

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
             "rng": tessera.RNGState(), "data": sampler}
    with tessera.Checkpointer("runs/gpt", config=args, must_match=["num_layers"], keep_last=3,
                              async_save=True, preemption=tessera.Preemption()) as ckpt:
        start = ckpt.load(state).step     # 0, nothing loaded, when the run has no checkpoint
        for step in range(start, args.steps):
            train_one_step()
            if (step + 1) % args.save_every == 0:
                ckpt.save(step + 1, state)    # step = the number of completed steps
            if ckpt.preempted(step + 1, state):
                break

It is a thin layer over :class:`~tessera.RunDirectory` (``step-N`` directories, ``latest``,
retention, restart safety), ``tessera.save`` / ``save_async`` and ``tessera.load`` (stateful
objects loaded in place, every key, shape and dtype checked before anything changes). What it
adds is what Megatron's ``save_checkpoint`` / ``load_checkpoint`` add over a bare save:

- **Roles.** Each top-level key of the state has a role, by its value's type unless ``roles=``
  says otherwise: a ``torch.nn.Module`` is ``"model"``; an optimizer or LR scheduler
  ``"optimizer"``; an :class:`~tessera.RNGState` ``"rng"``; a :class:`~tessera.ModelAndOptimizer`
  both (its ``model`` part is model, its ``optimizer`` part optimizer); anything else (a data
  position, counters, user objects, JSON) ``"progress"``. The load modes choose keys by role.
- **Run metadata** (spec R10.13). Every checkpoint's manifest ``metadata`` holds ``step`` and
  ``run = {"kind", "config", "roles"}``, so another tool can resume, finetune or export it.
- **Config check** (:mod:`tessera.api.run_config`): ``must_match`` keys that differ refuse the
  load with one :class:`~tessera.ConfigMismatchError` listing them all; other differing keys
  are reported in :attr:`Resumed.config_changes` and one :class:`~tessera.TesseraWarning`.
- **Load modes.** ``"resume"`` loads every key (``load_optimizer=False``, Megatron's
  ``no_load_optim``, leaves the optimizer role as it is; ``load_rng=False``, ``no_load_rng``,
  the RNG role) and returns the saved step. ``"finetune"`` loads the model role only and returns
  step 0. A release checkpoint (:meth:`Checkpointer.save_release`: weights only, no step) loads
  as a finetune whatever the mode.
- **Async** (``async_save=True``): ``save`` returns once the state is in host memory; ``latest``
  moves only after the commit; the next ``save``, ``load``, ``wait`` or ``close`` waits for it;
  a failure in the background is raised exactly once, by the next of those calls.
- **Preemption** (``preemption=tessera.Preemption()``): installed while the Checkpointer is
  open; :meth:`Checkpointer.preempted`, asked at each step boundary on every rank, is true on
  every rank once any rank got the signal, after it has waited for the save in flight and saved
  the step (synchronously, unless that step is committed already): the loop then leaves, and
  the job exits before the scheduler's SIGKILL.

Under ``torch.distributed`` every rank of ``process_group`` makes the same calls in the same
order (each call is collective); the run directory is shared.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch.distributed as dist

from ..distributed.collective import collective_for
from ..distributed.preemption import Preemption
from ..errors import (
    CheckpointNotFoundError,
    InvalidKeyError,
    TesseraWarning,
    UncommittedCheckpointError,
)
from ..format.manifest import Manifest
from ..planning.options import SaveOptions
from ..state.stateful import is_stateful
from ..storage.local import LocalStorage
from ..storage.resolve import Location
from ..util.arguments import string_list
from .checkpoint import open_checkpoint
from .load import load
from .run_config import check_must_match, config_changes, normalize_config
from .run_dir import RunDirectory
from .run_layout import committed
from .run_metadata import (
    BOTH,
    ROLES,
    model_part,
    rng_for,
    role_by_type,
    run_info,
    run_metadata,
    template_for,
)
from .save import save
from .save_async import AsyncSave

__all__ = ["Checkpointer", "LoadMode", "Resumed"]


class LoadMode(enum.StrEnum):
    """What :meth:`Checkpointer.load` restores."""

    RESUME = "resume"
    """Every key (less the optimizer / RNG roles when asked); the run goes on at the saved step."""
    FINETUNE = "finetune"
    """The model role only; optimizer, RNG and progress stay as they are; the step starts at 0."""


@dataclass(frozen=True, slots=True)
class Resumed:
    """What :meth:`Checkpointer.load` did."""

    step: int
    """The step to go on from: the saved step on a resume, 0 on a finetune, a release or a fresh start."""
    path: str | None
    """Where it loaded from; ``None`` on a fresh start (the run had no checkpoint)."""
    mode: str
    """``"resume"``, ``"finetune"``, ``"release"`` (a release checkpoint) or ``"fresh"``."""
    loaded: tuple[str, ...] = ()
    """The top-level keys of the state that were loaded (also a ``ModelAndOptimizer`` of which
    only the model part was)."""
    skipped: tuple[str, ...] = ()
    """The top-level keys of the state left as they were."""
    config: dict[str, Any] | None = None
    """The configuration the checkpoint was saved with (``None`` if it has none)."""
    config_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Config keys that differ and may: ``{key: (saved, current)}``."""


class Checkpointer:
    """The checkpoints of one training run: ``save(step, state)``, ``load(state)``, ``save_release``.

    ``run`` is the run directory: a location (local path, URL of a registered scheme, a
    :class:`~tessera.storage.base.Storage`), made a :class:`~tessera.RunDirectory` with
    ``keep_last`` / ``keep_every``, or a ``RunDirectory`` (then retention is its own).
    ``config`` (a ``Namespace``, a dataclass or a mapping) is normalized to JSON now, refusing a
    value JSON cannot hold. ``options`` are the saves' :class:`~tessera.SaveOptions`. Use it as a
    context manager, or call :meth:`close`, so that an asynchronous save is waited for.
    """

    def __init__(
        self,
        run: Location | RunDirectory,
        *,
        config: Any = None,
        must_match: Iterable[str] = (),
        keep_last: int | None = None,
        keep_every: int | None = None,
        async_save: bool = False,
        options: SaveOptions | None = None,
        process_group: dist.ProcessGroup | None = None,
        roles: Mapping[str, str] | None = None,
        preemption: Preemption | None = None,
    ) -> None:
        if isinstance(run, RunDirectory):
            if keep_last is not None or keep_every is not None:
                raise ValueError("keep_last / keep_every are the RunDirectory's: set them where it is made")
            self.run = run
        else:
            self.run = RunDirectory(run, keep_last=keep_last, keep_every=keep_every)
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be a bool, got {async_save!r}")
        self.config = normalize_config(config)
        self.must_match = tuple(string_list(must_match, "must_match", "config keys"))
        self.async_save = async_save
        self.options = options
        self.process_group = process_group
        self.roles = dict(roles or {})
        bad = {k: r for k, r in self.roles.items() if r not in ROLES}
        if bad:
            raise InvalidKeyError(f"roles={bad}: unknown role; a role is one of {', '.join(ROLES)}")
        if preemption is not None and not isinstance(preemption, Preemption):
            raise TypeError(f"preemption must be a tessera.Preemption, got {preemption!r}")
        self.preemption = preemption
        self._installed = preemption is not None and not preemption.installed
        if preemption is not None and self._installed:
            preemption.install()
        self._closed = False

    def save(
        self, step: int, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None
    ) -> Manifest | AsyncSave:
        """Save ``state`` as step ``step`` (the number of completed steps) of the run; ``latest``
        moves to it once committed. ``metadata`` (JSON) is added to the run metadata.

        The manifest, or with ``async_save`` the :class:`~tessera.AsyncSave` handle (the state
        is in host memory on return; a failure is raised by the next call, see the module)."""
        return self._save(step, state, metadata, asynchronous=self.async_save)

    def _save(
        self, step: int, state: Mapping[str, Any], metadata: Mapping[str, Any] | None, *, asynchronous: bool
    ) -> Manifest | AsyncSave:
        self._check_open()
        RunDirectory.name_of(step)
        user = dict(metadata or {})
        reserved = sorted({"step", "run"} & set(user))
        if reserved:
            raise InvalidKeyError(
                f"metadata keys {reserved} are the Checkpointer's own (R10.13); name yours otherwise"
            )
        user["run"] = run_metadata("checkpoint", self.config, self._roles_of(state))
        if asynchronous:
            return self.run.save_async(
                state, step, options=self.options, metadata=user, process_group=self.process_group
            )
        return self.run.save(
            state, step, options=self.options, metadata=user, process_group=self.process_group
        )

    def preempted(self, step: int, state: Mapping[str, Any]) -> bool:
        """Whether the job must stop now, asked at the boundary after step ``step`` (the number of
        completed steps) on every rank (a collective: every rank calls it at the same steps).

        True on every rank once any rank received one of the :class:`~tessera.Preemption`'s
        signals; before returning True it waits for the save in flight and saves ``state`` as
        ``step``, synchronously, unless that step is committed already (a save of this very step
        just finished): the checkpoint is committed and ``latest`` names it on return, so the
        loop leaves and the job exits before the scheduler's SIGKILL. Refused (RuntimeError)
        without a ``preemption``."""
        self._check_open()
        if self.preemption is None:
            raise RuntimeError(
                "Checkpointer.preempted(): this Checkpointer has no preemption; make it with "
                "preemption=tessera.Preemption()"
            )
        if not self.preemption.stop_requested():
            return False
        self.run.wait()
        name = RunDirectory.name_of(step)
        collective = collective_for(self.process_group)
        saved = collective.broadcast(
            committed(self.run.storage, name) if collective.rank == 0 else None, "checking the last save"
        )
        if not saved:
            self._save(step, state, None, asynchronous=False)
        return True

    def save_release(self, location: Location, state: Mapping[str, Any]) -> Manifest:
        """Save the model role of ``state`` (weights only, no step) to ``location``, a new
        checkpoint outside the run: what a finetune or an export starts from (R10.13)."""
        self._check_open()
        roles = {k: r for k, r in self._roles_of(state).items() if r in ("model", BOTH)}
        weights = {k: model_part(state[k]) for k in roles}
        if not weights:
            raise InvalidKeyError(
                f"the state ({', '.join(map(str, state))}) has no key of role model: nothing to release; "
                "name one with roles={key: 'model'}"
            )
        metadata = {"run": run_metadata("release", self.config, roles)}
        return save(
            weights, location, options=self.options, metadata=metadata, process_group=self.process_group
        )

    def load(
        self,
        state: MutableMapping[str, Any],
        *,
        step: int | None = None,
        path: Location | None = None,
        mode: LoadMode | str = LoadMode.RESUME,
        load_optimizer: bool = True,
        load_rng: bool = True,
    ) -> Resumed:
        """Load a checkpoint into ``state`` in place: ``path`` (any checkpoint), else step ``step``
        of the run, else the run's ``latest``; a run with no checkpoint yet (and neither given) is a
        fresh start: nothing is loaded and the step is 0.

        Everything is checked before any tensor or object changes: the checkpoint is opened, its
        config checked, the mode applied, then one ``tessera.load`` checks every key, shape and
        dtype (a key of ``state`` the checkpoint lacks is refused naming it) and only then fills."""
        self._check_open()
        mode = _mode(mode)
        roles = self._roles_of(state)
        for name, flag in (("load_optimizer", load_optimizer), ("load_rng", load_rng)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if step is not None and path is not None:
            raise ValueError(
                "give step= or path=, not both: step picks a checkpoint of the run, path any other"
            )
        self.run.wait()  # an asynchronous save in flight may be the checkpoint to load
        found = self._locate(step, path)
        if found is None:
            return Resumed(0, None, "fresh", skipped=tuple(map(str, state)))
        location, where = found
        with open_checkpoint(location) as checkpoint:
            kind, saved_step, saved_config = run_info(checkpoint, where)
            check_must_match(saved_config, self.config, self.must_match, where)
            changes = {
                k: v for k, v in config_changes(saved_config, self.config).items() if k not in self.must_match
            }
            effective = "release" if kind == "release" else mode.value
            template = template_for(state, roles, effective, load_optimizer=load_optimizer, load_rng=load_rng)
            template = {k: rng_for(checkpoint, k, v) for k, v in template.items()}
            if effective != "resume" and not template:
                raise InvalidKeyError(
                    f"a {effective} loads the model role only, and the state ({', '.join(map(str, state))}) "
                    "has no key of role model; name one with roles={key: 'model'}"
                )
            load(checkpoint, template, process_group=self.process_group)
        for key, value in template.items():
            if not is_stateful(state[key]):
                state[key] = value  # a JSON value or tensor the load replaced in the template
        if changes and collective_for(self.process_group).rank == 0:
            listed = "; ".join(f"{k}: saved {s!r}, now {c!r}" for k, (s, c) in changes.items())
            warnings.warn(
                f"{where}: the config differs in keys that may differ: {listed}", TesseraWarning, stacklevel=2
            )
        return Resumed(
            saved_step if effective == "resume" else 0,
            where,
            effective,
            loaded=tuple(map(str, template)),
            skipped=tuple(str(k) for k in state if k not in template),
            config=saved_config,
            config_changes=changes,
        )

    def wait(self) -> None:
        """Wait for the asynchronous save in flight; raise its failure if no call has raised it yet."""
        self.run.wait()

    def close(self) -> None:
        """Wait for the asynchronous save in flight (raising its failure, once) and uninstall the
        preemption handler if this Checkpointer installed it; later calls are refused."""
        if self._closed:
            return
        self._closed = True
        try:
            self.run.wait()
        finally:
            if self._installed and self.preemption is not None:
                self.preemption.uninstall()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as failure:  # the body's exception goes on; this one rides along as a note
            exc.add_note(f"and closing the Checkpointer failed too: {type(failure).__name__}: {failure}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this Checkpointer of {self.run.storage.location} is closed")

    def _roles_of(self, state: Mapping[str, Any]) -> dict[str, str]:
        """The role of each top-level key of ``state`` (``BOTH`` for a ModelAndOptimizer)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"the state is a dict of the run's objects, not a {type(state).__qualname__}")
        unknown = sorted(map(str, set(self.roles) - set(state)))
        if unknown:
            raise InvalidKeyError(
                f"roles= names keys the state does not have: {unknown}; its keys: {sorted(map(str, state))}"
            )
        return {k: self.roles.get(k) or role_by_type(v) for k, v in state.items()}

    def _locate(self, step: int | None, path: Location | None) -> tuple[Location, str] | None:
        """The checkpoint to load and its name for messages; ``None`` for a run with none yet."""
        if path is not None:
            return path, str(path.location if hasattr(path, "location") else path)
        storage = self.run.storage
        if step is None:
            latest = self.run.latest()
            if latest is None:
                return None
            return latest, str(latest) if isinstance(latest, Path) else latest.location
        name = RunDirectory.name_of(step)
        where = f"{storage.location}/{name}"
        saved = [c.step for c in self.run.checkpoints() if c.committed]
        if storage.kind(name) is None:
            raise CheckpointNotFoundError(
                f"{where} does not exist: step {step} was not saved in this run, or retention deleted "
                f"it; its committed steps: {saved}"
            )
        if not committed(storage, name):
            raise UncommittedCheckpointError(
                f"{where} is not committed (its save failed, was killed or is running); load another "
                f"step: the committed ones are {saved}"
            )
        return (
            Path(storage.location) / name if isinstance(storage, LocalStorage) else storage.child(name)
        ), where


def _mode(mode: LoadMode | str) -> LoadMode:
    try:
        return LoadMode(mode)
    except ValueError:
        names = ", ".join(repr(m.value) for m in LoadMode)
        raise InvalidKeyError(f"mode={mode!r} is not a load mode; use one of {names}") from None
