"""Worker-side local loops (H steps of SGD or of momentum SGD) and AL-SGD (spec §3.10, §3.13).

Each loop starts from the received point, draws a fresh minibatch per local step (``grad(x, h)``), and returns the
message; the worker owns its copies (one model-sized clone per buffer per message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import (
    BoundGrad,
    Message,
    Payload,
    Rule,
    ServerState,
    WorkerState,
    check_local_steps,
    check_rate,
    register,
    zeros_like,
)
from .lr import DelayAdaptive, DelayRule


def local_sgd(payload: Payload, grad: BoundGrad, *, local_lr: float, local_steps: int) -> Message:
    """``x_0 = w_s``; ``x_{h+1} = x_h − γ ∇f(x_h; ξ_h)`` for h < H; sends ``Δ = x_0 − x_H``."""
    gamma = local_lr * payload.lr_scale
    x = payload.params.clone()
    for h in range(local_steps):
        x.add_(grad(x, h), alpha=-gamma)
    return Message(index=payload.index, update=payload.params - x, local_lr_scale=payload.lr_scale)


def local_msgd(
    payload: Payload,
    grad: BoundGrad,
    *,
    local_lr: float,
    momentum: float,
    local_steps: int,
    initial_momentum: Tensor | None = None,
) -> Message:
    """OrLoMo's worker (spec §3.13, A4, A5): local momentum with γ inside, restarted at zero by default::

        x_0 = w_s ; m_0 = 0 ;  m_{h+1} = β m_h + γ ∇f(x_h; ξ_h) ;  x_{h+1} = x_h − m_{h+1}

    sends ``(m_H, Δ = x_0 − x_H)``. With β = 0 it is :func:`local_sgd` (spec R17). ``initial_momentum`` replaces
    ``m_0 = 0`` (copied, not modified).
    """
    gamma = local_lr * payload.lr_scale
    x = payload.params.clone()
    m = zeros_like(x) if initial_momentum is None else initial_momentum.clone()
    for h in range(local_steps):
        g = grad(x, h)
        m.mul_(momentum).add_(g, alpha=gamma)
        x.sub_(m)
        del g  # released before the next gradient, whose buffer can then be the same memory
    return Message(index=payload.index, update=payload.params - x, momentum=m, local_lr_scale=payload.lr_scale)


@register
@dataclass(frozen=True)
class ALSGD(DelayAdaptive, Rule):
    """Asynchronous local SGD (FedBuff with buffer size 1; spec §3.10, A24)::

        worker: H local SGD steps with rate γ from w_s, sends (Δ, s)
        server: w ← w − η_t Δ,  η_t = η · factor(τ_t)   (delay_rule 'inverse' by default; 'none' = constant η)
    """

    name: ClassVar[str] = "al-sgd"
    scheduler: ClassVar[str] = "async"
    scheduled_rate: ClassVar[str] = "local_lr"
    worker_sends: ClassVar[str] = "(Δ, s)"

    lr: float = 1.0
    local_lr: float = 0.1
    local_steps: int = 8  # type: ignore[assignment]
    delay_rule: DelayRule = "inverse"
    delay_threshold: float = 1.0

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_rate("local_lr", self.local_lr)
        check_local_steps(self.local_steps)
        self._check_delay()

    def work(self, payload: Payload, grad: BoundGrad, worker_state: WorkerState | None = None) -> Message:
        return local_sgd(payload, grad, local_lr=self.local_lr, local_steps=self.local_steps)

    def apply(self, state: ServerState, message: Message, *, t: int, worker: int) -> None:
        self.sgd_step(state, message, t=t, lr=self.lr)

    def ignores(self, state: ServerState, message: Message, *, t: int) -> bool:
        return self.sgd_ignores(state, message, t=t, lr=self.lr)
