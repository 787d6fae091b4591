"""The rule protocol shared by every method, the typed messages, validation helpers and the registry.

A *rule* holds hyperparameters only. Its mutable training state lives in a separate state object made by
``rule.init(params0, num_workers=K)``, so a checkpoint is the state and a rule can be replayed in isolation
(optax style). One server iteration ``t`` (spec §2.2) is::

    rule.begin_iteration(state, t=t, waiting_empty=...)   # PRE(t): OrMo's group shift, SSGDm's round shift
    rule.apply(state, message, t=t, worker=k)               # UPDATE(t): consume one message
    rule.payload(state, index=t + 1)                        # what SCHEDULE(t) sends (w, a look-ahead, or (w̄, ū))

and the worker side is ``rule.work(payload, grad, worker_state)``, where ``grad(x, step)`` is the stochastic gradient
at ``x`` for the worker's minibatch of local step ``step`` and ``worker_state`` is what ``rule.init_worker`` made for
that worker (None for most rules). Engines (simulator, Ray) only move payloads and messages, and keep worker states.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

Scheduler = Literal["sync", "async"]
SCHEDULERS: tuple[str, ...] = ("sync", "async")

#: Worker-bound stochastic gradient: ``grad(x, step) -> Tensor`` (same shape and dtype as ``x``).
BoundGrad = Callable[[Tensor, int], Tensor]


def invalid(field: str, value: Any, constraint: str, fix: str | None = None) -> ConfigError:
    """Build the project's standard error: ``invalid momentum: 1.2 (must be in [0, 1))``."""
    msg = f"invalid {field}: {value!r} (must be {constraint})"
    if fix:
        msg += f"; {fix}"
    return ConfigError(msg)


def _is_real(value: Any) -> bool:
    """A real number, numpy scalars included, but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def check_positive(field: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise invalid(field, value, "a finite number > 0")
    return float(value)


#: the largest learning rate a rule takes: an update multiplies its rate by coefficients up to ~1/(1 - β), and the
#: product is passed to float32 kernels, whose largest value is 3.4e38
MAX_RATE = 1e30


def check_rate(field: str, value: Any) -> float:
    """A learning rate: a finite number > 0, at most ``MAX_RATE``."""
    rate = check_positive(field, value)
    if rate > MAX_RATE:
        raise invalid(field, value, f"<= {MAX_RATE:g}: an update multiplies it by up to 1/(1 - momentum), and float32 "
                                    f"arithmetic overflows at 3.4e38")
    return rate


def check_momentum(field: str, value: Any) -> float:
    if not _is_real(value) or not (0.0 <= value < 1.0):
        raise invalid(field, value, "a number in [0, 1)")
    return float(value)


def check_int_at_least(field: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise invalid(field, value, f"an integer >= {minimum}")
    return int(value)


#: the most local steps a message may take: the papers use up to 64; a message is one unit of work that a stop
#: (Ctrl-C, SIGTERM) waits for, so a message of millions of steps would make a run unstoppable
MAX_LOCAL_STEPS = 100_000


def check_local_steps(value: Any) -> int:
    check_int_at_least("local_steps", value, 1)
    if value > MAX_LOCAL_STEPS:
        raise invalid("local_steps", value, f"an integer in [1, {MAX_LOCAL_STEPS:,}]",
                      "a message takes every local step before a run can stop")
    return int(value)


#: the most workers a run simulates (each holds a snapshot of the parameters, or a message computed ahead)
MAX_WORKERS = 100_000


def check_num_workers(field: str, value: Any) -> int:
    check_int_at_least(field, value, 1)
    if value > MAX_WORKERS:
        raise invalid(field, value, f"<= {MAX_WORKERS:,} (each worker holds a copy of the parameters; the papers use "
                                    f"at most 64)")
    return int(value)


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(field, value, "True or False")
    return value


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise invalid(field, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


@dataclass(slots=True)
class Payload:
    """What the server sends a worker.

    ``params`` is the parameter the worker evaluates at: ``w_index`` for most rules, SMEGA2's look-ahead estimate,
    or PRSGDm's averaged parameter ``w̄``. ``momentum`` is PRSGDm's averaged momentum ``ū`` (None otherwise).
    ``lr_scale`` multiplies the worker's local learning rate γ (the schedule's factor at dispatch time).
    The tensors may alias the server state: an engine copies them before the server moves on.
    """

    index: int
    params: Tensor
    momentum: Tensor | None = None
    lr_scale: float = 1.0


@dataclass(slots=True)
class Message:
    """What a worker sends back, tagged with the index of the parameter it was computed from.

    ``update`` is the gradient ``g`` (one-step methods), the local displacement ``Δ = x_0 − x_H`` (AL-SGD,
    local OrMo-DA, OrLoMo) or the local parameter ``x_k`` (PRSGDm). ``momentum`` is OrLoMo's last scaled local
    momentum ``m_H`` or PRSGDm's local momentum buffer ``v_k``.
    """

    index: int
    update: Tensor
    momentum: Tensor | None = None
    #: the factor the worker applied to its local rate γ (copied from the payload; 1 for one-step methods)
    local_lr_scale: float = 1.0

    def tensors(self) -> list[tuple[str, Tensor]]:
        out = [("update", self.update)]
        if self.momentum is not None:
            out.append(("momentum", self.momentum))
        return out


@dataclass
class WorkerState:
    """State a worker keeps from one message to the next (e.g. its own momentum buffer)."""

    momentum: Tensor

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """``copy=False``: the live tensor, for a caller that serializes it at once (a checkpoint)."""
        return {"momentum": self.momentum.clone() if copy else self.momentum}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.momentum.copy_(_same_kind("worker momentum", self.momentum, sd["momentum"]))


@dataclass
class ServerState:
    """Fields common to every rule's server state. ``params`` is ``w_t``, the model the server evaluates."""

    params: Tensor
    num_workers: int
    #: Factor on the server/global rate η, set by the engine before each iteration (1 unless a schedule drives η).
    lr_scale: float = 1.0
    #: Factor on the workers' local rate γ, sent with every payload (1 unless a schedule drives γ).
    local_lr_scale: float = 1.0

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of every field (tensors cloned), suitable for ``torch.save``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.clone()
            elif isinstance(v, list):
                v = [x.clone() if isinstance(x, Tensor) else x for x in v]
            out[f.name] = v
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            cur = getattr(self, f.name)
            new = sd[f.name]
            if isinstance(cur, Tensor):
                cur.copy_(_same_kind(f.name, cur, new))
            elif isinstance(cur, list) and cur and isinstance(cur[0], Tensor):
                for c, n in zip(cur, new, strict=True):
                    c.copy_(_same_kind(f.name, c, n))
            else:
                setattr(self, f.name, _same_kind(f.name, cur, new))


