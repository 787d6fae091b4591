"""Deterministic discrete-event simulator of a parameter server with K workers (spec §2).

Each server iteration ``t`` consumes exactly one message. Arrivals come from one of three sources:

* a timing model: a heap of ``(arrival_time, dispatch_seq, worker)``; ties go to the earlier dispatch, and the
  initial broadcast dispatches workers in id order;
* an explicit ``order`` (one worker id per iteration): the clock is nominal, each message taking the timing
  model's compute time from its dispatch but never arriving before the previous one;
* :class:`~ormo.engine.timing.Replay`: the order and times of a recorded log.

Gradients are computed lazily, when the server consumes the message, on the snapshot the worker received, with
``grad_fn(params, worker, index, step)``. Because the minibatch is keyed by (worker, index, step), any two rules fed
the same arrival order see the same data, and a run replays bit for bit.
"""

from __future__ import annotations

import heapq
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..rules.base import (
    SCHEDULERS,
    ConfigError,
    Message,
    Payload,
    Rule,
    ServerState,
    WorkerState,
    check_bool,
    check_choice,
    check_int_at_least,
    check_num_workers,
    invalid,
    set_rate_factor,
)
from .batched import T_UNKNOWN, GradBatchFn, run_lockstep
from .events import Event, EventLog
from .timing import Homogeneous, Replay, WorkerClock, check_seed, check_timing

#: ``grad_fn(params, worker, index, step) -> Tensor``: stochastic gradient at ``params``.
GradFn = Callable[[Tensor, int, int, int], Tensor]
Callback = Callable[[Event, ServerState], None]

_DTYPES = (torch.float32, torch.float64)


class SimulationError(RuntimeError):
    """A run stopped on bad data. ``t``, ``worker``, ``index`` (and ``step``) locate the message; ``partial`` is the
    result up to the last applied iteration (the parameters were not touched by the bad message)."""

    def __init__(self, msg: str, *, t: int, worker: int, index: int, step: int | None = None) -> None:
        super().__init__(msg)
        self.t, self.worker, self.index, self.step = t, worker, index, step
        self.partial: SimulationResult | None = None


class NonFiniteError(SimulationError, FloatingPointError):
    """A gradient or message with NaN or Inf values."""


class GradFnError(SimulationError, ValueError):
    """``grad_fn`` returned something that is not a tensor of the parameters' shape, dtype and device."""


class GrowthWarning(UserWarning):
    """The server parameters grew by orders of magnitude: the run is probably diverging (warned once per run).

    Issued when ``‖w_t‖ > GROWTH_FACTOR · max(‖w_0‖, 1)`` at a checked iteration (see ``growth_check_due``). A
    run that keeps growing ends in a NaN/Inf (:class:`NonFiniteError`) much later, after wasting its iterations;
    turn the warning into an error with ``warnings.simplefilter("error", ormo.GrowthWarning)`` to stop at once.
    """


#: ‖w_t‖ above this multiple of max(‖w_0‖, 1) is "grown by orders of magnitude"
GROWTH_FACTOR = 1e3
#: after the powers of two, the norm is checked every this many iterations
GROWTH_CHECK_EVERY = 256


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside the ormo package (the user's call to
    ``simulate``, ``Simulator.step`` or ``train``), not to the simulator's internals."""
    package = os.path.dirname(os.path.dirname(__file__)) + os.sep  # .../ormo/
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def growth_check_due(t: int) -> bool:
    """Whether the growth of ``w_{t+1}`` is checked after iteration ``t``: when ``t + 1`` is a power of two (early
    blow-ups are caught early) or a multiple of ``GROWTH_CHECK_EVERY``. One norm per check, so ≲ 1 % of the passes
    an iteration makes over the parameters anyway."""
    n = t + 1
    return n & (n - 1) == 0 or n % GROWTH_CHECK_EVERY == 0


@dataclass
class SimulationResult:
    """What a simulation produced.

    ``params``: the final server parameters ``w_T`` (a copy, same dtype as ``params0``). ``events``: one record per
    server iteration. ``state``: the rule's final server state; ``worker_states``: each worker's own state (None for
    most rules). ``sim_time_s``: simulated time of the last arrival. ``messages_per_worker``: consumed messages of
    each worker. ``idle_time_s``: per worker, time spent waiting for the round to finish (sync scheduler; zeros
    under async, where a worker is re-dispatched on arrival).
    """

    params: Tensor
    events: EventLog
    state: ServerState
    worker_states: list[WorkerState | None]
    rule: Rule
    scheduler: str
    num_workers: int
    sim_time_s: float
    messages_per_worker: list[int]
    idle_time_s: list[float]
    delay: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Delay statistics (mean, max, p50, p90, p99), messages per worker, idle time, simulated time."""
        return {
            "rule": self.rule.name,
            "scheduler": self.scheduler,
            "num_workers": self.num_workers,
            "iterations": len(self.events),
            "sim_time_s": self.sim_time_s,
            "delay": dict(self.delay),
            "messages_per_worker": list(self.messages_per_worker),
            "idle_time_s": list(self.idle_time_s),
            "idle_fraction": (
                sum(self.idle_time_s) / (self.num_workers * self.sim_time_s) if self.sim_time_s > 0 else 0.0
            ),
        }


def delay_stats(delays: np.ndarray) -> dict[str, float]:
    if delays.size == 0:
        return {"mean": 0.0, "max": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    p50, p90, p99 = np.percentile(delays, [50, 90, 99])
    return {
        "mean": float(delays.mean()),
        "max": float(delays.max()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
    }


# --------------------------------------------------------------------------------------------------------
# input checks


def _check_params(params0: Any) -> Tensor:
    if not isinstance(params0, Tensor):
        raise invalid("params0", type(params0).__name__, "a 1-D torch.Tensor of float32 or float64")
    if params0.dim() != 1:
        raise invalid("params0.shape", tuple(params0.shape), "1-D (flatten the model's parameters first)")
    if params0.dtype not in _DTYPES:
        raise invalid("params0.dtype", params0.dtype, "torch.float32 or torch.float64")
    if params0.numel() == 0:
        raise invalid("params0", "an empty tensor", "at least one parameter")
    if not bool(torch.isfinite(params0).all()):
        raise invalid("params0", "a tensor with NaN/Inf values", "finite")
    return params0.detach()  # e.g. parameters_to_vector(model.parameters()): no autograd graph across the run


def check_order(order: Any, num_workers: int, scheduler: str) -> list[int]:
    """Validate an explicit arrival order: worker ids in ``[0, K)``; under the sync scheduler every consecutive
    block of K entries is a permutation of the workers (the last block may be partial, with distinct ids)."""
    if isinstance(order, str | bytes) or not isinstance(order, Sequence | np.ndarray):
        raise invalid("order", type(order).__name__, "a list of worker ids, one per server iteration")
    out: list[int] = []
    for t, k in enumerate(order):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= int(k) < num_workers:
            raise invalid(f"order[{t}]", k, f"a worker id in [0, {num_workers})")
        out.append(int(k))
    if scheduler == "sync":
        for start in range(0, len(out), num_workers):
            block = out[start : start + num_workers]
            if len(set(block)) != len(block):
                dup = next(k for k in block if block.count(k) > 1)
                raise ConfigError(
                    f"invalid order[{start}:{start + len(block)}]: {block} is not feasible under the sync scheduler "
                    f"(worker {dup} appears twice in one round; each block of num_workers={num_workers} entries "
                    f"must be a permutation of the workers)"
                )
    return out


# --------------------------------------------------------------------------------------------------------
# arrival sources


class _HeapSource:
    """Arrivals by simulated time."""

    def __init__(self, clock: WorkerClock) -> None:
        self.clock, self.heap, self.seq = clock, [], 0

    def dispatch(self, worker: int, now: float, steps: int) -> None:
        heapq.heappush(self.heap, (now + self.clock.duration(worker, steps), self.seq, worker))
        self.seq += 1

    def next(self, t: int, last_time: float) -> tuple[int, float]:
        arrival, seq, worker = heapq.heappop(self.heap)
        self._last = (arrival, seq, worker)
        return worker, arrival

    def undo(self, t: int, worker: int, arrival: float) -> None:
        heapq.heappush(self.heap, self._last)

    def upcoming(self, t: int) -> list[int]:
        """The dispatched workers, soonest arrival first."""
        return [w for _, _, w in sorted(self.heap)]

    def check_index(self, t: int, index: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"heap": list(self.heap), "seq": self.seq, "clock": self.clock.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.heap = [tuple(h) for h in sd["heap"]]
        heapq.heapify(self.heap)
        self.seq = sd["seq"]
        self.clock.load_state_dict(sd["clock"])


class _OrderSource:
    """Arrivals in a given order, on a nominal clock."""

    def __init__(self, order: list[int], clock: WorkerClock) -> None:
        self.order, self.clock = order, clock
        self.ready: dict[int, float] = {}

    def dispatch(self, worker: int, now: float, steps: int) -> None:
        self.ready[worker] = now + self.clock.duration(worker, steps)

    def next(self, t: int, last_time: float) -> tuple[int, float]:
        worker = self.order[t]
        self._last = self.ready.pop(worker)
        return worker, max(self._last, last_time)

    def undo(self, t: int, worker: int, arrival: float) -> None:
        self.ready[worker] = self._last

    def upcoming(self, t: int) -> list[int]:
        return _by_order(self.order, t)

    def check_index(self, t: int, index: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"ready": dict(self.ready), "clock": self.clock.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.ready = dict(sd["ready"])
        self.clock.load_state_dict(sd["clock"])


class _ReplaySource:
    """Arrivals exactly as recorded."""

    def __init__(self, log: EventLog) -> None:
        self.workers, self.times = log.workers, log.column("sim_time").tolist()
        self.indices = log.column("index").tolist()

    def dispatch(self, worker: int, now: float, steps: int) -> None:
        pass

    def next(self, t: int, last_time: float) -> tuple[int, float]:
        return self.workers[t], self.times[t]

    def undo(self, t: int, worker: int, arrival: float) -> None:
        pass

    def upcoming(self, t: int) -> list[int]:
        return _by_order(self.workers, t)

    def check_index(self, t: int, index: int) -> None:
        if index != self.indices[t]:
            raise ConfigError(
                f"the replayed log says iteration t={t} consumed index {self.indices[t]}, but replaying it here gives "
                f"index {index}: the log was recorded with another scheduler or another rule's messages"
            )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def ahead_problem(rule: Rule, scheduler: str, batch: int, defer_checks: bool | str) -> str | None:
    """Why messages cannot be computed ahead (``Simulator(ahead=True)``) with these settings; None when they can."""
    if scheduler != "async":
        return "a synchronous round shares one copy of the parameters already"
    if type(rule).work is not Rule.work or type(rule).init_worker is not Rule.init_worker:
        return (f"the rule {rule.name!r} takes local steps or keeps a worker state (computing ahead is for one-step "
                f"methods, whose message is one gradient)")
    if batch:
        return "batched gradients (batch > 0) compute messages ahead already"
    if defer_checks is True:
        return ("defer_checks=True notes each gradient's check under its iteration, not known when it is computed "
                "ahead (use False or \"state\")")
    return None


def _span(x: Tensor) -> tuple[int, int]:
    """The addresses a 1-D tensor's elements lie in: [first, past the last)."""
    return x.data_ptr(), x.data_ptr() + ((x.numel() - 1) * x.stride(0) + 1) * x.element_size()


