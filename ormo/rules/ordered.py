"""The ordered-momentum family on one server core (spec §3.7–§3.9, §3.12, §3.13, §11).

Messages are grouped by the index of the parameter they were computed from, ``G(s) = ⌈s/K⌉``. The momentum
``u`` (scaled: η inside) weights group ``i`` by ``ρ^{I−i}``, where ``I`` is the latest open group, as SSGDm weights
its rounds. A late message gets at once the parameter coefficient its on-time group-mates have accumulated::

    PRE(t):    if C = ∅ and G(t) > I:   w ← w − c_shift · u ;  u ← ρ u ;  I ← I + 1
    UPDATE(t): n ← I − G(s) ;  η_t ← η · factor(τ_t)
               OrMo, OrMo-DA, local OrMo-DA:  u ← u + β^n η_t g ;  w ← w − S(n) η_t g
               OrMo vanilla step:             u ← u + β^n η g   ;  w ← w − η g
               OrLoMo:                        u ← u + ρ^n η_t m ;  w ← w − η_t Δ − (c_late(n)) η_t m

with ``ρ = β``, ``c_shift = β`` and ``S(n) = 1 + β + … + β^n`` (for OrLoMo ``group_decay='beta_pow_H'``:
``ρ = β^H``, ``c_shift = β + … + β^H``, ``c_late(n) = β + … + β^{Hn}``). The closed forms (spec R9, R14) are
``u = Σ ρ^{I−G(s)} η_t x`` and ``(1−β)(w_0 − w) + β u = Σ η_t g``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import (
    BoundGrad,
    ConfigError,
    Message,
    Payload,
    Rule,
    ServerState,
    WorkerState,
    catch_up,
    check_choice,
    check_local_steps,
    check_momentum,
    check_rate,
    group_of,
    register,
    zeros_like,
)
from .local import local_msgd, local_sgd
from .lr import DelayAdaptive, DelayRule


@dataclass
class OrderedState(ServerState):
    """``params`` = w, ``momentum`` = u (η inside), ``group`` = I, the index of the latest open group."""

    momentum: Tensor = None  # type: ignore[assignment]
    group: int = 0


def _geometric_tail(beta: float, count: int) -> float:
    """``β + β² + … + β^count`` (0 for count = 0)."""
    if count == 0 or beta == 0.0:
        return 0.0
    return beta * (1.0 - beta**count) / (1.0 - beta)


class _Ordered(Rule):
    """Shared server of the ordered family. Subclasses define fields ``lr`` and ``momentum`` and
    :meth:`_consume`; delay-adaptive members mix in :class:`DelayAdaptive`."""

    scheduler: ClassVar[str] = "async"
    lr: float
    momentum: float

    def _group_steps(self) -> int:
        """How many powers of β one group stands for (1, or H for OrLoMo's ``beta_pow_H``)."""
        return 1

    def _eta(self, state: OrderedState, message: Message, tau: int) -> float:
        return self.lr * state.lr_scale

    def init(self, params0: Tensor, *, num_workers: int) -> OrderedState:
        return OrderedState(params=params0.clone(), num_workers=num_workers, momentum=zeros_like(params0))

    def begin_iteration(self, state: OrderedState, *, t: int, waiting_empty: bool) -> None:  # type: ignore[override]
        # A `while` rather than an `if`: G(t) − I ≤ 1 under both schedulers, but this stays right for any other.
        if not waiting_empty:
            return
        target = group_of(t, state.num_workers)
        if state.group >= target:
            return
        h = self._group_steps()
        shift, decay = _geometric_tail(self.momentum, h), self.momentum**h
        while state.group < target:
            if shift != 0.0:
                state.params.add_(state.momentum, alpha=-shift)
            state.momentum.mul_(decay)
            state.group += 1

    def lateness(self, state: OrderedState, index: int) -> int:
        """``n = I − G(s)``: how many groups late a message computed from index ``s`` is (always ≥ 0)."""
        n = state.group - group_of(index, state.num_workers)
        if n < 0:
            raise ConfigError(
                f"message index {index} belongs to group {group_of(index, state.num_workers)}, "
                f"after the latest open group {state.group}: the scheduler delivered a message from the future"
            )
        return n

    def apply(self, state: OrderedState, message: Message, *, t: int, worker: int) -> None:  # type: ignore[override]
        n = self.lateness(state, message.index)
        eta = self._eta(state, message, t - message.index)
        if eta != 0.0:
            self._consume(state, message, n, eta)

    def ignores(self, state: OrderedState, message: Message, *, t: int) -> bool:  # type: ignore[override]
        if callable(getattr(self, "delay_rule", None)):  # not called a second time to tell: it may keep state
            return True
        return self._eta(state, message, t - message.index) == 0.0

    def _consume(self, state: OrderedState, message: Message, n: int, eta: float) -> None:
        """OrMo's UPDATE: ``u += β^n η g``, ``w −= S(n) η g``."""
        g, beta = message.update, self.momentum
        weight = beta**n
        if weight != 0.0:
            state.momentum.add_(g, alpha=weight * eta)
        state.params.add_(g, alpha=-catch_up(beta, n) * eta)


@register
@dataclass(frozen=True)
class OrMo(_Ordered):
    """Ordered momentum with a constant learning rate (Shi, Yang, Li, NeurIPS 2024, Algorithm 2; spec §3.7)."""

    name: ClassVar[str] = "ormo"
    worker_sends: ClassVar[str] = "(g, s)"

    lr: float = 0.1
    momentum: float = 0.9

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)


