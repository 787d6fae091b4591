"""Asynchronous one-step baselines: ASGD, delay-adaptive ASGD, naive ASGDm and shifted momentum
(spec §3.3–§3.5). All use the asynchronous scheduler: the sender gets ``(w_{t+1}, t+1)`` back at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import (
    Message,
    Rule,
    ServerState,
    check_choice,
    check_momentum,
    check_rate,
    register,
    zeros_like,
)
from .lr import DelayAdaptive, DelayRule
from .sync import CONVENTIONS, MomentumState


@register
@dataclass(frozen=True)
class ASGD(Rule):
    """Asynchronous SGD: ``w ← w − η g`` for every arriving gradient, whatever its delay."""

    name: ClassVar[str] = "asgd"
    scheduler: ClassVar[str] = "async"
    worker_sends: ClassVar[str] = "(g, s)"

    lr: float = 0.1

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)

    def apply(self, state: ServerState, message: Message, *, t: int, worker: int) -> None:
        state.params.add_(message.update, alpha=-self.lr * state.lr_scale)


@register
@dataclass(frozen=True)
class DAASGD(DelayAdaptive, Rule):
    """ASGD with the delay-adaptive rate of OrMo-DA: ``w ← w − η_t g``, ``η_t = η · factor(τ_t)`` (spec §3.8).

    With the default ``'inverse'`` rule ``η_t = η·K / max(K, τ_t)`` (Mishchenko et al. 2022)."""

    name: ClassVar[str] = "da-asgd"
    scheduler: ClassVar[str] = "async"
    worker_sends: ClassVar[str] = "(g, s)"

    lr: float = 0.1
    delay_rule: DelayRule = "inverse"
    delay_threshold: float = 1.0

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        self._check_delay()

    def apply(self, state: ServerState, message: Message, *, t: int, worker: int) -> None:
        self.sgd_step(state, message, t=t, lr=self.lr)

    def ignores(self, state: ServerState, message: Message, *, t: int) -> bool:
        return self.sgd_ignores(state, message, t=t, lr=self.lr)


@register
@dataclass(frozen=True)
class NaiveASGDm(Rule):
    """Naive asynchronous momentum: heavy ball applied to gradients in arrival order (spec §3.4, A7)::

        u ← β u + η g ;  w ← w − u

    ``convention='pytorch'`` keeps η outside the buffer (``b ← βb + g; w ← w − ηb``), as running
    ``torch.optim.SGD(momentum=β)`` on the server does; the two agree at constant η (A12).
    """

    name: ClassVar[str] = "naive-asgdm"
    scheduler: ClassVar[str] = "async"
    worker_sends: ClassVar[str] = "(g, s)"

    lr: float = 0.1
    momentum: float = 0.9
    convention: str = "scaled"

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)
        check_choice("convention", self.convention, CONVENTIONS)

    def init(self, params0: Tensor, *, num_workers: int) -> MomentumState:
        return MomentumState(params=params0.clone(), num_workers=num_workers, momentum=zeros_like(params0))

    def apply(self, state: MomentumState, message: Message, *, t: int, worker: int) -> None:  # type: ignore[override]
        eta = self.lr * state.lr_scale
        if self.convention == "scaled":
            state.momentum.mul_(self.momentum).add_(message.update, alpha=eta)
            state.params.sub_(state.momentum)
        else:
            state.momentum.mul_(self.momentum).add_(message.update)
            state.params.add_(state.momentum, alpha=-eta)


@dataclass
class PerWorkerMomentumState(ServerState):
    """One momentum buffer per worker (``buffers[k]`` = v_k, PyTorch convention: η outside)."""

    buffers: list[Tensor] = None  # type: ignore[assignment]


@register
@dataclass(frozen=True)
class ShiftedMomentum(Rule):
    """Shifted momentum (Giladi, Nacson, Hoffer, Soudry, ICLR 2020; spec §3.5, A8): one buffer per worker,
    updated only with that worker's gradients::

        v_k ← β v_k + g ;  w ← w − η v_k

    Equivalent to the worker keeping ``v_k`` and sending it. Costs K model-sized buffers on the server.
    """

    name: ClassVar[str] = "shifted-momentum"
    scheduler: ClassVar[str] = "async"
    worker_sends: ClassVar[str] = "(g, s) (equivalently v_k)"

    lr: float = 0.1
    momentum: float = 0.9

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)

    def init(self, params0: Tensor, *, num_workers: int) -> PerWorkerMomentumState:
        return PerWorkerMomentumState(
            params=params0.clone(),
            num_workers=num_workers,
            buffers=[zeros_like(params0) for _ in range(num_workers)],
        )

    def apply(self, state: PerWorkerMomentumState, message: Message, *, t: int, worker: int) -> None:  # type: ignore[override]
        v = state.buffers[worker]
        v.mul_(self.momentum).add_(message.update)
        state.params.add_(v, alpha=-self.lr * state.lr_scale)