def _same_kind(name: str, cur: Any, new: Any) -> Any:
    """``new``, a saved value of a state field, checked against the live one: a tensor of the same shape and dtype
    (``copy_`` would cast another dtype silently), a number for a number."""
    if isinstance(cur, Tensor):
        ok = isinstance(new, Tensor) and new.shape == cur.shape and new.dtype == cur.dtype
        want = f"a {str(cur.dtype).removeprefix('torch.')} tensor of shape {tuple(cur.shape)}"
    elif isinstance(cur, bool) or cur is None or not isinstance(cur, int | float):
        return new
    else:
        ok, want = isinstance(new, numbers.Real) and not isinstance(new, bool), "a number"
    if not ok:
        got = f"a {str(new.dtype).removeprefix('torch.')} tensor of shape {tuple(new.shape)}" if isinstance(
            new, Tensor) else repr(new) if isinstance(new, str | int | float | None) else f"a {type(new).__name__}"
        raise ConfigError(f"the state's {name} is {got}, this rule's is {want}: it is not a state of this run (or it "
                          f"was edited)")
    return new


class Rule:
    """Base class of every method: hyperparameters (a frozen dataclass in each subclass) plus the four steps.

    Class attributes say how the method is wired: ``scheduler`` ('sync' or 'async'), ``worker_sends`` and
    ``server_sends`` (human-readable, from spec §4), and ``scheduled_rate``: the rate a learning-rate schedule
    drives, ``'lr'`` (η, gradient methods) or ``'local_lr'`` (γ, local-update methods).
    """

    name: ClassVar[str]
    scheduler: ClassVar[Scheduler]
    worker_sends: ClassVar[str]
    server_sends: ClassVar[str] = "(w, t+1)"
    scheduled_rate: ClassVar[str] = "lr"
    #: Whether checking the state at read-outs finds every NaN/Inf that checking each message finds (the engine's
    #: ``defer_checks="state"``, what ``ormo train`` does on a CPU): a NaN/Inf in a message stays in the server's
    #: tensors unless :meth:`ignores` says the message was skipped, and what :meth:`payload` sends either aliases
    #: ``state.params``/``state.momentum`` or is checked per message. Read from the class's own namespace, so a
    #: subclass (a plugin's rule) must declare it itself; ormo's rules do (tested for each).
    state_checks: ClassVar[bool] = False

    @property
    def local_steps(self) -> int:
        """Local iterations per message (H); 1 for gradient methods."""
        return 1

    @property
    def message_has_momentum(self) -> bool:
        """Whether the worker's message carries a momentum vector (OrLoMo's m, PRSGDm's v)."""
        return False

    # -- server -------------------------------------------------------------------------------------------
    def init(self, params0: Tensor, *, num_workers: int) -> ServerState:
        return ServerState(params=params0.clone(), num_workers=num_workers)

    def begin_iteration(self, state: ServerState, *, t: int, waiting_empty: bool) -> None:
        """PRE(t): method-specific work before message ``t`` is consumed. Default: nothing."""

    def apply(self, state: ServerState, message: Message, *, t: int, worker: int) -> None:  # pragma: no cover
        """UPDATE(t): consume one message in place."""
        raise NotImplementedError

    def ignores(self, state: ServerState, message: Message, *, t: int) -> bool:
        """Whether :meth:`apply` at iteration ``t`` may have left the state untouched by ``message`` (a zero rate, a
        message dropped for its delay), asked right after that :meth:`apply`. An engine that finds NaN/Inf by checking
        the state at read-outs checks such a message itself. Default: False (every message reaches the state)."""
        return False

    def payload(self, state: ServerState, *, index: int) -> Payload:
        """What SCHEDULE sends after iteration ``index − 1`` (aliases the state; the engine copies it)."""
        return Payload(index=index, params=state.params, lr_scale=state.local_lr_scale)

    # -- worker -------------------------------------------------------------------------------------------
    def init_worker(self, params0: Tensor) -> WorkerState | None:
        """State one worker keeps across its messages; None (the default) for stateless workers."""
        return None

    def work(self, payload: Payload, grad: BoundGrad, worker_state: WorkerState | None = None) -> Message:
        """Worker side of a one-step gradient method: ``g = ∇f(x; ξ)`` at the received point, sent as is."""
        return Message(index=payload.index, update=grad(payload.params, 0))

    def describe(self) -> dict[str, Any]:
        hp = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {
            "name": self.name,
            "scheduler": self.scheduler,
            "worker_sends": self.worker_sends,
            "server_sends": self.server_sends,
            "scheduled_rate": self.scheduled_rate,
            "hyperparameters": hp,
        }


