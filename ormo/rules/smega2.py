"""SMEGA2 (Cohen et al., asynchronous training with a single momentum buffer; spec §3.6, exact from the
reference code). The server keeps one momentum buffer refreshed once every K messages, and sends each worker a
look-ahead *estimate* of where the parameters will be after the momentum of the next ≈K steps, not ``w``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import (
    Message,
    Payload,
    Rule,
    ServerState,
    check_choice,
    check_momentum,
    check_rate,
    register,
    zeros_like,
)

ESTIMATES: tuple[str, ...] = ("advanced", "naive")


@dataclass
class SMEGA2State(ServerState):
    """``momentum`` = v (PyTorch convention), ``accumulator`` = A, ``counter`` = c, ``estimate`` = scratch for ŵ."""

    momentum: Tensor = None  # type: ignore[assignment]
    accumulator: Tensor = None  # type: ignore[assignment]
    estimate: Tensor = None  # type: ignore[assignment]
    counter: int = 0


@register
@dataclass(frozen=True)
class SMEGA2(Rule):
    """SMEGA2, with K the cycle length (number of workers)::

        UPDATE(t):  c ← (c + 1) mod K ;  A ← A + g ;  d ← g + β v
                    if c == 0:  v ← β v + A / K ;  A ← 0
                    w ← w − η d
        send to k_t:  ŵ = w − ηβ[(K + c(β − 1)) v + (c/K) A]   (estimate='advanced', default)
                      ŵ = w − ηβK v                           (estimate='naive')

    With K = 1 this is Nesterov momentum (spec R6).
    """

    name: ClassVar[str] = "smega2"
    scheduler: ClassVar[str] = "async"
    worker_sends: ClassVar[str] = "g"
    server_sends: ClassVar[str] = "look-ahead estimate ŵ"

    lr: float = 0.1
    momentum: float = 0.9
    estimate: str = "advanced"

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)
        check_choice("estimate", self.estimate, ESTIMATES)

    def init(self, params0: Tensor, *, num_workers: int) -> SMEGA2State:
        return SMEGA2State(
            params=params0.clone(),
            num_workers=num_workers,
            momentum=zeros_like(params0),
            accumulator=zeros_like(params0),
            estimate=zeros_like(params0),
        )

    def apply(self, state: SMEGA2State, message: Message, *, t: int, worker: int) -> None:  # type: ignore[override]
        K, beta, g = state.num_workers, self.momentum, message.update
        eta = self.lr * state.lr_scale
        state.counter = (state.counter + 1) % K
        state.accumulator.add_(g)
        # d = g + β v_old, applied in two in-place steps before v is refreshed
        state.params.add_(g, alpha=-eta)
        state.params.add_(state.momentum, alpha=-eta * beta)
        if state.counter == 0:
            state.momentum.mul_(beta).add_(state.accumulator, alpha=1.0 / K)
            state.accumulator.zero_()

    def payload(self, state: SMEGA2State, *, index: int) -> Payload:  # type: ignore[override]
        K, beta, c = state.num_workers, self.momentum, state.counter
        eta = self.lr * state.lr_scale
        est = state.estimate.copy_(state.params)
        if self.estimate == "advanced":
            est.add_(state.momentum, alpha=-eta * beta * (K + c * (beta - 1.0)))
            if c:
                est.add_(state.accumulator, alpha=-eta * beta * c / K)
        else:
            est.add_(state.momentum, alpha=-eta * beta * K)
        return Payload(index=index, params=est, lr_scale=state.local_lr_scale)
