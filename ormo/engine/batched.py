"""Batched in-flight gradients: the messages of several workers computed together.

A message depends only on its worker's snapshot, its own state and its minibatch keys, never on later server
updates, so every message already dispatched can be computed before the server consumes it. When the server needs a
message that is not computed yet, :class:`BatchedMessages` computes it together with up to ``max_batch - 1`` other
dispatched ones (those expected to arrive next) in one ``grad_batch`` call per local step: one-step methods make one
call; local methods run their H steps in lock-step, each worker's ``rule.work`` running as a coroutine (a thread
that runs only while the others wait, so the arithmetic is the same as in one thread) which pauses at every
gradient it asks for.

The computed messages wait in a cache until consumed; a checkpoint saves them (they are the run's state: recomputing
them in another batch composition could round differently), so a resumed batched run continues bit for bit.
Errors (a NaN gradient, a bad tensor) are kept with the message and raised when the server consumes it, naming the
iteration then, exactly as the sequential path would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from ..rules.base import Message, Payload, Rule, WorkerState

#: ``grad_batch([(params, worker, index, step), ...]) -> [gradient, ...]``: the stochastic gradients of several
#: requests at once, one new tensor each (not aliasing another's memory), in the order of the requests
GradBatchFn = Callable[[list[tuple[Tensor, int, int, int]]], Sequence[Tensor]]

#: placeholder for the server iteration in an error computed before its message was consumed
T_UNKNOWN = "t=?"


class _Coroutine:
    """``fn(grad)`` in a thread that pauses at each ``grad(x, step)`` call until :meth:`resume` gives the gradient.

    Only one side runs at a time (a strict hand-off), so nothing runs concurrently and the results are those of a
    plain call. Thread-local torch state (grad mode) starts at its defaults in the thread: ``rule.work`` needs none.
    """

    def __init__(self, fn: Callable[[Callable[[Tensor, int], Tensor]], Message]) -> None:
        self.request: tuple[Tensor, int] | None = None
        self.result: Message | None = None
        self.error: BaseException | None = None
        self.finished = False
        self._reply: Any = None
        self._turn = "caller"  # who runs: "caller" or "worker"; only the side handing over changes it
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._main, args=(fn,), daemon=True, name="ormo-batched-worker")
        self._thread.start()

    def _hand_over(self, to: str) -> None:
        with self._cond:
            self._turn = to
            self._cond.notify_all()
            while self._turn == to:
                self._cond.wait()

    def _main(self, fn: Callable[[Callable[[Tensor, int], Tensor]], Message]) -> None:
        with self._cond:
            while self._turn != "worker":
                self._cond.wait()
        try:
            self.result = fn(self._grad)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            self.error = e
        with self._cond:
            self.request, self.finished, self._turn = None, True, "caller"
            self._cond.notify_all()

    def _grad(self, x: Tensor, step: int) -> Tensor:
        self.request = (x, step)
        self._hand_over("caller")
        reply, self._reply = self._reply, None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def resume(self, reply: Any) -> None:
        """Answer the pending request (a gradient, or an exception to raise at the call; None to start) and run to
        the next one."""
        self._reply = reply
        self._hand_over("worker")
        if self.finished:
            self._thread.join()

    def abandon(self, error: BaseException) -> None:
        """End the thread: wait for its turn to end (the caller was interrupted while it ran), then answer every
        request with ``error`` until ``work`` gives up."""
        with self._cond:
            while self._turn == "worker":
                self._cond.wait()
        while not self.finished:
            self.resume(error)


def run_lockstep(
    rule: Rule,
    jobs: list[tuple[int, Payload, WorkerState | None]],
    compute: Callable[[list[tuple[int, Tensor, int]]], list[Tensor | BaseException]],
) -> dict[int, Message | BaseException]:
    """``rule.work`` for each ``(worker, payload, worker_state)`` of ``jobs``, their gradients computed together.

    ``compute([(worker, x, step), ...])`` answers the gradient requests of one round (one per unfinished worker),
    each with a checked gradient or the exception its ``grad`` call raises. Returns each worker's message or the
    exception its ``work`` raised. An exception of ``compute`` itself (or an interrupt) ends every paused thread
    before it propagates.
    """
    out: dict[int, Message | BaseException] = {}
    if type(rule).work is Rule.work:  # one gradient at the received point: no coroutines needed
        answers = compute([(w, p.params, 0) for w, p, _ in jobs])
        for (w, p, ws), g in zip(jobs, answers, strict=True):

            def given(x: Tensor, step: int, g: Tensor | BaseException = g) -> Tensor:
                if isinstance(g, BaseException):
                    raise g
                return g

            try:
                out[w] = rule.work(p, given, ws)
            except Exception as e:  # noqa: BLE001 - kept with the message
                out[w] = e
        return out
    running: dict[int, _Coroutine] = {}
    try:
        for w, p, ws in jobs:
            running[w] = c = _Coroutine(lambda grad, p=p, ws=ws: rule.work(p, grad, ws))
            c.resume(None)
        while True:
            for w in [w for w, c in running.items() if c.finished]:
                c = running.pop(w)
                out[w] = c.error if c.error is not None else c.result  # type: ignore[assignment]
            if not running:
                return out
            asked = [(w, c.request[0], c.request[1]) for w, c in running.items()]  # type: ignore[index]
            answers = compute(asked)
            for (w, _, _), g in zip(asked, answers, strict=True):
                running[w].resume(g)
    except BaseException as e:  # the run fails or is interrupted: no thread is left waiting
        for c in running.values():
            c.abandon(e)
        raise
