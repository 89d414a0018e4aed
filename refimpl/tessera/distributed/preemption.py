"""Stop a training run at a step boundary when the cluster asks, on every rank together.

Cluster schedulers warn a job before they kill it: Slurm sends SIGTERM (and, with
``--signal``, SIGUSR1 a chosen time earlier), Kubernetes sends SIGTERM and waits the pod's
grace period. SIGTERM's default action ends the process at once, in the middle of a step or a
save; :class:`Preemption` replaces that action with a note, and the training loop asks
:meth:`Preemption.stop_requested` at each step boundary, saves, and leaves the loop::

    with tessera.Preemption() as preemption:
        for step in range(start, steps):
            train_one_step()
            if preemption.stop_requested():     # every rank calls it, at every step
                save(step + 1)
                break

Call order and who calls: the main thread of every rank constructs it and calls
:meth:`~Preemption.install` (or enters it as a context manager) before the loop; every rank of
the process group calls :meth:`~Preemption.stop_requested` at the same step boundaries (it is
a collective, like ``all_reduce``); :meth:`~Preemption.uninstall` (or the context's exit)
restores the handlers that were there before, after the final save.

What it decides, and why:

- **The handler only takes note.** Python runs a signal handler in the main thread between two
  bytecodes of whatever it was doing, a save or a lock-holding logging call included, so the
  handler does no I/O, takes no lock and calls no torch: it stores the signal's number.
  Everything else happens at the next :meth:`~Preemption.stop_requested`.
- **Every rank stops at the same step.** Schedulers often signal only some processes (the
  launcher, one node's tasks); :meth:`~Preemption.stop_requested` all-reduces the flag (MAX of
  one ``int32``, on the CPU under gloo, on the current CUDA device under NCCL alone) over the
  process group, so it answers the same on every rank, and a rank that never saw the signal
  saves and stops with the others. It costs one small all-reduce per call: 0.4 to 1.4 ms
  between 2 or 3 gloo ranks on a shared 2-core machine (``bench/bench_preemption.py``), and
  under NCCL reading the answer waits for the step's queued GPU work. That is small beside a
  training step, so ask at every step; there is no ``check_every`` setting, because the loop
  owns the step count: a loop of very short steps asks ``if step % k == 0 and
  preemption.stop_requested()``, the same ``k`` on every rank.
  Without ``torch.distributed`` initialized (or in a group of one) it answers from this
  process's flag alone, with no communication.
- **Main thread only.** Python runs signal handlers in the main thread and lets only the main
  thread set them, so :meth:`~Preemption.install` and :meth:`~Preemption.uninstall` anywhere
  else are refused (``ValueError``) instead of silently installing nothing.
- **The previous handlers come back.** :meth:`~Preemption.install` keeps each signal's handler
  (default, ignored or a Python function) and :meth:`~Preemption.uninstall` puts it back, unless
  someone replaced the handler after the install: that one is left in place, with a
  :class:`~tessera.errors.TesseraWarning`. The previous handler is not also called: the point is
  to keep SIGTERM's default action (or a launcher's handler that raises) from ending the process
  before the save. A handler installed outside Python (``signal.getsignal`` gives ``None``)
  could not be restored, so the install is refused.
- **A second signal changes nothing.** A request stays requested; :attr:`~Preemption.received`
  keeps the first signal. A scheduler that will not wait sends SIGKILL, which no process can
  catch; to stop at once after the first signal, uninstall and let the default action run.
- **Forked children keep the old behaviour.** A process forked after the install (a data
  loader's worker) inherits the handler; there it passes the signal on to the previous handler
  (re-sending it under the default action), so ``terminate()`` still ends a worker.
- **Installed, or refused.** :meth:`~Preemption.stop_requested` on a Preemption that is not
  installed is refused (``RuntimeError``): it could never see a signal, and answering ``False``
  for ever would hide the mistake.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any

import torch.distributed as dist

from ..errors import TesseraWarning
from .collective import collective_for

__all__ = ["Preemption"]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})


def _signals(signals: Iterable[signal.Signals]) -> tuple[signal.Signals, ...]:
    """The signals to handle, checked: each a catchable ``signal.Signals`` (or its number), once."""
    if isinstance(signals, (str, bytes)) or not isinstance(signals, Iterable):
        raise TypeError(f"Preemption: signals must be an iterable of signal.Signals, got {signals!r}")
    found: list[signal.Signals] = []
    for sig in signals:
        if isinstance(sig, bool) or not isinstance(sig, int):
            raise TypeError(f"Preemption: each signal must be a signal.Signals, got {sig!r}")
        try:
            checked = signal.Signals(sig)
        except ValueError:
            raise ValueError(f"Preemption: {sig!r} is not a signal of this platform") from None
        if checked in _UNCATCHABLE:
            raise ValueError(
                f"Preemption: {checked.name} cannot be caught by any process; use SIGTERM or SIGUSR1"
            )
        if checked not in found:
            found.append(checked)
    if not found:
        raise ValueError(
            "Preemption: no signal to handle; give at least one (the default is SIGTERM and SIGUSR1)"
        )
    return tuple(found)


def _require_main_thread(what: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise ValueError(
            f"Preemption.{what}() called in thread {threading.current_thread().name!r}: Python runs "
            "signal handlers in the main thread and lets only the main thread set them; call it "
            "from the main thread of each rank"
        )


class Preemption:
    """A note of a scheduler's stop signal, and a collective answer to "stop now?".

    ``signals``: those that mean "save and stop" (default SIGTERM and SIGUSR1; SIGKILL and
    SIGSTOP cannot be caught). ``process_group``: the ranks that stop together (default: the
    whole world), resolved at each :meth:`stop_requested`, so the object may be made before
    ``torch.distributed`` is initialized. The module docstring says what each choice is and why.
    """

    def __init__(
        self,
        signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1),
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.signals = _signals(signals)
        self.process_group = process_group
        self._received: int | None = None
        self._previous: dict[signal.Signals, _Handler] = {}
        self._pid = os.getpid()

    @property
    def installed(self) -> bool:
        """Whether this object's handlers are installed (between install() and uninstall())."""
        return bool(self._previous)

    @property
    def received(self) -> signal.Signals | None:
        """The first of ``signals`` this process received while installed; ``None`` before one.

        Local to this rank: the ranks that were not signalled see ``None`` here while
        :meth:`stop_requested` is true on every rank."""
        return None if self._received is None else signal.Signals(self._received)

    def install(self) -> None:
        """Replace the handlers of ``signals`` with the note-taking one (main thread only).

        Refused, before any handler changes, outside the main thread, when already installed,
        or when a signal's handler was set outside Python (it could not be restored)."""
        _require_main_thread("install")
        if self.installed:
            raise RuntimeError("Preemption.install(): already installed; uninstall() it first")
        previous = {sig: signal.getsignal(sig) for sig in self.signals}
        foreign = [sig.name for sig, handler in previous.items() if handler is None]
        if foreign:
            raise ValueError(
                f"Preemption.install(): the handler of {', '.join(foreign)} was set outside Python "
                "(signal.getsignal gives None) and could not be restored afterwards; leave that "
                "signal out of Preemption(signals=...)"
            )
        self._pid = os.getpid()
        try:
            for sig in self.signals:
                signal.signal(sig, self._handle)
                self._previous[sig] = previous[sig]
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        """Restore the handlers that were there at install(); nothing when not installed.

        A handler that someone else set after install() is left in place, with a
        TesseraWarning. A request already received stays (``received``, ``stop_requested``)."""
        if not self.installed:
            return
        _require_main_thread("uninstall")
        replaced = []
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler)
            else:
                replaced.append(sig.name)
        self._previous = {}
        if replaced:
            warnings.warn(
                f"Preemption.uninstall(): the handler of {', '.join(replaced)} was replaced after "
                "install(); the new one is left in place, the one from before install() is not restored",
                TesseraWarning,
                stacklevel=2,
            )

    def stop_requested(self) -> bool:
        """Whether any rank of the group received one of ``signals``: the same answer on every rank.

        A collective: every rank of the process group calls it at the same step boundaries,
        in the same order as its other collectives. A failed or timed-out all-reduce (a rank
        died) is a CollectiveError. Refused (RuntimeError) when not installed."""
        if not self.installed:
            raise RuntimeError(
                "Preemption.stop_requested(): not installed, so no signal could be seen; call "
                "install() first or use the Preemption as a context manager (with ... as preemption:)"
            )
        collective = collective_for(self.process_group)
        signalled = self._received is not None
        return collective.any_true(signalled, "the preemption check (Preemption.stop_requested)")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: notes the first signal, nothing else (see the module docstring)."""
        if os.getpid() != self._pid:
            self._pass_on(signum, frame)
        elif self._received is None:
            self._received = signum

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        """In a process forked after install(): what the handler from before install() would do."""
        previous = self._previous.get(signal.Signals(signum), signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> Preemption:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()