def _by_order(order: Sequence[int], t: int) -> list[int]:
    """Workers in the order of their next appearance in ``order`` from ``t`` (a window of the next entries; the
    simulator appends the workers not seen there)."""
    seen: dict[int, None] = {}
    for w in order[t : t + 4096]:
        seen.setdefault(w, None)
    return list(seen)


# --------------------------------------------------------------------------------------------------------


def _copy_payload(p: Payload, into: Tensor | None) -> tuple[Payload, Tensor]:
    """Snapshot a payload (it may alias the server state). Reuses ``into`` as the parameter buffer when given."""
    buf = into.copy_(p.params) if into is not None else p.params.clone()
    mom = p.momentum.clone() if p.momentum is not None else None
    return Payload(index=p.index, params=buf, momentum=mom, lr_scale=p.lr_scale), buf


def _owned(x: Tensor | None, copy: bool) -> Tensor | None:
    """``x`` to save: a copy when asked, or when it views a larger storage (a row of a batched gradient), which
    ``torch.save`` would write whole."""
    if x is None:
        return None
    if copy or x.untyped_storage().nbytes() != x.numel() * x.element_size():
        return x.clone()
    return x


def _computed_state(m: Message | SimulationError, copy: bool, bad_step: Tensor | None = None) -> dict[str, Any]:
    if isinstance(m, SimulationError):
        return {"error": type(m).__name__, "text": str(m), "worker": m.worker, "index": m.index, "step": m.step}
    return {"index": m.index, "update": _owned(m.update, copy), "momentum": _owned(m.momentum, copy),
            "local_lr_scale": m.local_lr_scale,
            **({"bad_step": int(bad_step)} if bad_step is not None else {})}  # deferred checks: read here


def _computed_from_state(d: dict[str, Any]) -> Message | SimulationError:
    if "error" in d:
        cls = {"NonFiniteError": NonFiniteError, "GradFnError": GradFnError}.get(d["error"], SimulationError)
        return cls(d["text"], t=-1, worker=int(d["worker"]), index=int(d["index"]), step=d["step"])
    return Message(index=int(d["index"]), update=d["update"].clone(),
                   momentum=d["momentum"].clone() if d["momentum"] is not None else None,
                   local_lr_scale=float(d["local_lr_scale"]))


def _worker_state_dict(w: Any, copy: bool) -> dict[str, Any] | None:
    if w is None:
        return None
    if not copy and type(w).state_dict is WorkerState.state_dict:  # a rule's own state class copies as it likes
        return w.state_dict(copy=False)
    return w.state_dict()


