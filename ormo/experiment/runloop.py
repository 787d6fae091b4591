"""Pieces of the training loop shared by the simulator and Ray runs: when to evaluate and checkpoint, how a signal
stops a run (:class:`RunStopped`), and the progress bar."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .rundir import CHECKPOINT


class RunStopped(KeyboardInterrupt):
    """A run stopped by a signal (SIGINT: Ctrl-C, or SIGTERM) after writing a checkpoint; ``--resume`` continues it.

    A ``KeyboardInterrupt`` so that code which treats Ctrl-C as "stop" keeps working; ``exit_code`` is the shell's
    convention for death by that signal (130 for SIGINT, 143 for SIGTERM), for callers that exit on it.
    ``t`` is the iteration of the checkpoint written on the way out (None when the run stopped between periodic
    checkpoints, e.g. on Ray: the last periodic one is where ``--resume`` continues)."""

    def __init__(self, signum: int, *, t: int | None = None, run_dir: str | Path | None = None) -> None:
        self.signum, self.t, self.run_dir = int(signum), t, run_dir
        # stopped before any checkpoint (e.g. while Ray was starting): the resume starts the run over
        self.fresh = t is None and run_dir is not None and not (Path(run_dir) / CHECKPOINT).exists()
        super().__init__(str(self))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name if self.signum in signal.Signals._value2member_map_ else \
            f"signal {self.signum}"
        where = f"stopped at iteration {self.t} by {name}; checkpoint written" if self.t is not None else \
            f"stopped by {name}; the last checkpoint is kept"
        resume = f"`ormo train --resume {self.run_dir}`" if self.run_dir is not None else "`ormo train --resume`"
        if self.fresh:
            return f"stopped by {name} before the first checkpoint; {resume} starts the run over"
        return f"{where}; {resume} continues"


class DeferredInterrupt:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag that the training loop reads between iterations, so that the
    checkpoint written on the way out is taken at a clean iteration boundary. A second signal interrupts at once
    (the last periodic checkpoint stays valid). Only in the main thread, where Python delivers signals."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # a second signal that reached this handler (both came at once): stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = signum
        self._restore()  # the next signal acts immediately

    def reinstall(self) -> None:
        """Take the signals back after a library replaced the handlers (``ray.init`` installs its own for SIGTERM,
        which exits at once); nothing once a signal has arrived, so that the next one still acts immediately."""
        if self.requested is None and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                old = signal.signal(sig, self._handle)
                self._old.setdefault(sig, old)

    def _restore(self) -> None:
        kept: dict[int, Any] = {}
        for sig, handler in self._old.items():
            try:
                signal.signal(sig, handler)
            except OSError:  # "ignored due to race condition": that signal is pending; this handler takes it
                kept[sig] = handler
        self._old = kept

    def __exit__(self, *exc: Any) -> None:
        self._restore()


class StopOnSignal:
    """SIGINT and SIGTERM raise :class:`RunStopped` at once (for loops that cannot stop at a boundary of their own,
    like the Ray driver's wait: the run continues from its last periodic checkpoint). Main thread only."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = run_dir
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        raise RunStopped(signum, run_dir=self.run_dir)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in DeferredInterrupt.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


class Marks:
    """The iterations at which to act every ``every_epochs`` epochs, and ``total`` (the end): a set answered in O(1)
    whatever the interval (a run may evaluate every message, or every 1e-9 epochs, over any number of iterations).
    A periodic mark within half an interval of ``total`` is dropped: the end's own evaluation follows it within a
    message or so, and the curve would end on two points taken one message apart."""

    def __init__(self, every_epochs: float, messages_per_epoch: float, total: int) -> None:
        self.interval, self.total = every_epochs * messages_per_epoch, total

    def __contains__(self, t: object) -> bool:
        if not isinstance(t, int) or isinstance(t, bool):
            return False
        if t == self.total:
            return True
        if not 0 < t < self.total or self.total - t < self.interval / 2:
            return False
        if self.interval < 1:  # steps under one message: every iteration is round(k * interval) for some k
            return True
        k0 = math.floor(t / self.interval)
        return any(k >= 1 and round(k * self.interval) == t for k in range(k0 - 1, k0 + 3))

    def __iter__(self) -> Iterator[int]:  # ascending
        if self.interval < 1:
            yield from (t for t in range(1, self.total) if t in self)
        elif self.interval < self.total:  # an interval past the end (inf included) marks nothing before it
            k, seen = 1, 0
            while (t := round(k * self.interval)) < self.total:
                if t > seen and t in self:
                    yield t
                    seen = t
                k += 1
        yield self.total

    def __eq__(self, other: object) -> bool:
        return set(self) == other if isinstance(other, set | frozenset) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


def iteration_marks(every_epochs: float, messages_per_epoch: float, total: int) -> Marks:
    """:class:`Marks` of a run of ``total`` iterations."""
    return Marks(every_epochs, messages_per_epoch, total)


def progress_bar(total: int, initial: int, name: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, desc=name, unit="msg", dynamic_ncols=True, leave=True)


def shown_metric(row: dict, task: Any) -> dict[str, str]:
    """The progress bar's entry for the task's primary metric (``acc=90.12`` for image classification): the test
    split's value, else (``train.eval_test = false``) the validation's."""
    from ..task import primary_metric

    name = primary_metric(task)
    for key, prefix in ((f"test_{name}", ""), (f"val_{name}", "val ")):
        value = row.get(key)
        if value is not None and value == value:  # not None, not NaN
            return {name: f"{prefix}{value:.4g}" if name != "acc" else f"{prefix}{value:.2f}"}
    return {name: "-"}