@register
@dataclass(frozen=True)
class OrMoDA(DelayAdaptive, _Ordered):
    """OrMo with a delay-adaptive rate ``η_t`` in both the momentum and the parameter update (spec §3.8, A2).

    ``delay_rule``: 'inverse' (default, ``η·K/max(K, τ)`` with threshold ``delay_threshold·K``), 'drop_above',
    'none', or a callable ``f(tau, num_workers)``.
    """

    name: ClassVar[str] = "ormo-da"
    worker_sends: ClassVar[str] = "(g, s)"

    lr: float = 0.1
    momentum: float = 0.9
    delay_rule: DelayRule = "inverse"
    delay_threshold: float = 1.0

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)
        self._check_delay()

    def _eta(self, state: OrderedState, message: Message, tau: int) -> float:
        return self.lr_at(self.lr * state.lr_scale, tau, state.num_workers)


VANILLA_STEPS: tuple[str, ...] = ("sgd", "momentum_increment")


@register
@dataclass(frozen=True)
class OrMoVanilla(_Ordered):
    """"OrMo (vanilla SGD step)" ablation (spec §3.9, A9): OrMo's momentum bookkeeping, but the parameter step of
    a message is ``η g`` (``step='sgd'``, default) or its momentum increment ``β^n η g``
    (``step='momentum_increment'``) instead of ``S(n) η g``. Equal to OrMo whenever every ``n = 0``."""

    name: ClassVar[str] = "ormo-vanilla"
    worker_sends: ClassVar[str] = "(g, s)"

    lr: float = 0.1
    momentum: float = 0.9
    step: str = "sgd"

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)
        check_choice("step", self.step, VANILLA_STEPS)

    def _consume(self, state: OrderedState, message: Message, n: int, eta: float) -> None:
        g, weight = message.update, self.momentum**n
        if weight != 0.0:
            state.momentum.add_(g, alpha=weight * eta)
        coef = 1.0 if self.step == "sgd" else weight
        if coef != 0.0:
            state.params.add_(g, alpha=-coef * eta)

    def ignores(self, state: OrderedState, message: Message, *, t: int) -> bool:  # type: ignore[override]
        weight = self.momentum ** self.lateness(state, message.index)
        return super().ignores(state, message, t=t) or (weight == 0.0 and self.step != "sgd")


DELTA_SCALES: tuple[str, ...] = ("none", "inverse_lr", "inverse_steps")


#: readings of a local method's global η (spec A6): as given, or divided by the number of workers K
LR_SCALINGS: tuple[str, ...] = ("none", "1/K")


def _global_lr(lr: float, scaling: str, state: OrderedState) -> float:
    return lr / state.num_workers if scaling == "1/K" else lr