class Simulator:
    """The discrete-event loop of spec §2.2, one server iteration per :meth:`step`, resumable bit for bit.

    Arguments are those of :func:`simulate` (``num_iterations`` only bounds what an ``order``/``Replay`` allows),
    plus ``lr_schedule(t) -> float``: a factor on the rate the rule's ``scheduled_rate`` names, set before iteration
    ``t``: the server's η (``state.lr_scale``, gradient methods) or the workers' γ (``state.local_lr_scale``, sent
    with the payloads of iteration ``t``; local-update methods).

    :meth:`state_dict` captures everything that determines the rest of the run (rule and worker states, what each
    worker was sent, pending arrivals, every random generator, the event log); :meth:`load_state_dict` on a freshly
    built simulator with the same arguments continues exactly where it stopped.
    """

    def __init__(
        self,
        rule: Rule,
        params0: Tensor,
        grad_fn: GradFn,
        *,
        num_workers: int,
        num_iterations: int | None = None,
        order: Sequence[int] | None = None,
        timing: Any = None,
        seed: int = 0,
        scheduler: str | None = None,
        check_finite: bool = True,
        lr_schedule: Callable[[int], float] | None = None,
        on_redispatch: Callable[[int], None] | None = None,
        batch: int = 0,
        grad_batch: GradBatchFn | None = None,
        on_consume: Callable[[int], None] | None = None,
        defer_checks: bool | str = False,
        ahead: bool = False,
        on_ahead: Callable[[int, int | None], None] | None = None,
    ) -> None:
        if not isinstance(rule, Rule):
            raise invalid("rule", type(rule).__name__, "a rule built by ormo.make_rule(name, ...)")
        self.params0 = _check_params(params0)
        self.num_workers = K = check_num_workers("num_workers", num_workers)
        self.seed = check_seed(seed)
        self.scheduler = check_choice("scheduler", scheduler if scheduler is not None else rule.scheduler, SCHEDULERS)
        if not callable(grad_fn):
            raise invalid("grad_fn", type(grad_fn).__name__, "a callable grad_fn(params, worker, index, step)")
        if lr_schedule is not None and not callable(lr_schedule):
            raise invalid("lr_schedule", type(lr_schedule).__name__, "a callable lr_schedule(t) -> float, or None")
        if num_iterations is not None:
            check_int_at_least("num_iterations", num_iterations, 0)
        timing = check_timing(timing if timing is not None else Homogeneous())
        if not isinstance(check_finite, bool):
            raise invalid("check_finite", check_finite, "True or False")
        self.rule, self.grad_fn, self.check_finite, self.lr_schedule = rule, grad_fn, check_finite, lr_schedule
        self.on_redispatch = on_redispatch
        #: batched in-flight gradients: at most this many messages computed together (0: one at a time, lazily)
        self.batch = check_int_at_least("batch", batch, 0)
        if grad_batch is not None and not callable(grad_batch):
            raise invalid("grad_batch", type(grad_batch).__name__, "a callable grad_batch(requests) -> gradients")
        if grad_batch is not None and not self.batch:  # it would never be called: say so rather than run without it
            raise invalid("grad_batch", getattr(grad_batch, "__name__", type(grad_batch).__name__),
                          "given only with batch > 0, where it computes the batched in-flight gradients",
                          "set batch=N, or leave grad_batch out")
        self.grad_batch, self.on_consume = grad_batch, on_consume
        if not isinstance(defer_checks, bool) and defer_checks != "state":
            raise invalid("defer_checks", defer_checks, 'True, False or "state"')
        if defer_checks == "state" and self.batch:
            raise invalid("defer_checks", defer_checks, 'True or False with batched gradients (batch > 0): the state '
                          'check is for messages computed one at a time')
        if defer_checks == "state" and check_finite and not state_checks_sound(rule):
            raise invalid("defer_checks", defer_checks, f"True or False for the rule {rule.name!r}: it does not "
                          f"declare that checking its state finds every NaN/Inf (Rule.state_checks; ormo's rules do)")
        #: deferred checks: the NaN/Inf checks fold into a device-side record read by :meth:`flush_checks` (None:
        #: each check reads its answer at once, a host sync per check on CUDA); "state": nothing is noted, and
        #: :meth:`flush_checks` checks the simulator's state instead
        self.record: _DeferredRecord | _StateCheck | None = None
        if check_finite and defer_checks == "state":
            self.record = _StateCheck(self)
        elif check_finite and defer_checks:
            self.record = _DeferredRecord(self.params0.device)
        #: batched: the computed messages not consumed yet, per worker (a Message, or the error it raised)
        self.computed: dict[int, Message | SimulationError] = {}
        #: batched: workers dispatched whose message is not computed yet
        self.fresh = [True] * K
        #: batched, deferred checks: the last gradient of a computed message (already checked, as its own update)
        self._checked: dict[int, Tensor | None] = {}
        #: batched, deferred checks: per computed message, its first local step with a NaN/Inf gradient (device)
        self._bad_step: dict[int, Tensor] = {}
        #: batched: workers whose cached message was loaded from a state saved with deferred checks and is checked
        #: when consumed (its tensors were not read when it was computed)
        self._unchecked: set[int] = set()
        #: replayed re-dispatches (a real run's restarted workers and rejected messages): t -> [(worker, index)]
        self.redispatches: dict[int, list[tuple[int, int]]] = {}
        #: compute ahead: each message of a one-step method computed at the start of the iteration after its
        #: dispatch, from the server's own tensors (which have not moved since), instead of copying the parameters
        #: for the worker (at 11M parameters the copy is ~6 % of a message); the same arithmetic, so bit-identical
        self.ahead = check_bool("ahead", ahead)
        if on_ahead is not None and not callable(on_ahead):
            raise invalid("on_ahead", type(on_ahead).__name__, "a callable on_ahead(worker, index or None)")
        self.on_ahead = on_ahead
        #: the worker dispatched at the last iteration whose snapshot still aliases the server state (compute ahead)
        self._ahead: int | None = None
        self._spent = self.params0.new_empty(0)  # a computed-ahead worker's snapshot: its message holds what it needs

        self.source: _HeapSource | _OrderSource | _ReplaySource
        if isinstance(timing, Replay):
            if order is not None:
                raise ConfigError("give either order= or timing=Replay(...), not both (a replay fixes the order)")
            recorded_k = timing.log.meta.get("num_workers")
            if recorded_k is not None and recorded_k != K:
                raise invalid("num_workers", K, f"equal to the replayed log's num_workers={recorded_k}")
            self.limit: int | None = len(timing.log) if num_iterations is None else num_iterations
            if len(timing.log) < self.limit:
                raise invalid("num_iterations", self.limit, f"<= the replayed log's length {len(timing.log)}")
            recorded = timing.log.meta.get("scheduler")
            if recorded is not None and recorded != self.scheduler:
                raise invalid("scheduler", self.scheduler, f"the replayed log's scheduler {recorded!r}")
            check_order(timing.log.workers[: self.limit], K, self.scheduler)
            self.source = _ReplaySource(timing.log)
            for t_r, worker, index, *_ in timing.log.meta.get("redispatches", []):
                self.redispatches.setdefault(int(t_r), []).append((int(worker), int(index)))
        elif order is not None:
            order_list = check_order(order, K, self.scheduler)
            self.limit = len(order_list) if num_iterations is None else num_iterations
            if len(order_list) != self.limit:
                raise invalid("num_iterations", self.limit, f"equal to len(order)={len(order_list)} (or omitted)")
            self.source = _OrderSource(order_list, timing.bind(K, self.seed))
        else:
            self.limit = num_iterations
            self.source = _HeapSource(timing.bind(K, self.seed))

        if self.ahead:
            why = ahead_problem(rule, self.scheduler, self.batch, defer_checks if check_finite else False)
            if why is None and self.redispatches:
                why = "the replayed log re-dispatches workers (a re-dispatch may resend a computed message's snapshot)"
            if why is not None:
                raise invalid("ahead", True, f"False here: {why}")

        self.events = EventLog(
            {
                "rule": rule.name,
                "hyperparameters": rule.describe()["hyperparameters"],
                "scheduler": self.scheduler,
                "num_workers": K,
                "seed": self.seed,
                "timing": timing.describe(),
                "engine": "simulator",
                **({"batch": self.batch} if self.batch else {}),
            }
        )
        self.state = rule.init(self.params0, num_workers=K)
        self.worker_states = [rule.init_worker(self.params0) for _ in range(K)]
        # The growth warning's reference (one pass over params0; a host-device sync on CUDA, once).
        self._norm0 = float(torch.linalg.vector_norm(self.params0, dtype=torch.float64))
        self._growth_warned = False
        self._steps = rule.local_steps
        if lr_schedule is not None:
            self._set_rate(0)
        # What each worker was sent. Under async every worker owns a buffer reused across its messages (its previous
        # message has been consumed before it is re-dispatched); a sync round shares one snapshot.
        first, _ = _copy_payload(rule.payload(self.state, index=0), None)
        self.snapshots: list[Payload] = [first] * K
        self.own_buffers: list[Tensor | None] = [None] * K
        self.dispatch_time = [0.0] * K
        self.idle = [0.0] * K
        self.waiting: list[tuple[int, float]] = []  # C: (worker, arrival time)
        self.t, self.now = 0, 0.0
        for k in range(K):
            self.source.dispatch(k, 0.0, self._steps)

    # -- running ------------------------------------------------------------------------------------------
    def step(self) -> Event:
        """Server iteration ``t``: take the next arrival, compute its message lazily, PRE, UPDATE, SCHEDULE."""
        rule, state, t = self.rule, self.state, self.t
        if self.limit is not None and t >= self.limit:
            raise ConfigError(f"iteration {t} is past the end of the given order/replay ({self.limit} iterations)")
        for worker, index in self.redispatches.get(t, ()):
            self._redispatch(worker, index)
        if self._ahead is not None:
            try:
                self._compute_ahead(t)
            except SimulationError as e:  # (grad_fn wrote into the server's parameters, or reused held memory)
                e.partial = self.result()
                raise
        k, now = self.source.next(t, self.now)
        payload = self.snapshots[k]
        self.source.check_index(t, payload.index)
        # The message depends only on the worker's snapshot, so it is computed and checked before PRE(t): a bad one
        # stops the run with the server exactly at the iteration boundary w_t, and the worker's own state as it was.
        if self.batch or k in self.computed:
            message = self._take_computed(t, k, now)
        else:
            worker_state = self.worker_states[k]
            saved = worker_state.state_dict() if worker_state is not None else None
            try:
                grad = _CheckedGrad(self.grad_fn, self.params0, t, k, payload.index, self.check_finite, record=(
                    self.record, t))
                message = rule.work(payload, grad, worker_state)
                if self.computed:  # (compute ahead) a message waiting to be consumed must keep its memory
                    self._check_held(message.update, t, k, payload.index)
                if self.record is not None:
                    self.record.note([x for _, x in message.tensors() if x is not grad.last], t, _MESSAGE)
                elif self.check_finite:
                    _check_message(message, t, k, already_checked=grad.last)
            except SimulationError as e:
                self.source.undo(t, k, now)
                if worker_state is not None:
                    worker_state.load_state_dict(saved)
                e.partial = self.result()
                raise
        self.now = now
        if self.lr_schedule is not None:
            self._set_rate(t)
        rule.begin_iteration(state, t=t, waiting_empty=not self.waiting)
        rule.apply(state, message, t=t, worker=k)
        if isinstance(self.record, _StateCheck) and rule.ignores(state, message, t=t):
            self.record.check_ignored(message)  # its NaN/Inf would not reach the state
        event = self.events.append(
            t=t, worker=k, index=payload.index, sim_time=now, dispatch_time=self.dispatch_time[k]
        )
        self.waiting.append((k, now))

        if self.scheduler == "async":
            sent = rule.payload(state, index=t + 1)
            if self.ahead:  # aliases the server state until computed, at the start of the next iteration
                self.snapshots[k] = Payload(index=sent.index, params=sent.params, momentum=sent.momentum,
                                            lr_scale=sent.lr_scale)
                self._ahead = k
            else:
                self.snapshots[k], self.own_buffers[k] = _copy_payload(sent, self.own_buffers[k])
            self._check_sent(self.snapshots[k], t, k, payload.index, sent)
            self.dispatch_time[k] = now
            self.source.dispatch(k, now, self._steps)
            self.fresh[k] = True
            self.waiting.clear()
        elif len(self.waiting) == self.num_workers:
            sent = rule.payload(state, index=t + 1)
            shared, _ = _copy_payload(sent, None)
            self._check_sent(shared, t, k, payload.index, sent)
            for j, arrived in self.waiting:
                self.idle[j] += now - arrived
            for j in range(self.num_workers):
                self.snapshots[j] = shared
                self.dispatch_time[j] = now
                self.source.dispatch(j, now, self._steps)
                self.fresh[j] = True
            self.waiting.clear()
        self.t = t + 1
        # checked after the iteration, so a warning turned into an error leaves the simulator consistent at w_{t+1}
        if not self._growth_warned and (self.record is None or isinstance(self.record, _StateCheck)) and (
                growth_check_due(t)):
            self._check_growth(t)
        return event

    # -- compute ahead ---------------------------------------------------------------------------------------
    def _compute_ahead(self, t: int) -> None:
        """The message of the worker dispatched at iteration ``t - 1``, computed from the server's tensors it was sent
        (unchanged since). A failure is not kept: the worker gets a copy of what it was sent, and its message is
        computed again when consumed, so the error is raised at its own iteration, exactly as one at a time. A
        ``grad_fn`` that wrote into its argument (the server's parameters here) stops the run at once."""
        k = self._ahead
        assert k is not None
        payload = self.snapshots[k]
        versions = [x._version for x in (payload.params, payload.momentum) if x is not None]
        grad = _CheckedGrad(self.grad_fn, self.params0, None, k, payload.index, self.check_finite,
                            record=(self.record, t))
        message: Message | None = None
        try:
            try:
                message = self.rule.work(payload, grad, None)
                if self.record is None and self.check_finite:
                    _check_message(message, None, k, already_checked=grad.last)
                sent = {x.untyped_storage().data_ptr() for x in (payload.params, payload.momentum) if x is not None}
                if any(x.untyped_storage().data_ptr() in sent for _, x in message.tensors()):
                    message = None  # it holds the server's tensors (grad_fn returned its argument): they move on
            except Exception:  # noqa: BLE001 - computed again (and raised) when consumed
                message = None
            if [x._version for x in (payload.params, payload.momentum) if x is not None] != versions:
                raise GradFnError(
                    f"grad_fn(params, worker={k}, index={payload.index}, step=0) changed its params argument in place "
                    f"at server iteration t={t}; it must be read only (here it is the server's own parameters: the "
                    f"run computes messages ahead): clone it first", t=t, worker=k, index=payload.index, step=0)
            if message is not None:
                self._check_held(message.update, t, k, payload.index)
        except BaseException:  # the run stops (or an interrupt: the next step computes it again); nothing is kept
            if self.on_ahead is not None:
                self.on_ahead(k, None)
            raise
        if self.on_ahead is not None:
            self.on_ahead(k, None if message is None else payload.index)
        if message is None:
            self.snapshots[k], self.own_buffers[k] = _copy_payload(payload, self.own_buffers[k])
        else:
            self.computed[k] = message
            self.snapshots[k] = Payload(index=payload.index, params=self._spent, lr_scale=payload.lr_scale)
            self.own_buffers[k] = None
        self._ahead = None

    def _check_held(self, update: Tensor, t: int, k: int, index: int) -> None:
        """A gradient must not reuse the memory of a message computed ahead and not consumed yet (any part of it: a
        view of the same buffer at another offset overlaps it; other rows of one table do not)."""
        start, end = _span(update)
        if any(isinstance(m, Message) and _span(m.update)[0] < end and start < _span(m.update)[1]
               for m in self.computed.values()):
            raise GradFnError(  # (its caller sets .partial)
                f"grad_fn(params, worker={k}, index={index}, step=0) at server iteration t={t} returned memory that "
                f"a message computed ahead still holds: with ahead=True every gradient must be a new tensor (return "
                f"a copy, or run with ahead=False)", t=t, worker=k, index=index, step=0)

    # -- batched in-flight gradients ------------------------------------------------------------------------
    def _take_computed(self, t: int, k: int, now: float) -> Message:
        """Worker ``k``'s message, computed now with others (batched) unless it was computed ahead. An error found
        while computing it is raised now that its iteration is known; it stays cached, so a retry raises it again."""
        if k not in self.computed:
            self._compute_batch(k)
        got = self.computed[k]
        if isinstance(got, SimulationError):
            err = type(got)(str(got).replace(T_UNKNOWN, f"t={t}"), t=t, worker=got.worker, index=got.index,
                            step=got.step)
            self.source.undo(t, k, now)
            err.partial = self.result()
            raise err
        if isinstance(got, Exception):  # the task's or the user's own error, raised as it was
            self.source.undo(t, k, now)
            raise got
        if k in self._unchecked and self.record is None:
            try:
                if not self.batch and type(self.rule).work is Rule.work and not all_finite(got.update):
                    raise _nan_gradient("grad_fn(params, ", t, k, got.index, 0)  # computed ahead: as one at a time
                _check_message(got, t, k, already_checked=None)
            except SimulationError as e:
                self.source.undo(t, k, now)
                e.partial = self.result()
                raise
        self._unchecked.discard(k)
        del self.computed[k]
        if self.record is not None:  # its gradients, then its own tensors, noted under this iteration
            bad_step = self._bad_step.pop(k, None)
            if bad_step is not None:
                self.record.note_bad(bad_step >= 0, t, _GRADIENT)
            self.record.note([x for _, x in got.tensors() if x is not self._checked.get(k)], t, _MESSAGE)
        self._checked.pop(k, None)
        if self.on_consume is not None:
            self.on_consume(k)
        return got

    def _compute_batch(self, k: int) -> None:
        """Compute worker ``k``'s message together with those of up to ``batch - 1`` other dispatched workers whose
        messages are not computed yet, the soonest expected first."""
        chosen = [k]
        for w in (*self.source.upcoming(self.t), *range(self.num_workers)):
            if len(chosen) >= self.batch:
                break
            if self.fresh[w] and w not in self.computed and w not in chosen:
                chosen.append(w)
        states = {w: self.worker_states[w] for w in chosen}
        saved = {w: s.state_dict() if s is not None else None for w, s in states.items()}
        last: dict[int, Tensor] = {}

        name = "grad_batch(requests) for (" if self.grad_batch is not None else "grad_fn(params, "

        def compute(asked: list[tuple[int, Tensor, int]]) -> list[Tensor | BaseException]:
            checks = [_CheckedGrad(None, self.params0, None, w, self.snapshots[w].index, self.check_finite, name)
                      for w, _, _ in asked]
            versions = [x._version for _, x, _ in asked]
            requests = [(x.detach(), w, self.snapshots[w].index, step) for w, x, step in asked]
            grads = self._gradients(requests)
            if self.record is not None and self._steps == 1:  # folded into each message's flag, on the device
                finite = self._fold_bad_steps(grads, asked)
            else:
                finite = _finite_flags(grads, self.params0) if self.check_finite else [None] * len(grads)
            held = {m.update.data_ptr() for m in self.computed.values() if isinstance(m, Message)}
            out: list[Tensor | BaseException] = []
            for (w, x, step), g, version, check, ok in zip(asked, grads, versions, checks, finite, strict=True):
                if isinstance(g, BaseException):
                    out.append(g)
                    continue
                try:
                    g = check.check(g, x, version, step, ok)
                    if g.data_ptr() in held:
                        raise GradFnError(
                            f"{name}worker={w}, index={check.index}, step={step}) at server iteration {T_UNKNOWN} "
                            f"returned memory that another gradient still uses: in batched mode (batch > 0) every "
                            f"gradient must be a new tensor (return a copy, or run with batch=0)", t=-1, worker=w,
                            index=check.index, step=step)
                    held.add(g.data_ptr())
                    last[w] = g
                    out.append(g)
                except SimulationError as e:
                    out.append(e)
            return out

        results = run_lockstep(self.rule, [(w, self.snapshots[w], states[w]) for w in chosen], compute)
        for w in chosen:
            got = results[w]
            if isinstance(got, Message) and self.record is not None:  # checked when consumed (deferred)
                self._checked[w] = last.get(w)
            elif isinstance(got, Message) and self.check_finite:
                try:
                    _check_message(got, None, w, already_checked=last.get(w))
                except SimulationError as e:
                    got = e
            if not isinstance(got, Message | Exception):  # an interrupt: nothing of this batch is kept
                raise got
            if isinstance(got, Exception):
                self._bad_step.pop(w, None)
                if states[w] is not None:
                    states[w].load_state_dict(saved[w])  # type: ignore[union-attr]
            self.computed[w] = got  # a message, or the error it raised: raised when it is consumed
            self.fresh[w] = False

    def _fold_bad_steps(self, grads: list[Any], asked: list[tuple[int, Tensor, int]]) -> list[bool | None]:
        """Deferred checks in a batch of one-step messages: each gradient's finiteness becomes its message's bad
        step on the device (-1: finite), noted when the message is consumed; nothing is read. Returns the ``finite``
        argument of the per-request check (True: settled here; None: not a tensor like the parameters, which that
        check reports).

        Local methods read their flags once per lock-step round instead (``_finite_flags``): a worker whose gradient
        is NaN/Inf leaves the lock-step there, and the rounds after it are smaller. A batched gradient's rounding
        can depend on the batch's size (ResNet20's does on a CPU), so a worker kept in would change its batchmates'
        messages, and the run would no longer be the run that checks each gradient."""
        fit = _like_params(grads, self.params0)
        out: list[bool | None] = [None] * len(grads)
        if fit:
            ok = torch.stack([grads[i].detach().isfinite().all() for i in fit])
            for j, i in enumerate(fit):
                w, _, step = asked[i]
                self._bad_step[w] = torch.where(ok[j], -1, step)
                out[i] = True
        return out

    def _gradients(self, requests: list[tuple[Tensor, int, int, int]]) -> list[Any]:
        """Each request's gradient, or the exception computing it raised (held with its message, raised only if
        that message is consumed). A failing batch is retried request by request, to find whose it is."""
        if self.grad_batch is None:
            out: list[Any] = []
            for r in requests:
                try:
                    out.append(self.grad_fn(*r))
                except Exception as e:  # noqa: BLE001 - raised when (if) this message is consumed
                    out.append(e)
            return out
        try:
            got = self.grad_batch(requests)
        except Exception as e:  # noqa: BLE001 - raised when (if) this message is consumed
            if len(requests) == 1:
                return [e]
            alone = [self._gradients([r])[0] for r in requests]
            # each request computes alone: the batch itself failed (minibatches that cannot be stacked, ...), and a
            # run that went on one request at a time would not be the batched run it says it is
            return alone if any(isinstance(g, BaseException) for g in alone) else [e] * len(requests)
        try:
            got = list(got)
        except TypeError:
            got = None
        if got is None or len(got) != len(requests):
            what = f"{len(got)} gradients" if got is not None else "no sequence"
            return [GradFnError(f"grad_batch(requests) returned {what} for {len(requests)} requests (at server "
                                f"iteration {T_UNKNOWN}, worker {w}'s message): it must return one gradient per "
                                f"request, in order", t=-1, worker=w, index=i, step=s) for _, w, i, s in requests]
        return got

    def _check_growth(self, t: int) -> None:
        """Warn (once per run) when ``w_{t+1}`` outgrew ``w_0`` by ``GROWTH_FACTOR``: reads the parameters only, so
        results are unchanged. Costs one norm (a host-device sync on CUDA) per checked iteration."""
        # in the parameters' dtype (float64 costs 20x a float32 pass on a CPU), again in float64 if it overflowed
        norm = float(torch.linalg.vector_norm(self.state.params))
        if not math.isfinite(norm):
            norm = float(torch.linalg.vector_norm(self.state.params, dtype=torch.float64))
        limit = GROWTH_FACTOR * max(self._norm0, 1.0)
        if not norm > limit or (self.check_finite and math.isinf(norm)):  # NaN/Inf: the finite checks stop the run
            return
        self._growth_warned = True
        lr = getattr(self.rule, "lr", None)
        delay_max = int(self.events.column("delay").max())
        warnings.warn(
            f"the server parameters grew from |w_0| = {self._norm0:.3g} to |w_{t + 1}| = {norm:.3g} by iteration "
            f"t={t} (more than {GROWTH_FACTOR:g} x max(|w_0|, 1)): the run is probably diverging. With K = "
            f"{self.num_workers} workers and delays up to {delay_max}, the step is likely too large for this "
            f"staleness: try a smaller lr{f' than {lr:g}' if isinstance(lr, numbers.Real) else ''} (e.g. 10x "
            f"smaller), "
            f"fewer workers, or a delay-adaptive rule (ormo-da). Silence it with "
            f"warnings.simplefilter('ignore', ormo.GrowthWarning).",
            GrowthWarning,
            stacklevel=_caller_stacklevel(),
        )

    def _redispatch(self, worker: int, index: int) -> None:
        """Replay of a real run's re-dispatch before iteration ``t``: the worker lost its message (it died, or the
        server rejected the message) and was sent parameter ``index`` afresh, with its own state reset."""
        t = self.t
        if self.snapshots[worker].index != index:
            if index != t:
                raise ConfigError(
                    f"the replayed log re-dispatches worker {worker} with index {index} before iteration {t}; only "
                    f"the current parameters (index {t}) or the worker's own round ({self.snapshots[worker].index}) "
                    f"can be sent then"
                )
            self.snapshots[worker], self.own_buffers[worker] = _copy_payload(
                self.rule.payload(self.state, index=t), self.own_buffers[worker] if self.scheduler == "async" else None
            )
        self.worker_states[worker] = self.rule.init_worker(self.params0)
        self.dispatch_time[worker] = self.now
        self.computed.pop(worker, None)  # a message computed ahead was lost with the worker
        self._checked.pop(worker, None)
        self._unchecked.discard(worker)
        self._bad_step.pop(worker, None)
        self.fresh[worker] = True
        if self.on_redispatch is not None:
            self.on_redispatch(worker)

    def _set_rate(self, t: int) -> None:
        f = self.lr_schedule(t)  # type: ignore[misc]
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (0.0 <= f < math.inf):
            raise invalid(f"lr_schedule({t})", f, "a finite number >= 0")
        set_rate_factor(self.rule, self.state, f)

    def _check_sent(self, payload: Payload, t: int, worker: int, index: int, sent: Payload | None = None) -> None:
        """The parameters about to be sent must be finite: catches a server update that overflowed (one summing pass
        over the copy, the cost of the NaN check of a gradient). ``sent``: the rule's payload before its copy."""
        if not self.check_finite:
            return
        if isinstance(self.record, _StateCheck):  # what is not the server's own tensors is checked as it goes
            if self.record.code != -1:  # found already (or a failure loaded with the state, which names it)
                return
            state = self.state
            own = {x.data_ptr() for x in (state.params, getattr(state, "momentum", None)) if isinstance(x, Tensor)}
            origin = sent if sent is not None else payload
            self.record.fold([x for x, y in ((payload.params, origin.params), (payload.momentum, origin.momentum))
                              if x is not None and not (isinstance(y, Tensor) and y.data_ptr() in own)])
            return
        if self.record is not None:
            self.record.note([x for x in (payload.params, payload.momentum) if x is not None], t, _SENT)
            return
        for name, tensor in (("parameters", payload.params), ("momentum", payload.momentum)):
            if tensor is not None and not all_finite(tensor):
                err = NonFiniteError(
                    f"the server {name} became NaN/Inf at iteration t={t}, after applying the message of worker "
                    f"{worker} (index {index}, delay {t - index}): the run diverged (is the learning rate too large?)",
                    t=t, worker=worker, index=index,
                )
                self.t = t + 1  # iteration t was applied: the partial result includes it
                err.partial = self.result()
                raise err

    def run(self, until: int | None = None, callback: Callback | None = None) -> Simulator:
        """Step until ``t == until`` (default: the end of the order/replay), calling ``callback(event, state)``."""
        until = self.limit if until is None else check_int_at_least("until", until, 0)
        if until is None:
            raise ConfigError("num_iterations is required when no order= or timing=Replay(...) is given")
        if callback is not None and not callable(callback):  # before the first iteration, not after it
            raise invalid("callback", type(callback).__name__, "a callable callback(event, state), or None")
        while self.t < until:
            event = self.step()
            if callback is not None:
                callback(event, self.state)
        self.flush_checks()
        return self

    def check_each_message(self) -> None:
        """Stop deferring the checks: from now on each reads its answer at once (what is noted and unread is
        dropped; load a state saved before it, as ``ormo train`` does when a deferred check failed). Messages computed
        ahead and not consumed yet are checked when consumed."""
        if self.record is not None:
            self._unchecked |= {w for w, m in self.computed.items() if isinstance(m, Message)}
        self.record = None

    def flush_checks(self) -> None:
        """Read the deferred checks (one host sync; nothing without ``defer_checks``): raise :class:`NonFiniteError`
        naming the first iteration that met a NaN/Inf, its worker and what was not finite, and run the growth check
        the iterations skipped. The parameters are then those after the last iteration run, past the NaN/Inf: to stop
        exactly where a run checking every message stops (parameters untouched), run again from a state saved at an
        earlier flush with ``defer_checks=False`` (``ormo train`` does)."""
        if self.record is None:
            return
        code = self.record.read()
        if code == _UNKNOWN:
            since = self.record.clean_at if isinstance(self.record, _StateCheck) else None
            when = f"at iteration {self.t - 1} or before" if since is None else (
                f"at an iteration from {since} to {self.t - 1}")
            err = NonFiniteError(
                f"NaN/Inf values in the simulator's state (the server's parameters or momentum, or a worker's state) "
                f"found when the checks were read after iteration {self.t - 1}: the run diverged {when} (checking "
                f"the state at read-outs names no iteration: run again from a state saved at an earlier read-out "
                f"with defer_checks=False to stop exactly there; ormo train does)",
                t=-1, worker=-1, index=-1)
            err.partial = self.result()
            raise err
        if code >= 0:
            t_bad, kind = divmod(code, _KINDS)
            event = self.events[t_bad]
            what = {_GRADIENT: "a gradient of its message", _MESSAGE: "its message",
                    _SENT: "the server parameters (or momentum) after applying it"}[kind]
            err = NonFiniteError(
                f"NaN/Inf values at server iteration t={t_bad}, the message of worker {event.worker} (index "
                f"{event.index}, delay {t_bad - event.index}): {what} was not finite (found when the deferred checks "
                f"were read after iteration {self.t - 1}; the run diverged: is the learning rate too large?)",
                t=t_bad, worker=event.worker, index=event.index)
            err.partial = self.result()
            raise err
        if not self._growth_warned and self.t > 0 and not isinstance(self.record, _StateCheck):
            self._check_growth(self.t - 1)

    def _state_tensors(self) -> list[Tensor]:
        """Every floating tensor a NaN/Inf can live in between messages (one at a time): the server state, the
        workers' states and what they were sent, each once."""
        seen: dict[int, Tensor] = {}

        def walk(x: Any) -> None:
            if isinstance(x, Tensor):
                if x.is_floating_point():
                    seen.setdefault(id(x), x)
            elif isinstance(x, list | tuple):
                for v in x:
                    walk(v)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif is_dataclass(x) and not isinstance(x, type):
                for f in fields(x):
                    walk(getattr(x, f.name))

        walk(self.state)
        walk(self.worker_states)
        walk(self.snapshots)
        return list(seen.values())

    def result(self) -> SimulationResult:
        events, K = self.events, self.num_workers
        return SimulationResult(
            params=self.state.params.clone(),
            events=events,
            state=self.state,
            worker_states=self.worker_states,
            rule=self.rule,
            scheduler=self.scheduler,
            num_workers=K,
            sim_time_s=events[-1].sim_time if len(events) else 0.0,
            messages_per_worker=np.bincount(events.column("worker"), minlength=K).tolist(),
            idle_time_s=list(self.idle),
            delay=delay_stats(events.column("delay")),
        )

    # -- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """Everything needed to continue bit for bit: a deep copy (later steps do not change it), in which
        snapshot tensors that workers share stay shared. ``copy=False`` leaves the K snapshots and worker states
        (the K-sized part) as the live tensors, for a caller that serializes them before the next step (a
        checkpoint then costs no second copy of them)."""
        copies: dict[int, Tensor] = {}

        def same(x: Tensor | None) -> Tensor | None:
            if x is None or not copy:
                return x
            return copies.setdefault(id(x), x.clone())

        return {
            "t": self.t,
            "now": self.now,
            "made_by": self._made_by(),
            "rule_state": self.state.state_dict(),
            "worker_states": [_worker_state_dict(w, copy) for w in self.worker_states],
            "snapshots": [(p.index, same(p.params), same(p.momentum), p.lr_scale) for p in self.snapshots],
            "own": [b is not None for b in self.own_buffers],
            "dispatch_time": list(self.dispatch_time),
            "idle": list(self.idle),
            "waiting": list(self.waiting),
            "source": self.source.state_dict(),
            "events": self.events.state_dict(),
            **({"deferred": self.record.read()} if self.record is not None else {}),
            **({"unchecked": True} if not self.check_finite else {}),  # its computed messages: checked when consumed
            **({"batch": self.batch,  # an error that is not the simulator's is not saved: recomputed after a load
                "fresh": [f or isinstance(self.computed.get(w), Exception) and not isinstance(
                    self.computed.get(w), SimulationError) for w, f in enumerate(self.fresh)]} if self.batch else {}),
            # batched, or computed ahead (messages only: a failure computed ahead is computed again when consumed)
            **({"computed": {w: _computed_state(m, copy, self._bad_step.get(w)) for w, m in self.computed.items()
                             if isinstance(m, Message | SimulationError)}} if self.batch or self.computed else {}),
        }

    def _made_by(self) -> dict[str, Any]:
        """What a state must match to continue in this simulator (checked by :meth:`load_state_dict`)."""
        p = self.params0
        return {"rule": self.rule.name, "scheduler": self.scheduler, "num_workers": self.num_workers,
                "params": [list(p.shape), str(p.dtype).removeprefix("torch.")]}

    def _check_fits(self, sd: Any) -> None:
        """One line naming what does not fit, before anything is loaded."""
        if not isinstance(sd, dict):
            raise ConfigError(f"load_state_dict needs a dict from Simulator.state_dict(), got {type(sd).__name__}")
        missing = [k for k in ("t", "now", "rule_state", "worker_states", "snapshots", "own", "dispatch_time", "idle",
                               "waiting", "source", "events") if k not in sd]
        if missing:
            raise ConfigError(f"the state has no {', '.join(missing)}: it is not a Simulator.state_dict() (or it was "
                              f"damaged)")
        mine, theirs = self._made_by(), sd.get("made_by")
        if not isinstance(theirs, dict):  # a state from before it was recorded: what can be read from it
            snap = sd["snapshots"][0] if isinstance(sd["snapshots"], list) and sd["snapshots"] else None
            p = snap[1] if isinstance(snap, list | tuple) and len(snap) > 1 else None
            theirs = {"num_workers": len(sd["snapshots"]) if isinstance(sd["snapshots"], list) else None,
                      "params": [list(p.shape), str(p.dtype).removeprefix("torch.")] if isinstance(p, Tensor) else
                      mine["params"]}
        differ = [f"{k} {theirs[k]!r} (this simulator: {mine[k]!r})" for k in mine if k in theirs
                  and theirs[k] != mine[k]]
        if differ:
            raise ConfigError(f"the state was saved by a simulator with {'; '.join(differ)}: build the simulator with "
                              f"the same rule, scheduler, num_workers and params0 shape and dtype to continue it")
        # what the next iterations index by worker or by t (an edited state failed there, with a traceback)
        K = self.num_workers
        short = [k for k in ("worker_states", "snapshots", "own", "dispatch_time", "idle")
                 if not isinstance(sd[k], list) or len(sd[k]) != K]
        heap = sd["source"].get("heap", []) if isinstance(sd["source"], dict) else None
        if short or not isinstance(heap, list) or not all(
                isinstance(h, list | tuple) and len(h) == 3 and isinstance(h[2], int) and 0 <= h[2] < K for h in heap):
            what = f"{', '.join(short)} of other than num_workers = {K} entries" if short else \
                f"pending arrivals naming workers outside [0, {K})"
            raise ConfigError(f"the state has {what}: it is not a Simulator.state_dict() of this simulator (or it was "
                              f"edited)")
        waiting = sd["waiting"] if isinstance(sd["waiting"], list) else None
        named = None if waiting is None else [h[2] for h in heap] + [
            w[0] if isinstance(w, list | tuple) and w and isinstance(w[0], int) else -1 for w in waiting]
        if "heap" in sd["source"] and (named is None or sorted(named) != list(range(K))):  # else: popped from empty
            raise ConfigError(f"the state's pending arrivals ({len(heap)}) and waiting workers "
                              f"({'?' if waiting is None else len(waiting)}) do not name each of the num_workers = {K} "
                              f"workers once: it is not a Simulator.state_dict() of this simulator (or it was edited)")
        t = sd["t"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or not isinstance(sd["now"], int | float) or \
                not math.isfinite(sd["now"]):
            raise ConfigError(f"the state has t = {t!r} and now = {sd['now']!r}: they must be an integer >= 0 and a "
                              f"finite time (it is not a Simulator.state_dict(), or it was edited)")

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check_fits(sd)
        noted = int(sd.get("deferred", -1))
        if noted == _UNKNOWN and not isinstance(self.record, _StateCheck):  # before anything is loaded
            raise ConfigError("the state was saved with defer_checks='state' after a NaN/Inf (not read yet, iteration "
                              "unknown): load a state saved at an earlier read-out (as ormo train does), or load it "
                              "into a Simulator(defer_checks='state') and call flush_checks()")
        if noted >= 0 and self.record is None:  # before anything is loaded
            t_bad = noted // _KINDS
            raise ConfigError(f"the state was saved with deferred checks after a NaN/Inf at server iteration t={t_bad} "
                              f"(not read yet): its parameters are past it, and checking each message from there "
                              f"would name a later iteration. Load a state saved before t={t_bad} (as ormo train "
                              f"does), or load it into a Simulator(defer_checks=True) and call flush_checks()")
        if int(sd.get("batch", 0)) != self.batch:  # before anything is loaded
            raise ConfigError(f"the state was saved with batch={sd.get('batch', 0)} (batched in-flight gradients) and "
                              f"this simulator has batch={self.batch}: continue it with the same setting")
        self.t, self.now = int(sd["t"]), float(sd["now"])
        self.state.load_state_dict(sd["rule_state"])
        for w, wsd in zip(self.worker_states, sd["worker_states"], strict=True):
            if w is not None:
                w.load_state_dict(wsd)
        copies: dict[int, Tensor] = {}  # keep one tensor per saved tensor, as shared as it was

        def same(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return copies.setdefault(id(x), x.clone())

        self.snapshots = [
            Payload(index=i, params=same(p), momentum=same(m), lr_scale=s) for i, p, m, s in sd["snapshots"]
        ]
        # (a computed-ahead worker's empty snapshot is not a buffer, whatever the state says: 1bfb532 saved it as own)
        self.own_buffers = [p.params if own and p.params.shape == self.params0.shape else None
                            for p, own in zip(self.snapshots, sd["own"], strict=True)]
        self.dispatch_time, self.idle = list(sd["dispatch_time"]), list(sd["idle"])
        self.waiting = [tuple(w) for w in sd["waiting"]]  # type: ignore[misc]
        self.source.load_state_dict(sd["source"])
        self.events.load_state_dict(sd["events"])
        if self.record is not None:
            self.record.reset(int(sd.get("deferred", -1)))
        self._ahead = None  # a snapshot saved aliasing the server state was saved as a copy: computed when consumed
        self.computed, self._checked, self._bad_step, self._unchecked = {}, {}, {}, set()
        if self.batch:
            self.fresh = [bool(f) for f in sd["fresh"]]
        if "computed" in sd:
            self.computed = {int(w): _computed_from_state(m) for w, m in sd["computed"].items()}
            name = "grad_batch(requests) for (" if self.grad_batch is not None else "grad_fn(params, "
            for w, m in sd["computed"].items():
                bad = int(m.get("bad_step", -1)) if "error" not in m else -1
                if bad >= 0 and self.record is None:  # what checking each gradient would have held for it
                    self.computed[int(w)] = _nan_gradient(name, None, int(w), int(m["index"]), bad)
                elif "bad_step" in m and self.record is not None:
                    self._bad_step[int(w)] = torch.full((), bad, dtype=torch.int64, device=self.params0.device)
            # (loaded messages own their tensors: none is a gradient checked on its own, so _checked stays empty)
            self._unchecked = {w for w, m in self.computed.items() if isinstance(m, Message)} if self.check_finite and (
                "deferred" in sd or sd.get("unchecked", False)) else set()


def simulate(
    rule: Rule,
    params0: Tensor,
    grad_fn: GradFn,
    *,
    num_workers: int,
    num_iterations: int | None = None,
    order: Sequence[int] | None = None,
    timing: Any = None,
    seed: int = 0,
    scheduler: str | None = None,
    callback: Callback | None = None,
    check_finite: bool = True,
    lr_schedule: Callable[[int], float] | None = None,
    batch: int = 0,
    grad_batch: GradBatchFn | None = None,
    defer_checks: bool | str = False,
    ahead: bool = False,
) -> SimulationResult:
    """Run ``rule`` on a simulated parameter server with ``num_workers`` workers.

    Args:
        rule: from :func:`ormo.make_rule`.
        params0: initial parameters ``w_0``, a 1-D float32 or float64 tensor (not modified).
        grad_fn: ``grad_fn(params, worker, index, step) -> Tensor``, the stochastic gradient at ``params`` (exactly
            what the server sent, e.g. SMEGA2's look-ahead) for ``worker``, which received parameter ``index``, at
            local step ``step`` (0 for one-step methods, 0..H−1 for local ones). Same shape, dtype and device.
        num_workers: K ≥ 1.
        num_iterations: T, the number of server iterations (messages consumed). Optional with ``order``/``Replay``.
        order: explicit arrival order, one worker id per iteration. Under the sync scheduler each block of K
            entries must be a permutation of the workers.
        timing: a timing model (default ``Homogeneous()``, small gamma jitter) or ``Replay(log)``.
        seed: seeds every random draw of the engine (timing jitter, speeds).
        scheduler: 'sync' or 'async'; default the rule's own (spec §2.2).
        callback: ``callback(event, state)`` after every iteration (``state.params`` is ``w_{t+1}``).
        check_finite: stop with :class:`NonFiniteError` on a NaN/Inf gradient or message (one pass per tensor).
        lr_schedule: ``lr_schedule(t) -> float``, a factor on the learning rates at iteration ``t`` (default 1).
        batch: batched in-flight gradients: when the server needs a message not computed yet, compute it together
            with up to ``batch - 1`` other dispatched ones (0, the default: each when consumed). The results equal
            the sequential ones up to floating-point rounding when ``grad_batch`` computes a batch differently;
            ``grad_fn`` must then return a new tensor per call.
        grad_batch: ``grad_batch([(params, worker, index, step), ...]) -> [gradient, ...]``, the gradients of a
            batch in one call (default: ``grad_fn`` on each request).
        defer_checks: True: the NaN/Inf checks (``check_finite``) queue on the device and are read once, at the end
            (no host sync per message on CUDA; batched gradients are still checked once per batch). A NaN/Inf then
            stops the run at the end, naming the first iteration that met one; the parameters are those past it.
            ``"state"`` (``batch=0`` only): nothing is checked per message; at the end the server's and workers'
            state is checked once (a NaN/Inf never leaves it), and a NaN/Inf stops the run without naming the
            iteration: rerun with ``defer_checks=False`` to name it.
        ahead: compute each message when its worker is dispatched (one-step asynchronous methods, ``batch=0``,
            ``defer_checks`` False or ``"state"``), from the server's own tensors, instead of copying the parameters
            for the worker and computing it when consumed: bit-identical, one copy of the parameters less per message
            (~6 % of a message at 11M parameters on a CPU). ``grad_fn`` must return a new tensor each call (or one
            no message holds) and must not write into its arguments; ``callback`` must not change the state.

    Returns:
        :class:`SimulationResult` with ``params`` (= ``w_T``), ``events`` and summary statistics.
    """
    sim = Simulator(
        rule,
        params0,
        grad_fn,
        num_workers=num_workers,
        num_iterations=num_iterations,
        order=order,
        timing=timing,
        seed=seed,
        scheduler=scheduler,
        check_finite=check_finite,
        lr_schedule=lr_schedule,
        batch=batch,
        grad_batch=grad_batch,
        defer_checks=defer_checks,
        ahead=ahead,
    )
    if sim.limit is None:
        raise ConfigError("num_iterations is required when no order= or timing=Replay(...) is given")
    return sim.run(sim.limit, callback).result()


def all_finite(tensor: Tensor) -> bool:
    """True when no element is NaN or ±Inf.

    A sum propagates NaN and Inf, so one read pass (no temporary of the tensor's size) settles the usual case; only a
    non-finite sum (a real NaN/Inf, or an overflow of the sum itself) pays for the exact elementwise check. Costs one
    host sync.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


#: what a deferred check noted (the record keeps ``t * _KINDS + kind`` of the first failure)
_GRADIENT, _MESSAGE, _SENT, _KINDS = 0, 1, 2, 3
#: a state check found a NaN/Inf: the iteration is not known
_UNKNOWN = -2


def state_checks_sound(rule: Rule) -> bool:
    """Whether ``rule``'s own class declares ``state_checks`` (see :attr:`Rule.state_checks`)."""
    return bool(type(rule).__dict__.get("state_checks", False))


class _StateCheck:
    """``defer_checks="state"``: the checks per message are left out; :meth:`read` checks the simulator's state once.

    Sound for a rule that declares :attr:`Rule.state_checks`: a NaN/Inf never leaves the server's parameters and
    momentum once it is in (a message reaches them by additions and products, and ``0 * NaN`` is NaN), a worker's local
    steps carry their NaN/Inf into the message they send, and the rest is checked as it goes: a message the rule
    skipped (:meth:`Rule.ignores`) and a payload that is not the server's own tensors (SMEGA2's look-ahead, which a
    later payload overwrites). So every failure that checking each message meets is in the state by the next read-out
    (tested for every rule, with NaN, Inf and overflow at several iterations). It can also find one that checking
    each message has not met yet (a synchronous round's sums overflowing before the round ends, a momentum the rule
    does not use). A NaN/Inf found names no iteration: run again from the last clean read-out checking each message
    (``ormo train`` does, and then ends exactly as checking each message does)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.code = -1  # _UNKNOWN once found (or a code loaded with a state)
        self.clean_at: int | None = 0  # the iteration of the last clean read-out (None: not known)
        self.walked_at: int | None = None  # the iteration the state was last read clean at (by this object)

    def note(self, tensors: list[Tensor], t: int, kind: int) -> None:
        pass

    def note_bad(self, bad: Tensor, t: int, kind: int) -> None:
        pass

    def check_ignored(self, message: Message) -> None:
        """A message the rule did not apply (see :meth:`Rule.ignores`) is checked on its own."""
        self.fold([x for _, x in message.tensors()])

    def fold(self, tensors: list[Tensor]) -> None:
        """Checked at once: a NaN/Inf in ``tensors`` makes the next read-out fail."""
        if self.code == -1 and not all(all_finite(x) for x in tensors):
            self.code = _UNKNOWN

    def read(self) -> int:
        if self.code == -1 and self.walked_at != self.sim.t:  # (walked clean at this iteration already: unchanged)
            tensors = self.sim._state_tensors()
            sums = [x.sum().double() for x in tensors]  # a NaN/Inf makes its sum so (an overflow too: exact check)
            if sums and not bool(torch.isfinite(torch.stack(sums)).all()) and not all(
                    bool(torch.isfinite(x).all()) for x in tensors):
                self.code = _UNKNOWN
            else:
                self.clean_at = self.walked_at = self.sim.t
        return self.code

    def reset(self, code: int) -> None:
        self.code = code
        self.clean_at = self.sim.t if code == -1 else None
        self.walked_at = None


class _DeferredRecord:
    """NaN/Inf checks that never wait for the device: each :meth:`note` folds "are these tensors finite" into a
    device-side int64, ``t * _KINDS + kind`` of the first failure (-1: none), with a few kernels queued and no
    answer read (the exact elementwise check: a sum's overflow cannot be told from a NaN without reading it);
    :meth:`read` is the one host sync."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def note(self, tensors: list[Tensor], t: int, kind: int) -> None:
        if not tensors:
            return
        ok = [torch.isfinite(x).all() for x in tensors]
        self.note_bad(~(ok[0] if len(ok) == 1 else torch.stack(ok).all()), t, kind)

    def note_bad(self, bad: Tensor, t: int, kind: int) -> None:
        self.first = torch.where(bad & (self.first < 0), t * _KINDS + kind, self.first)

    def read(self) -> int:
        return int(self.first)

    def reset(self, code: int) -> None:
        self.first = torch.full((), code, dtype=torch.int64, device=self.first.device)


def _like_params(grads: list[Any], like: Tensor) -> list[int]:
    """The positions of the gradients that are tensors of ``like``'s shape, dtype and device."""
    return [i for i, g in enumerate(grads) if isinstance(g, Tensor) and g.shape == like.shape and g.dtype == like.dtype
            and g.device == like.device]


def _finite_flags(grads: list[Any], like: Tensor) -> list[bool | None]:
    """Whether each gradient of a batch is finite, read in one host sync (None for what is not a tensor like
    ``like``: its own check reports it). A sum propagates NaN/Inf; a non-finite sum gets the exact check."""
    fit = _like_params(grads, like)
    out: list[bool | None] = [None] * len(grads)
    if fit:
        sums = torch.stack([grads[i].detach().sum() for i in fit]).isfinite().tolist()
        for i, ok in zip(fit, sums, strict=True):
            out[i] = True if ok else bool(torch.isfinite(grads[i]).all())
    return out


class _CheckedGrad:
    """``grad(x, step)`` for one message: calls ``grad_fn`` and validates what it returns. ``t`` is None for a
    message computed before its iteration is known (batched), whose errors say ``t=?`` until it is consumed."""

    __slots__ = ("grad_fn", "params0", "t", "worker", "index", "check_finite", "last", "name", "record")

    def __init__(self, grad_fn: GradFn | None, params0: Tensor, t: int | None, worker: int, index: int,
                 check_finite: bool, name: str = "grad_fn(params, ",
                 record: tuple[_DeferredRecord | None, int] | None = None):
        self.grad_fn, self.params0, self.t, self.worker, self.index = grad_fn, params0, t, worker, index
        self.check_finite, self.name = check_finite, name
        #: deferred checks: (the record, the iteration) a gradient's finiteness is noted under, unread
        self.record = record if record is not None and record[0] is not None else None
        self.last: Tensor | None = None  # the last gradient returned (already checked)

    def __call__(self, x: Tensor, step: int) -> Tensor:
        version = x._version
        self.last = None  # not held while the next one is computed (its memory may be reused)
        # A detached view: a grad_fn may set requires_grad on it without touching the (possibly shared) snapshot.
        g = self.grad_fn(x.detach(), self.worker, self.index, step)  # type: ignore[misc]
        return self.check(g, x, version, step)

    def check(self, g: Any, x: Tensor, version: int, step: int, finite: bool | None = None) -> Tensor:
        """``g`` if it is a finite tensor like ``params0`` and ``x`` was not changed in place; else the error.
        ``finite``: the finiteness of ``g`` when the caller already knows it (a batch checks all at one sync)."""
        worker, index, p0 = self.worker, self.index, self.params0
        t = "?" if self.t is None else self.t
        if x._version != version:
            raise GradFnError(
                f"{self.name}worker={worker}, index={index}, step={step}) changed its params argument in place "
                f"at server iteration t={t}; it is the worker's copy of the server parameters (shared by a whole "
                f"synchronous round) and must be read only: clone it first",
                t=-1 if self.t is None else self.t, worker=worker, index=index, step=step,
            )
        if not isinstance(g, Tensor) or g.shape != p0.shape or g.dtype != p0.dtype or g.device != p0.device:
            where = f"{self.name}worker={worker}, index={index}, step={step}) at server iteration t={t}"
            got = (
                f"shape {tuple(g.shape)}, dtype {g.dtype}, device {g.device}"
                if isinstance(g, Tensor)
                else f"a {type(g).__name__}"
            )
            raise GradFnError(
                f"{where} returned {got}; expected a torch.Tensor of shape {tuple(p0.shape)}, dtype {p0.dtype}, "
                f"device {p0.device} (same as params0)",
                t=-1 if self.t is None else self.t,
                worker=worker,
                index=index,
                step=step,
            )
        if g.requires_grad:
            g = g.detach()
        if self.record is not None and finite is None:
            self.record[0].note([g], self.record[1], _GRADIENT)
        elif self.check_finite and not (all_finite(g) if finite is None else finite):
            raise _nan_gradient(self.name, self.t, worker, index, step)
        self.last = g
        return g


def _nan_gradient(name: str, t: int | None, worker: int, index: int, step: int) -> NonFiniteError:
    """The error of a gradient with NaN/Inf values (``t`` None: computed ahead, its iteration not known yet)."""
    return NonFiniteError(
        f"{name}worker={worker}, index={index}, step={step}) returned NaN/Inf values at server iteration "
        f"t={'?' if t is None else t}; the run stopped before applying it (parameters untouched)",
        t=-1 if t is None else t, worker=worker, index=index, step=step)


def _check_message(message: Message, t: int | None, worker: int, *, already_checked: Tensor | None) -> None:
    for name, tensor in message.tensors():
        if tensor is already_checked:  # a one-step method sends its gradient as is
            continue
        if not all_finite(tensor):
            raise NonFiniteError(
                f"the message of worker {worker} (index {message.index}) at server iteration "
                f"t={'?' if t is None else t} has NaN/Inf values in its {name}; the run stopped before applying it "
                f"(parameters untouched)",
                t=-1 if t is None else t,
                worker=worker,
                index=message.index,
            )