# --------------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add a rule under ``cls.name``. A plugin's class is checked here, at import, so that a
    mistake is one line naming it rather than a traceback from the run that uses it."""
    what = f"rule class {getattr(cls, '__qualname__', cls)!r}"
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise ConfigError(f"{what} is not a subclass of ormo.rules.base.Rule; subclass it")
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{what} is not a dataclass; decorate it with @dataclass(frozen=True) under @register "
                          f"(its fields are the hyperparameters)")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} has name = {name!r}; give it a class attribute name: ClassVar[str] = \"my-rule\"")
    if getattr(cls, "scheduler", None) not in SCHEDULERS:
        raise ConfigError(f"{what} has scheduler = {getattr(cls, 'scheduler', None)!r}; it must be one of "
                          f"{', '.join(map(repr, SCHEDULERS))}")
    if name in _REGISTRY:
        raise ConfigError(f"rule name {name!r} registered twice; register the new rule under another name")
    _REGISTRY[cls.name] = cls
    return cls


def rule_names() -> list[str]:
    """Every registered rule name, in registration order."""
    return list(_REGISTRY)


def rule_class(name: str) -> type[Rule]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown rule {name!r}; valid names: {', '.join(_REGISTRY)}") from None


def make_rule(name: str, **hyperparameters: Any) -> Rule:
    """Build the rule registered as ``name`` with the given hyperparameters.

    Hyperparameter names: ``lr`` (server/global η), ``momentum`` (β), ``local_lr`` (γ), ``local_steps`` (H), and each
    rule's spec switches. Unknown names and invalid values raise :class:`ConfigError` naming field, value and
    constraint.
    """
    cls = rule_class(name)
    accepted = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in hyperparameters:
        if key not in accepted:
            raise ConfigError(
                f"rule {name!r} has no hyperparameter {key!r}; accepted: {', '.join(accepted) or '(none)'}"
            )
    return cls(**hyperparameters)


def set_rate_factor(rule: Rule, state: ServerState, factor: float) -> None:
    """Apply a learning-rate schedule's factor to the rate the rule's ``scheduled_rate`` names (η or γ)."""
    if rule.scheduled_rate == "local_lr":
        state.local_lr_scale = float(factor)
    else:
        state.lr_scale = float(factor)


def catch_up(beta: float, n: int) -> float:
    """``S(n) = 1 + β + … + β^n = (1 − β^{n+1}) / (1 − β)`` (spec §1); ``S(0) = 1``."""
    if n == 0:
        return 1.0
    return (1.0 - beta ** (n + 1)) / (1.0 - beta)


def group_of(index: int, num_workers: int) -> int:
    """``G(s) = ⌈s / K⌉``: the gradient group of a message computed from parameter index ``s`` (spec §3.7, A1)."""
    return (index + num_workers - 1) // num_workers


def zeros_like(t: Tensor) -> Tensor:
    return torch.zeros_like(t, memory_format=torch.contiguous_format)