@register
@dataclass(frozen=True)
class LocalOrMoDA(DelayAdaptive, _Ordered):
    """Local OrMo-DA (OrLoMo paper's ablation; spec §3.12, A10): workers run H steps of local SGD with rate γ and
    send ``Δ``; the server is OrMo-DA with ``Δ`` in place of ``g``. ``delta_scale`` rescales Δ before it enters the
    server ('none' default, 'inverse_lr' = Δ/γ, 'inverse_steps' = Δ/H)."""

    name: ClassVar[str] = "local-ormo-da"
    worker_sends: ClassVar[str] = "(Δ, s)"
    scheduled_rate: ClassVar[str] = "local_lr"

    lr: float = 1.0
    momentum: float = 0.9
    local_lr: float = 0.1
    local_steps: int = 8  # type: ignore[assignment]
    delay_rule: DelayRule = "inverse"
    delay_threshold: float = 1.0
    delta_scale: str = "none"
    #: the global η's reading (spec A6): "none" uses lr as given, "1/K" uses lr / K (PRSGDm's per-round step)
    lr_scaling: str = "none"

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)
        check_rate("local_lr", self.local_lr)
        check_local_steps(self.local_steps)
        check_choice("delta_scale", self.delta_scale, DELTA_SCALES)
        check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        self._check_delay()

    def _eta(self, state: OrderedState, message: Message, tau: int) -> float:
        eta = self.lr_at(_global_lr(self.lr, self.lr_scaling, state) * state.lr_scale, tau, state.num_workers)
        if self.delta_scale == "inverse_lr":  # Δ/γ with the γ this worker used (its factor at dispatch)
            gamma = self.local_lr * message.local_lr_scale
            if gamma == 0.0 or eta / gamma > 1e30:
                raise ConfigError(
                    f"delta_scale = 'inverse_lr' divides a message's displacement by the local rate it was computed "
                    f"with, and the message of index {message.index} was computed at a local rate of {gamma:.3g} "
                    f"(local_lr times the schedule's factor {message.local_lr_scale:.3g}; a decay can underflow to "
                    f"0): the server's step eta/gamma = {eta / gamma if gamma else math.inf:.3g} is over 1e30. Start "
                    f"a new run with a schedule whose factor stays larger, or with delta_scale = 'none' or "
                    f"'inverse_steps'")
            return eta / gamma
        if self.delta_scale == "inverse_steps":
            return eta / self.local_steps
        return eta

    def work(self, payload: Payload, grad: BoundGrad, worker_state: WorkerState | None = None) -> Message:
        return local_sgd(payload, grad, local_lr=self.local_lr, local_steps=self.local_steps)


GROUP_DECAYS: tuple[str, ...] = ("beta", "beta_pow_H")
MOMENTUM_INITS: tuple[str, ...] = ("zero", "previous")


@register
@dataclass(frozen=True)
class OrLoMo(DelayAdaptive, _Ordered):
    """Ordered local momentum (OrLoMo; spec §3.13, A3–A5). Worker: H local MSGD steps from ``w_s`` with zero
    initial momentum and γ inside it; sends ``(m_H, Δ)``. Server: OrMo's shift and group weights, ``Δ`` applied at
    once with ``η_t``, ``m`` entering the momentum with its group's weight and the parameter with the coefficient
    its group-mates already received. ``group_decay='beta_pow_H'`` makes each group stand for H MSGD steps;
    ``local_momentum_init='previous'`` starts each round from the worker's last ``m_H`` instead of zero (spec A4;
    the H = 1 reduction to OrMo-DA holds only for 'zero')."""

    name: ClassVar[str] = "orlomo"
    worker_sends: ClassVar[str] = "(m, Δ, s)"
    scheduled_rate: ClassVar[str] = "local_lr"

    lr: float = 1.0
    momentum: float = 0.9
    local_lr: float = 0.1
    local_steps: int = 8  # type: ignore[assignment]
    delay_rule: DelayRule = "inverse"
    delay_threshold: float = 1.0
    group_decay: str = "beta"
    local_momentum_init: str = "zero"
    #: the global η's reading (spec A6): "none" uses lr as given, "1/K" uses lr / K (PRSGDm's per-round step)
    lr_scaling: str = "none"

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)
        check_rate("local_lr", self.local_lr)
        check_local_steps(self.local_steps)
        check_choice("group_decay", self.group_decay, GROUP_DECAYS)
        check_choice("local_momentum_init", self.local_momentum_init, MOMENTUM_INITS)
        check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        self._check_delay()

    def _group_steps(self) -> int:
        return self.local_steps if self.group_decay == "beta_pow_H" else 1

    def _eta(self, state: OrderedState, message: Message, tau: int) -> float:
        return self.lr_at(_global_lr(self.lr, self.lr_scaling, state) * state.lr_scale, tau, state.num_workers)

    @property
    def message_has_momentum(self) -> bool:
        return True

    def init_worker(self, params0: Tensor) -> WorkerState | None:
        return WorkerState(momentum=zeros_like(params0)) if self.local_momentum_init == "previous" else None

    def work(self, payload: Payload, grad: BoundGrad, worker_state: WorkerState | None = None) -> Message:
        previous = worker_state.momentum if worker_state is not None else None
        msg = local_msgd(
            payload,
            grad,
            local_lr=self.local_lr,
            momentum=self.momentum,
            local_steps=self.local_steps,
            initial_momentum=previous,
        )
        if previous is not None:
            previous.copy_(msg.momentum)
        return msg

    def _consume(self, state: OrderedState, message: Message, n: int, eta: float) -> None:
        assert message.momentum is not None
        m, h = message.momentum, self._group_steps()
        weight = self.momentum ** (h * n)
        if weight != 0.0:
            state.momentum.add_(m, alpha=weight * eta)
        state.params.add_(message.update, alpha=-eta)
        late = _geometric_tail(self.momentum, h * n)
        if late != 0.0:
            state.params.add_(m, alpha=-late * eta)
